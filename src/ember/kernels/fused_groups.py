"""One Triton kernel per fusion group (passes/fusion.py): source, compile, launch.

    k = fuse_group(nodes, inputs, output)      # None when the group cannot be generated
    y = k(*[env[v.name] for v in inputs])      # every input in order, constants included
    k(*tensors, out=buf)                       # into a planner's buffer of k.output_layout(*tensors)

The source is generated once per group (``k.source``; the same group always gives the same
text) and imported from a file named by its hash, since Triton reads a kernel's source back.
Per call, the work is a dict lookup keyed by the inputs' shapes, strides and dtypes: the launch
plan (grid, output layout, strides, constexpr modes) is computed on the first call of each
signature only. One-element constants are written into the source and never read at run time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..ir.graph import Graph, Node, Value
from ..ops.torch_types import to_torch
from .kernel_store import note
from .triton_codegen import LOOP_BLOCK, MAX_BLOCK, Program, build_program, generate_source
from .triton_ops import ELEM, Unsupported

log = logging.getLogger(__name__)
POINTWISE_BLOCK = 1024
_I32 = 2 ** 31 - 1


def group_io(nodes: list[Node]) -> tuple[list[Value], Value]:
    """The group's external inputs (first-read order) and its single output (read by no member)."""
    produced = {id(o) for n in nodes for o in n.outputs}
    inputs: list[Value] = []
    seen: set[int] = set()
    read: set[int] = set()
    for n in nodes:
        for v in n.inputs:
            if v is None:
                continue
            read.add(id(v))
            if id(v) not in produced and id(v) not in seen:
                seen.add(id(v))
                inputs.append(v)
    outs = [o for n in nodes for o in n.outputs if id(o) not in read]
    if len(outs) != 1:
        raise Unsupported(f"group has {len(outs)} exits ({', '.join(o.name for o in outs)}), not one")
    return inputs, outs[0]


@dataclass
class _Plan:
    fn: Any  # the JIT function to launch
    grid: tuple[int]
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    ints: list[int]  # scalar arguments after the pointers
    meta: dict[str, Any]  # constexprs and launch options


