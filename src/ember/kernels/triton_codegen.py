"""Triton source for one fusion group: a pointwise kernel, or a row kernel (one row per program).

The group is first lowered to primitives (triton_ops). Then:

* pointwise groups iterate over the output in the storage order of their full-size input. An
  input whose strides equal the output's is read at the flat offset (``MODE == 0``: coalesced,
  vectorized, no index math); a broadcast or differently strided one through per-dimension
  coordinates and strides (``MODE == 1``); a one-element one once per program (``MODE == 2``).
  The modes are constexprs chosen per input signature, so one source serves every layout.
* row groups give each program one row of the last axis. Inputs whose last dim is 1 are one
  scalar per row; the others are row vectors read through (row strides, column stride). Rows up
  to MAX_BLOCK live in registers (one read of each input); longer rows loop in chunks, reading
  the inputs again for each reduction in turn (the recompute strategy: no scratch memory).

The source depends only on the group (ops, attributes, dtypes, ranks), never on run-time shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ir.graph import Node, Value
from ..ops import get, known_ops
from .triton_ops import (CONST, ELEM, ROW, Builder, Operand, Prim, Unsupported, check_row_reduction, kind_of,
                         literal, lower_pointwise, lower_row_reduction, param_inputs, tl_type)

MAX_BLOCK = 16384  # longest row kept in registers; longer rows use the looped kernel
LOOP_BLOCK = 4096  # chunk of the looped row kernel


@dataclass
class Slot:
    """How the kernel gets one external input."""

    role: str  # 'load' | 'literal' | 'unused'
    level: int = ELEM  # row kernels: ROW (one scalar per row) or ELEM
    arg: int = -1  # position among the loaded inputs
    var: str = ""
    kind: str = "f"


@dataclass
class Program:
    nodes: list[Node]
    slots: list[Slot]
    prims: list[Prim]
    out: Operand
    row: bool  # a row kernel (the group has a reduction)
    rank: int  # rank of the iteration domain
    out_dtype: str  # Triton type of the stored output
    loaded: list[int]  # input positions passed to the kernel, in argument order
    name: str


def _is_row_reduction(n: Node) -> bool:
    return n.op in known_ops() and get(n.op).kind == "reduction"


def _static_last(v: Value) -> object:
    return v.shape[-1] if v.shape else 1


def build_program(nodes: list[Node], inputs: list[Value], output: Value) -> Program:
    """Lower a group; raises Unsupported with the reason when any part of it cannot be generated."""
    if not nodes:
        raise Unsupported("empty group")
    if output.dtype is None or output.shape is None:
        raise Unsupported(f"output '{output.name}' has no known dtype/shape")
    tl_type(output.dtype)
    reductions = [n for n in nodes if _is_row_reduction(n)]
    for n in nodes:
        if len(n.outputs) != 1:
            raise Unsupported(f"node '{n.name}' ({n.op}) has {len(n.outputs)} outputs")
        if n.op not in known_ops() or get(n.op).kind not in ("pointwise", "reduction"):
            raise Unsupported(f"node '{n.name}' ({n.op}) is not pointwise or a reduction")
        if n in reductions:
            if n.inputs[0] is None or n.inputs[0].shape is None:
                raise Unsupported(f"node '{n.name}' ({n.op}): input rank unknown")
            check_row_reduction(n)
    row = bool(reductions)
    rank = len(reductions[0].inputs[0].shape) if row else len(output.shape)
    for n in reductions:
        if len(n.inputs[0].shape) != rank:
            raise Unsupported(f"node '{n.name}' ({n.op}): reduces rows of another rank than the group")
        keep = n.attrs.get("keepdims", 1) if n.op.startswith("Reduce") else 1
        if not keep and n.outputs[0] is not output:
            raise Unsupported(f"node '{n.name}' ({n.op}): keepdims=0 inside the group (would broadcast anew)")
    if row and len(output.shape) > rank:
        raise Unsupported("group output has a higher rank than its rows")

    # which inputs are data; one-element constants become literals
    params = {id(n.inputs[i]) for n in nodes for i in param_inputs(n) if i < len(n.inputs) and n.inputs[i]}
    data = {id(v) for n in nodes for i, v in enumerate(n.inputs) if v is not None and i not in param_inputs(n)}
    slots: list[Slot] = []
    env: dict[int, Operand] = {}
    loaded: list[int] = []
    for i, v in enumerate(inputs):
        if id(v) in env:  # the same value listed twice
            slots.append(Slot("unused"))
            continue
        if id(v) not in data:
            if id(v) in params:
                slots.append(Slot("unused"))
                continue
            raise Unsupported(f"input '{v.name}' is read by no node of the group")
        if v.is_const and v.data is not None and v.data.size == 1 and v.dtype is not None:
            env[id(v)] = literal(v.data, v.dtype)
            slots.append(Slot("literal"))
            continue
        if v.shape is None or v.dtype is None:
            raise Unsupported(f"input '{v.name}' has no known shape/dtype")
        if len(v.shape) > rank:
            raise Unsupported(f"input '{v.name}' has a higher rank than the group's domain")
        level = ELEM
        if row and (len(v.shape) == 0 or _static_last(v) == 1):
            level = ROW
        var = f"x{len(loaded)}"
        env[id(v)] = Operand(var, level, kind_of(v.dtype))
        slots.append(Slot("load", level, len(loaded), var, kind_of(v.dtype)))
        loaded.append(i)
    if not loaded:
        raise Unsupported("the group reads no tensor (all constants): fold it instead")

    b = Builder()
    for n in nodes:
        args: list[Optional[Operand]] = []
        for i, v in enumerate(n.inputs):
            if v is None or i in param_inputs(n):
                args.append(None)
            elif id(v) not in env:
                raise Unsupported(f"node '{n.name}' reads '{v.name}', neither an input nor computed before")
            else:
                args.append(env[id(v)])
        if n.outputs[0].dtype is None:
            raise Unsupported(f"node '{n.name}': output dtype unknown")
        kind_of(n.outputs[0].dtype)
        if n in reductions:
            res = lower_row_reduction(b, n, args, "n_cols")
        else:
            res = lower_pointwise(b, n, args)
        env[id(n.outputs[0])] = res
    if id(output) not in env:
        raise Unsupported(f"output '{output.name}' is computed by no node of the group")
    out = env[id(output)]
    if not out.var:
        raise Unsupported("the group's output is a constant")
    name = "fused_" + "_".join(n.op.lower() for n in nodes[:4]) + ("_etc" if len(nodes) > 4 else "")
    return Program(nodes, slots, b.prims, out, row, rank, tl_type(output.dtype), loaded, name)


# -- source emission ----------------------------------------------------------------------------
def _load_conv(kind: str) -> str:
    return ".to(tl.float32)" if kind == "f" else ""


def _closure(prims: list[Prim], targets: list[str]) -> list[Prim]:
    """Element-level primitives (in order) that the targets need within one chunk of a row."""
    by_name = {p.name: p for p in prims}
    need: set[str] = set()
    work = [t for t in targets if t in by_name and by_name[t].level == ELEM and by_name[t].reduce is None]
    while work:
        t = work.pop()
        if t in need:
            continue
        need.add(t)
        for d in by_name[t].deps:
            p = by_name.get(d)
            if p is not None and p.level == ELEM and p.reduce is None:
                work.append(d)
    return [p for p in prims if p.name in need]


def _reduce_expr(p: Prim) -> str:
    fill = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[p.reduce]
    return f"tl.where(mask, {p.text}, {fill})"


def _emit_prims(lines: list[str], prims: list[Prim], indent: str) -> None:
    for p in prims:
        lines.append(f"{indent}{p.name} = {p.text}")


def pointwise_source(prog: Program) -> str:
    d = prog.rank
    n_in = len(prog.loaded)
    params = ["out_ptr"] + [f"in{k}_ptr" for k in range(n_in)] + ["numel"] + [f"size{j}" for j in range(d)]
    params += [f"st{k}_{j}" for k in range(n_in) for j in range(d)]
    params += [f"MODE{k}: tl.constexpr" for k in range(n_in)]
    params += ["COORDS: tl.constexpr", "IDX64: tl.constexpr", "BLOCK: tl.constexpr"]
    L = ["@triton.jit", f"def {prog.name}({', '.join(params)}):",
         "    pid = tl.program_id(0)",
         "    if IDX64:  # more than 2**31 elements: 64-bit offsets",
         "        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
         "    else:",
         "        offs = pid * BLOCK + tl.arange(0, BLOCK)",
         "    mask = offs < numel"]
    if d:
        L.append("    if COORDS:  # storage-order coordinates for strided/broadcast inputs")
        L.append("        rem = offs")
        for j in range(d - 1, 0, -1):
            L.append(f"        c{j} = rem % size{j}")
            L.append(f"        rem = rem // size{j}")
        L.append("        c0 = rem")
    for s in prog.slots:
        if s.role != "load":
            continue
        k = s.arg
        strided = " + ".join(f"c{j} * st{k}_{j}" for j in range(d)) or "0"
        L += [f"    if MODE{k} == 0:",
              f"        {s.var} = tl.load(in{k}_ptr + offs, mask=mask, other=0){_load_conv(s.kind)}",
              f"    elif MODE{k} == 1:",
              f"        {s.var} = tl.load(in{k}_ptr + ({strided}), mask=mask, other=0){_load_conv(s.kind)}",
              "    else:",
              f"        {s.var} = tl.load(in{k}_ptr){_load_conv(s.kind)}"]
    _emit_prims(L, prog.prims, "    ")
    val = prog.out.text
    L.append(f"    tl.store(out_ptr + offs, {val}.to({prog.out_dtype}), mask=mask)")
    return "\n".join(L) + "\n"


def _row_prologue(prog: Program, name: str, looped: bool) -> list[str]:
    d = prog.rank
    n_in = len(prog.loaded)
    params = ["out_ptr"] + [f"in{k}_ptr" for k in range(n_in)] + ["n_cols"] + [f"size{j}" for j in range(d - 1)]
    params += [f"st{k}_{j}" for k in range(n_in) for j in range(d)]
    params += ["IDX64: tl.constexpr", "BLOCK: tl.constexpr"]
    L = ["@triton.jit", f"def {name}({', '.join(params)}):",
         "    row = tl.program_id(0)",
         "    if IDX64:",
         "        row = row.to(tl.int64)"]
    if d > 1:
        L.append("    rem = row")
        for j in range(d - 2, 0, -1):
            L.append(f"    c{j} = rem % size{j}")
            L.append(f"    rem = rem // size{j}")
        L.append("    c0 = rem")
    for s in prog.slots:
        if s.role == "load":
            k = s.arg
            base = " + ".join(f"c{j} * st{k}_{j}" for j in range(d - 1)) or "0"
            L.append(f"    base{k} = {base}")
            if s.level == ROW:
                L.append(f"    {s.var} = tl.load(in{k}_ptr + base{k}){_load_conv(s.kind)}")
    if not looped:
        L += ["    cols = tl.arange(0, BLOCK)", "    mask = cols < n_cols"]
    return L


def _elem_loads(prog: Program, needed: set[str], indent: str) -> list[str]:
    d = prog.rank
    out = []
    for s in prog.slots:
        if s.role == "load" and s.level == ELEM and s.var in needed:
            out.append(f"{indent}{s.var} = tl.load(in{s.arg}_ptr + base{s.arg} + cols * st{s.arg}_{d - 1}, "
                       f"mask=mask, other=0){_load_conv(s.kind)}")
    return out


def _store(prog: Program, indent: str) -> str:
    v = prog.out.text
    if prog.out.level == ELEM:
        return f"{indent}tl.store(out_ptr + row * n_cols + cols, {v}.to({prog.out_dtype}), mask=mask)"
    return f"{indent}tl.store(out_ptr + row, {v}.to({prog.out_dtype}))"


def _deps_of(prims: list[Prim]) -> set[str]:
    return {d for p in prims for d in p.deps} | {p.text for p in prims if p.reduce}


def row_source(prog: Program) -> str:
    """Both row kernels: `<name>` (the row in registers) and `<name>_looped` (chunks of LOOP_BLOCK)."""
    # in registers: every primitive once, in order
    L = _row_prologue(prog, prog.name, looped=False)
    L += _elem_loads(prog, _deps_of(prog.prims) | {prog.out.text}, "    ")
    for p in prog.prims:
        if p.reduce:
            L.append(f"    {p.name} = tl.{p.reduce}({_reduce_expr(p)}, axis=0)")
        else:
            L.append(f"    {p.name} = {p.text}")
    L.append(_store(prog, "    "))
    # looped: each reduction a pass over the row, recomputing the element values it needs
    L += ["", ""] + _row_prologue(prog, prog.name + "_looped", looped=True)
    for p in prog.prims:
        if p.reduce:
            chunk = _closure(prog.prims, [p.text])
            init = {"sum": "tl.zeros([BLOCK], tl.float32)",
                    "max": 'tl.full([BLOCK], float("-inf"), tl.float32)',
                    "min": 'tl.full([BLOCK], float("inf"), tl.float32)'}[p.reduce]
            comb = {"sum": "acc + {}", "max": "tl.maximum(acc, {})", "min": "tl.minimum(acc, {})"}[p.reduce]
            L += [f"    acc = {init}",
                  "    for start in range(0, n_cols, BLOCK):",
                  "        cols = start + tl.arange(0, BLOCK)",
                  "        mask = cols < n_cols"]
            L += _elem_loads(prog, _deps_of(chunk) | {p.text}, "        ")
            _emit_prims(L, chunk, "        ")
            L.append("        acc = " + comb.format(_reduce_expr(p)))
            L.append(f"    {p.name} = tl.{p.reduce}(acc, axis=0)")
        elif p.level == ROW:
            L.append(f"    {p.name} = {p.text}")
    if prog.out.level == ELEM:
        chunk = _closure(prog.prims, [prog.out.text])
        L += ["    for start in range(0, n_cols, BLOCK):",
              "        cols = start + tl.arange(0, BLOCK)",
              "        mask = cols < n_cols"]
        L += _elem_loads(prog, _deps_of(chunk) | {prog.out.text}, "        ")
        _emit_prims(L, chunk, "        ")
        L.append(_store(prog, "        "))
    else:
        L.append(_store(prog, "    "))
    return "\n".join(L) + "\n"


HEADER = '''"""Generated by ember.kernels.triton_codegen from fusion group: {ops}."""
import triton
import triton.language as tl

from ember.kernels import triton_math as tm


'''


def generate_source(prog: Program) -> str:
    body = row_source(prog) if prog.row else pointwise_source(prog)
    ops = " -> ".join(n.op for n in prog.nodes)
    return HEADER.format(ops=ops) + body