class FusedGroupKernel:
    """A fusion group compiled into one Triton kernel."""

    @staticmethod
    def supports(nodes: list[Node]) -> tuple[bool, str]:
        try:
            inputs, output = group_io(nodes)
            build_program(nodes, inputs, output)
        except Unsupported as e:
            return False, str(e)
        return True, ""

    def __init__(self, nodes: list[Node], inputs: list[Value], output: Value):
        self.nodes = list(nodes)
        self.inputs = list(inputs)
        self.output = output
        self.program: Program = build_program(self.nodes, self.inputs, output)  # raises Unsupported
        self.source: str = generate_source(self.program)
        self.out_dtype = to_torch(output.dtype)
        self._module: Any = None
        self._plans: dict[tuple, _Plan] = {}

    # -- compile ---------------------------------------------------------------------------------
    def _kernels(self) -> Any:
        if self._module is None:
            self._module = load_source(self.source)
        return self._module

    # -- launch ----------------------------------------------------------------------------------
    def __call__(self, *tensors: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the group. ``out``: a preallocated result (the memory planner's buffer) with the
        layout :meth:`output_layout` gives for these inputs."""
        if len(tensors) != len(self.inputs):
            raise TypeError(f"fused group {self.program.name}: expected {len(self.inputs)} tensors "
                            f"(one per group input: {', '.join(v.name for v in self.inputs)}), got {len(tensors)}")
        loaded = [tensors[i] for i in self.program.loaded]
        key = tuple((t.shape, t.stride(), t.dtype) for t in loaded)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(loaded)
        if out is None:
            out = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=self.out_dtype, device=loaded[0].device)
        elif tuple(out.shape) != plan.out_shape or out.stride() != plan.out_stride or out.dtype != self.out_dtype:
            raise ValueError(f"fused group {self.program.name}: out= must be {self.out_dtype} of shape "
                             f"{plan.out_shape} and strides {plan.out_stride}, got {out.dtype} {tuple(out.shape)} "
                             f"{out.stride()}")
        if plan.grid[0]:
            note(plan.fn[plan.grid](out, *loaded, *plan.ints, **plan.meta))
        return out

    def output_layout(self, *tensors: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        """(shape, strides, dtype) of the result for these inputs: what a memory planner allocates."""
        loaded = [tensors[i] for i in self.program.loaded]
        key = tuple((t.shape, t.stride(), t.dtype) for t in loaded)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(loaded)
        return plan.out_shape, plan.out_stride, self.out_dtype

    def _domain(self, loaded: list[torch.Tensor]) -> tuple[int, ...]:
        dom = tuple(torch.broadcast_shapes(*[t.shape for t in loaded]))
        rank = self.program.rank
        if len(dom) > rank:
            raise ValueError(f"fused group {self.program.name}: inputs broadcast to rank {len(dom)}, "
                             f"the group was generated for rank {rank}")
        return (1,) * (rank - len(dom)) + dom

    def _plan(self, loaded: list[torch.Tensor]) -> _Plan:
        dom = self._domain(loaded)
        strides = [t.expand(dom).stride() if dom else () for t in loaded]
        if self.program.row:
            return self._row_plan(dom, loaded, strides)
        return self._pointwise_plan(dom, loaded, strides)

    def _pointwise_plan(self, dom: tuple[int, ...], loaded: list[torch.Tensor], strides: list) -> _Plan:
        rank = len(dom)
        numel = _prod(dom)
        # storage order of the first full-size, non-broadcast input: the output takes its layout
        ref = next((s for t, s in zip(loaded, strides) if t.numel() == numel > 1
                    and 0 not in [st for st, d in zip(s, dom) if d > 1]), None)
        big = [j for j in range(rank) if dom[j] > 1]
        order = sorted(big, key=lambda j: -ref[j]) if ref is not None else big
        out_stride = [0] * rank
        acc = 1
        for j in reversed(order):
            out_stride[j] = acc
            acc *= dom[j]
        for j in range(rank):  # size-1 dims: any stride; the contiguous one keeps torch's checks happy
            if dom[j] == 1:
                out_stride[j] = _prod(dom[j + 1:]) or 1
        sizes = [dom[j] for j in order]
        per_in = [[s[j] for j in order] for s in strides]
        outp = [out_stride[j] for j in order]
        modes = []
        for t, s in zip(loaded, per_in):
            if t.numel() == 1:
                modes.append(2)
            elif t.numel() == numel and s == outp:
                modes.append(0)
            else:
                modes.append(1)
        coords = 1 in modes
        # merge storage-adjacent dims every strided input walks contiguously through: fewer div/mods
        sizes, per_in = _collapse(sizes, per_in)
        pad = rank - len(sizes)
        sizes = [1] * pad + sizes
        per_in = [[0] * pad + s for s in per_in]
        if not coords:  # unused: constant values keep one compiled variant
            sizes = [1] * rank
            per_in = [[0] * rank for _ in per_in]
        reach = max([numel] + [sum((d - 1) * abs(st) for d, st in zip(dom, s)) for s in strides])
        block = min(POINTWISE_BLOCK, max(128, _next_pow2(numel)))
        meta: dict[str, Any] = {f"MODE{k}": m for k, m in enumerate(modes)}
        meta.update(COORDS=coords, IDX64=reach + block > _I32, BLOCK=block, num_warps=4)
        ints = [numel, *sizes, *[st for s in per_in for st in s]]
        grid = ((numel + block - 1) // block,)
        return _Plan(getattr(self._kernels(), self.program.name), grid, dom, tuple(out_stride), ints, meta)

    def _row_plan(self, dom: tuple[int, ...], loaded: list[torch.Tensor], strides: list) -> _Plan:
        n = dom[-1]
        rows = _prod(dom[:-1])
        if n == 0 and rows:
            raise ValueError(f"fused group {self.program.name}: rows of length 0; run the reference ops")
        if self.program.out.level == ELEM:
            out_shape = dom
        else:
            out_shape = dom[:-1] + ((1,) if len(self.output.shape) == len(dom) else ())
        out_stride = _contiguous(out_shape)
        reach = max([rows * n] + [sum((d - 1) * abs(st) for d, st in zip(dom, s)) for s in strides])
        looped = n > MAX_BLOCK
        block = LOOP_BLOCK if looped else _next_pow2(n)
        warps = 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 4096 else 16
        ints = [n, *dom[:-1], *[st for s in strides for st in s]]
        name = self.program.name + ("_looped" if looped else "")
        meta = dict(IDX64=reach + block > _I32, BLOCK=block, num_warps=warps)
        return _Plan(getattr(self._kernels(), name), (rows if n else 0,), out_shape, out_stride, ints, meta)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _collapse(sizes: list[int], per_in: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge dim j into j+1 where every input steps over j as over one longer j+1."""
    sizes = list(sizes)
    per_in = [list(s) for s in per_in]
    j = len(sizes) - 2
    while j >= 0:
        if all(s[j] == s[j + 1] * sizes[j + 1] for s in per_in):
            sizes[j + 1] *= sizes[j]
            del sizes[j]
            for s in per_in:
                del s[j]
        j -= 1
    return sizes, per_in


# -- loading generated source ---------------------------------------------------------------------
_MODULES: dict[str, Any] = {}


def cache_dir() -> Path:
    d = Path(os.environ.get("EMBER_KERNEL_CACHE") or Path.home() / ".cache" / "ember" / "fused")
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:  # read-only home: a private temp dir still works
        d = Path(tempfile.gettempdir()) / f"ember-fused-{os.getuid()}"
        d.mkdir(parents=True, exist_ok=True)
        return d


def load_source(source: str) -> Any:
    """Import generated kernel source (Triton reads a kernel's source back, so it must be a file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    mod = _MODULES.get(digest)
    if mod is not None:
        return mod
    path = cache_dir() / f"ember_fused_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)  # atomic: concurrent builds never see half a file
    name = f"ember_fused_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _MODULES[digest] = mod
    return mod


# -- entry points ---------------------------------------------------------------------------------
def fuse_group(nodes: list[Node], inputs: list[Value], output: Value) -> Optional[FusedGroupKernel]:
    """The group's kernel, or None (with the reason logged) when it cannot be generated."""
    try:
        return FusedGroupKernel(nodes, inputs, output)
    except Unsupported as e:
        log.info("fusion group %s not generated: %s", "->".join(n.op for n in nodes), e)
        return None


def collect_groups(graph: Graph) -> dict[str, list[Node]]:
    """node.meta['group'] -> its nodes in graph (topological) order."""
    groups: dict[str, list[Node]] = {}
    for n in graph.nodes:
        gid = n.meta.get("group")
        if gid is not None:
            groups.setdefault(gid, []).append(n)
    return groups


def lower_groups(graph: Graph, skipped: Optional[dict[str, str]] = None) -> dict[str, FusedGroupKernel]:
    """A kernel for every fusion group of an optimized graph; unsupported ones go into ``skipped``
    (group id -> reason) and keep running node by node."""
    outputs = {id(v) for v in graph.outputs}
    users = graph.consumers()
    kernels: dict[str, FusedGroupKernel] = {}
    for gid, nodes in collect_groups(graph).items():
        try:
            inputs, output = group_io(nodes)
            members = {id(n) for n in nodes}
            for o in (o for n in nodes for o in n.outputs if o is not output):
                if id(o) in outputs or any(id(u) not in members for u in users.get(o, [])):
                    raise Unsupported(f"'{o.name}' is computed inside the group but read outside it")
            kernels[gid] = FusedGroupKernel(nodes, inputs, output)
        except Unsupported as e:
            if skipped is not None:
                skipped[gid] = str(e)
            log.info("fusion group %s not generated: %s", gid, e)
    return kernels



# -- ahead-of-time compile check (no GPU needed) ----------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.bool: "*i1",
        torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_target(kernel: FusedGroupKernel, arch: int = 90) -> dict[str, str]:
    """Compile the kernel's main variants for CUDA sm_<arch> with Triton's real compiler, without a
    GPU (triton ships ptxas): {variant: PTX}. Catches what the interpreter does not (types, scoping).
    Needs TRITON_INTERPRET unset in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = kernel._kernels()
    prog = kernel.program
    ptrs = [_PTR[to_torch(kernel.output.dtype)]] + [_PTR[to_torch(kernel.inputs[i].dtype)] for i in prog.loaded]
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    if prog.row:
        variants["row"] = (prog.name, dict(IDX64=False, BLOCK=1024))
        variants["row_idx64"] = (prog.name, dict(IDX64=True, BLOCK=1024))
        variants["looped"] = (prog.name + "_looped", dict(IDX64=False, BLOCK=LOOP_BLOCK))
    else:
        n = len(prog.loaded)
        for label, mode, coords in (("flat", 0, False), ("strided", 1, True), ("scalar", 2, False)):
            variants[label] = (prog.name, dict({f"MODE{k}": mode for k in range(n)}, COORDS=coords, IDX64=False,
                                               BLOCK=POINTWISE_BLOCK))
        variants["strided_idx64"] = (prog.name, dict({f"MODE{k}": 1 for k in range(n)}, COORDS=True, IDX64=True,
                                                     BLOCK=POINTWISE_BLOCK))
    out: dict[str, str] = {}
    for label, (name, consts) in variants.items():
        fn = getattr(mod, name)
        sig: dict[str, str] = {}
        for i, p in enumerate(fn.arg_names):
            sig[p] = ptrs[i] if p.endswith("_ptr") else "constexpr" if p in consts else "i32"
        compiled = triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": 4})
        out[label] = compiled.asm["ptx"]
    return out
