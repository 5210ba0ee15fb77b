"""Host-side shape arithmetic, once per input signature: the plan a run executes.

Given the concrete shapes and dtypes of a run's inputs, walk the graph once on meta tensors and
evaluate on the CPU every node whose inputs are all known and small (Shape, Gather of a shape,
Concat of dims, Range...). What is left are the nodes that touch real data: the run executes only
those, as *steps*. Shape parameters they read (Reshape's shape, Resize's scales, Slice's starts...)
are on the host already, so a run needs no device-to-host sync and can be captured in a CUDA graph.

Control flow is decided here when the host can decide it: an ``If`` whose condition is host-known is
replaced by its branch's steps; a ``Loop`` whose trip count and condition are host-known, and a
``Scan``, are unrolled into straight-line steps (up to ``UNROLL_LIMIT`` body nodes in all).

What the host cannot decide splits the plan:

- a *host step* (``Step.host``) reads data on the host (a shape parameter computed from data, an
  ``If`` on a data condition, a ``Loop`` whose trip count is data): it runs eagerly, between
  captured segments, and the plan goes on when its output shapes are still known;
- a step whose output *shapes* depend on the data (NonZero, NonMaxSuppression...) ends the plan:
  the rest of the graph is its ``tail``, specialized at run time from the actual tensors reaching
  it (cached per signature of those tensors), and so on.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.shapes import Sym, as_symbol
from ..ops import OpContext, OpDef, get
from ..ops.torch_types import to_torch

HOST_LIMIT = 1 << 14  # elements: above this a value is data, not shape arithmetic
UNROLL_LIMIT = 8192  # body nodes a plan may unroll from Loop/Scan bodies, all loops together
Signature = tuple


@dataclass
class Step:
    node: Node
    opdef: Optional[OpDef]
    inputs: list[Optional[str]]  # env keys ('name', 'name@dev' for a host value used as data, ...)
    outputs: list[str]
    free_after: list[str] = field(default_factory=list)
    kernel: Optional[Callable[..., Any]] = None  # a callable standing for this step (fused group, unrolled glue)
    fused: int = 1  # how many graph nodes this step computes
    host: bool = False  # reads data on the host: runs eagerly, between captured segments
    reason: str = ""  # why it is a host step
    label: str = ""  # what the step is, where it is not ``node.op`` (profiles, reports)
    memo: dict = field(default_factory=dict)  # device tables an op builds once (OpContext.cached)
    # this plan's choice for the node where it has one per shape bucket (tactic_buckets.py): a
    # BoundTactic or tactic_buckets.REFERENCE; None: the interpreter's binding of meta.tactic
    bound: Any = None


@dataclass
class Break:
    """A node that keeps a run from being one CUDA graph, and why."""

    node: str
    op: str
    reason: str
    kind: str  # "host" (runs eagerly between captured segments) or "shapes" (data-dependent shapes)

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "reason": self.reason, "kind": self.kind}


@dataclass
class Tail:
    """The nodes after a data-dependent-shape step, specialized at run time per boundary signature."""

    nodes: list[Node]
    reads: list[str]  # env keys the tail reads from before it (tensors whose shapes key its plans)
    known: dict[str, torch.Tensor]  # host values computed before the tail that it may read
    plans: "OrderedDict[tuple, Specialization]" = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    max_plans: int = 32
    bucket_size: Optional[int] = None  # the size of the bucketed dim in the plan it ends (tactic_buckets.py)

    def signature(self, env: Any) -> tuple:
        return tuple(_value_sig(k, env[k]) for k in self.reads)


@dataclass
class Specialization:
    signature: Signature
    steps: list[Step]
    host: dict[str, torch.Tensor]  # values computed on the host (CPU tensors) or device copies, by env key
    shapes: dict[str, tuple[int, ...]]  # concrete shapes of values, where known
    capturable: bool  # one CUDA graph: no host step and no tail
    reasons: list[str] = field(default_factory=list)  # why not, in words
    folded: int = 0  # nodes evaluated on the host
    breaks: list[Break] = field(default_factory=list)
    tail: Optional[Tail] = None
    unrolled: int = 0  # control-flow nodes inlined or unrolled


VALUE_INPUT_LIMIT = 64  # elements: a larger integer input is data, never a control value


def value_inputs(graph: Graph) -> frozenset[str]:
    """Inputs whose *values* the host needs before a run: small integer or boolean inputs that
    decide an If, a Loop's trip count or condition, or a shape parameter (Reshape's shape, TopK's K,
    Resize's sizes...), through host-foldable arithmetic. Like TensorRT's shape tensors, their values
    are part of a run's signature: each value gets its own plan, and the plan can be one CUDA graph.
    """
    small = {v.name for v in graph.inputs
             if v.dtype is not None and (v.dtype.is_int or v.dtype.value == "bool") and v.shape is not None
             and all(isinstance(d, int) for d in v.shape) and int(np.prod(v.shape or (1,))) <= VALUE_INPUT_LIMIT}
    if not small:
        return frozenset()
    origin: dict[str, set[str]] = {n: {n} for n in small}  # value -> the small inputs it derives from
    hostish = set(small) | set(graph.initializers)  # values the host could know from those inputs
    needed: set[str] = set()
    for node in graph.nodes:
        opdef = get(node.op)
        ins = [v for v in node.inputs if v is not None]
        control = {"If": (0,), "Loop": (0, 1)}.get(node.op, ())
        for i, v in enumerate(node.inputs):
            if v is not None and v.name in origin and (i in opdef.host_inputs or i in control):
                needed |= origin[v.name]
        if node.op in ("Shape", "Size"):
            hostish.update(o.name for o in node.outputs)
            continue
        if not opdef.foldable or not all(v.name in hostish for v in ins):
            continue
        srcs = set().union(*(origin.get(v.name, set()) for v in ins)) if ins else set()
        for o in node.outputs:
            hostish.add(o.name)
            if srcs:
                origin[o.name] = srcs
    return frozenset(needed)


def signature_of(graph: Graph, feeds: dict[str, Any], values: "frozenset[str]" = frozenset()) -> Signature:
    """The key of a run's plan: each input's shape and dtype, and the values of ``values`` inputs."""
    sig = []
    for v in graph.inputs:
        x = feeds.get(v.name)
        s = _value_sig(v.name, x)
        if v.name in values and isinstance(x, torch.Tensor):
            s = s + (tuple(x.reshape(-1).tolist()),)
        sig.append(s)
    return tuple(sig)


def _value_sig(name: str, x: Any) -> tuple:
    if isinstance(x, torch.Tensor):
        return (name, tuple(x.shape), x.dtype)
    if isinstance(x, list):  # a sequence: its tensors' shapes
        return (name, "seq", tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in x))
    return (name, type(x).__name__)


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, list) and all(isinstance(t, torch.Tensor) for t in x):
        return [_meta(t) for t in x]
    return None


def _masks_nothing(t: torch.Tensor) -> bool:
    """An attention mask that changes nothing: all True (boolean) or all +0/-0 (additive)."""
    if t.numel() == 0:
        return False
    if t.dtype == torch.bool:
        return bool(t.all())
    return t.is_floating_point() and not bool(t.any())


def _input_dims(graph: Graph, feeds: dict[str, Any]) -> Optional[dict[str, int]]:
    """The values of the graph's named input dims for these feeds (None if they contradict)."""
    env: dict[str, int] = {}
    for v in graph.inputs:
        x = feeds.get(v.name)
        if not isinstance(x, torch.Tensor) or v.shape is None or len(v.shape) != x.dim():
            continue
        for d, n in zip(v.shape, x.shape):
            name = as_symbol(d)
            if name is not None:
                if env.setdefault(name, int(n)) != int(n):
                    return None
            elif isinstance(d, int) and d != n:
                return None  # the run's input check names the mismatch
    return env


def _declared_outputs(node: Node, dims: dict[str, int]) -> Any:
    """Meta tensors of the node's outputs from the graph's inferred shapes, or None if any output's
    shape or dtype is not determined by the input dims."""
    outs = []
    for o in node.outputs:
        if o.shape is None or o.dtype is None:
            return None
        shape = []
        for d in o.shape:
            if isinstance(d, Sym):
                try:
                    d = d.evaluate(dims)
                except (KeyError, ZeroDivisionError, ValueError):
                    return None
            if d < 0:
                return None
            shape.append(int(d))
        try:
            outs.append(torch.empty(shape, dtype=to_torch(o.dtype), device="meta"))
        except (KeyError, ValueError, TypeError):
            return None
    return outs[0] if len(outs) == 1 else tuple(outs)


def _all_consts(graph: Graph) -> dict[str, Value]:
    """Constants of the graph and of every subgraph, by name."""
    out = dict(graph.initializers)
    for n in graph.nodes:
        for sg in n.subgraphs():
            out.update(_all_consts(sg))
    return out


def _identity(x: Any) -> Any:
    return x


class _Abort(Exception):
    """Inlining a body met something the host cannot decide: run the control node as a host step."""


class _Specializer:
    """One pass over a node list: folds on the host, inlines decidable control flow, plans steps."""

    def __init__(self, graph: Graph, small_consts: dict[str, torch.Tensor], device: torch.device,
                 dims: Optional[dict[str, int]]):
        self.graph = graph
        self.device = device
        consts = _all_consts(graph)
        self.const_names = set(consts)
        self.dims = dims
        self.meta: dict[str, Any] = {}
        self.known: dict[str, torch.Tensor] = {}  # host values by env key
        self.big: dict[str, torch.Tensor] = {}  # shape-only values too large for the host: on the device
        self.steps: list[Step] = []
        self.breaks: list[Break] = []
        self.folded = 0
        self.unrolled = 0
        self.unrolled_nodes = 0
        self.scopes: list[dict[int, str]] = []  # Value id -> env key, innermost last (inlined bodies)
        self.masks: set[str] = set()
        self.no_op_masks: set[str] = set()
        for name in self.const_names:
            if name in small_consts:
                self.known[name] = small_consts[name]
        for name, v in consts.items():
            self.meta[name] = torch.empty(v.data.shape, dtype=to_torch(v.dtype), device="meta") if v.dtype else None

    # -- keys ------------------------------------------------------------------------------------
    def key(self, v: Value) -> str:
        for scope in reversed(self.scopes):
            k = scope.get(id(v))
            if k is not None:
                return k
        return v.name

    def _out_key(self, v: Value, prefix: str) -> str:
        k = prefix + v.name
        if self.scopes:
            self.scopes[-1][id(v)] = k
        return k

    # -- the walk --------------------------------------------------------------------------------
    def run(self, nodes: list[Node], prefix: str = "") -> Optional[int]:
        """Plan ``nodes`` in order; returns the index of the first node left for a tail, or None."""
        for i, node in enumerate(nodes):
            if not self.node(node, prefix):
                return i + 1
        return None

    def node(self, node: Node, prefix: str) -> bool:
        """Plan one node. False: its output shapes depend on data (the caller stops here)."""
        opdef = get(node.op)
        ins = node.inputs
        keys_in = [self.key(v) if v is not None else None for v in ins]
        ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name,
                        output_dtypes=[o.dtype for o in node.outputs])
        out_keys = [self._out_key(o, prefix) for o in node.outputs]
        first = keys_in[0] if keys_in else None
        if node.op in ("Shape", "Size") and first is not None and isinstance(self.meta.get(first), torch.Tensor):
            m = self.meta[first]
            out = opdef.call([torch.zeros((), dtype=m.dtype).expand(m.shape)], node.attrs, ctx)
            self.known[out_keys[0]] = out
            self.meta[out_keys[0]] = _meta(out)
            self.folded += 1
            return True
        if node.op in ("If", "Loop", "Scan") and self._inline(node, keys_in, out_keys, prefix):
            return True
        foldable = (opdef.foldable and not any(node.subgraphs())
                    and all(k is None or k in self.known for k in keys_in))
        if foldable and self._fold(node, opdef, keys_in, out_keys, ctx):
            return True
        return self._device_step(node, opdef, keys_in, out_keys, ctx)

    def _fold(self, node: Node, opdef: OpDef, keys_in: list, out_keys: list[str], ctx: OpContext) -> bool:
        try:
            out = opdef.call([self.known[k] if k is not None else None for k in keys_in], node.attrs, ctx)
        except Exception:
            return False  # let the run report it, with the node's name
        outs = list(out) if isinstance(out, tuple) else [out]
        if out is None or not all(isinstance(t, torch.Tensor) for t in outs[: len(out_keys)]):
            return False
        # small results are shape arithmetic (kept on the host); large ones are data that depends
        # only on shapes (masks, position ids): computed once, kept on the device
        for k, t in zip(out_keys, outs):
            if k in self.masks and _masks_nothing(t):
                self.no_op_masks.add(k)
            if t.numel() <= HOST_LIMIT:
                self.known[k] = t
            else:
                self.big[k] = t.to(self.device)
            self.meta[k] = _meta(t)
        self.folded += 1
        return True

    def _device_step(self, node: Node, opdef: OpDef, keys_in: list, out_keys: list[str], ctx: OpContext) -> bool:
        keys: list[Optional[str]] = []
        args: list[Any] = []
        host_reason = ""
        for i, k in enumerate(keys_in):
            if k is None or (i == 3 and node.op == "Attention" and k in self.no_op_masks):
                keys.append(None)
                args.append(None)
            elif i in opdef.host_inputs and k in self.known:
                # shape parameters are read on the host: constants too (their device copy would sync)
                keys.append(k + "@host" if k in self.const_names else k)
                args.append(self.known[k])
            elif k in self.known and k not in self.const_names:
                keys.append(k + "@dev")
                args.append(_meta(self.known[k]))
            else:
                keys.append(k)
                args.append(self.meta.get(k))
                if i in opdef.host_inputs and not host_reason:
                    host_reason = f"reads its input '{node.inputs[i].name}' on the host, and it is computed from data"
        if opdef.kind == "control" or any(node.subgraphs()):
            host_reason = host_reason or "control flow the host cannot decide before the run"
        out_meta = None
        if all(a is not None or k is None for a, k in zip(args, keys)):  # k None: no input, or a dropped mask
            # the graph's own shapes when they are known for this signature; running an op on meta
            # tensors costs more (and conv's meta kernel imports torch._dynamo: seconds, once)
            out_meta = _declared_outputs(node, self.dims) if self.dims is not None else None
            if out_meta is None and not host_reason:
                try:
                    out_meta = opdef.call(args, node.attrs, ctx)
                except Exception:
                    out_meta = None
        elif self.dims is not None:
            out_meta = _declared_outputs(node, self.dims)
        outs = list(out_meta) if isinstance(out_meta, tuple) else [out_meta]
        metas = [outs[j] if j < len(outs) and isinstance(outs[j], (torch.Tensor, list)) else None
                 for j in range(len(out_keys))]
        # sequences and optionals have no single shape to plan for: only tensor outputs must be known
        shapes_known = out_meta is not None and all(
            isinstance(m, torch.Tensor) for m, o in zip(metas, node.outputs) if o.kind == "tensor")
        if self.scopes and (host_reason or not shapes_known):
            raise _Abort(host_reason or "data-dependent shapes")
        # a step whose output shapes depend on the data learns them on the host (a sync): it runs eagerly
        step = Step(node, opdef, keys, out_keys, host=bool(host_reason) or not shapes_known,
                    reason=host_reason or ("" if shapes_known else "its output shapes depend on the data"))
        self.steps.append(step)
        for k, m in zip(out_keys, metas):
            self.meta[k] = m
        if host_reason:
            self.breaks.append(Break(node.name, node.op, host_reason, "host"))
        if not shapes_known:
            self.breaks.append(Break(node.name, node.op, "its output shapes depend on the data", "shapes"))
            return False
        return True

    # -- control flow --------------------------------------------------------------------------------
    def _alias(self, node: Node, src: str, dst: str) -> None:
        """``dst`` is ``src``: a host value is simply known under both keys; a device value gets a
        step that binds the name (no kernel)."""
        self.meta[dst] = self.meta.get(src)
        if src in self.known:
            self.known[dst] = self.known[src]
            return
        self.steps.append(Step(node, None, [src], [dst], kernel=_identity, fused=0, label="alias"))

    def _glue(self, node: Node, fn: Callable, srcs: list[str], dst: str, meta: Any, label: str) -> None:
        self.steps.append(Step(node, None, list(srcs), [dst], kernel=fn, fused=0, label=label))
        self.meta[dst] = meta

    def _inline(self, node: Node, keys_in: list, out_keys: list[str], prefix: str) -> bool:
        """Inline an If, or unroll a Loop or Scan, when the host can decide it. Rolls back on failure."""
        mark = (len(self.steps), len(self.breaks), self.folded, self.unrolled_nodes, dict(self.meta), dict(self.known))
        try:
            if node.op == "If":
                done = self._inline_if(node, keys_in, out_keys, prefix)
            elif node.op == "Loop":
                done = self._unroll_loop(node, keys_in, out_keys, prefix)
            else:
                done = self._unroll_scan(node, keys_in, out_keys, prefix)
        except _Abort:
            done = False
        if done:
            self.unrolled += 1
            return True
        del self.steps[mark[0]:]
        del self.breaks[mark[1]:]
        self.folded, self.unrolled_nodes, self.meta, self.known = mark[2], mark[3], mark[4], mark[5]
        for k in out_keys:
            self.big.pop(k, None)
        return False

    def _body(self, body: Graph, bind: dict[int, str], prefix: str) -> dict[int, str]:
        """Plan one instance of a body; returns its scope (body Value id -> env key)."""
        self.unrolled_nodes += max(len(body.nodes), 1)
        if self.unrolled_nodes > UNROLL_LIMIT:
            raise _Abort("too many body nodes to unroll")
        self.scopes.append(dict(bind))
        try:
            for n in body.nodes:
                if not self.node(n, prefix):
                    raise _Abort("data-dependent shapes inside a body")
        finally:
            scope = self.scopes.pop()
        return scope

    def _inline_if(self, node: Node, keys_in: list, out_keys: list[str], prefix: str) -> bool:
        cond = keys_in[0]
        if cond is None or cond not in self.known:
            return False
        branch = node.attrs["then_branch"] if bool(self.known[cond].reshape(-1)[0]) else node.attrs["else_branch"]
        scope = self._body(branch, {}, f"{prefix}{node.name}/")
        for o, k in zip(branch.outputs, out_keys):
            self._alias(node, scope.get(id(o)) or self.key(o), k)
        return True

    def _unroll_loop(self, node: Node, keys_in: list, out_keys: list[str], prefix: str) -> bool:
        m_key, c_key = (keys_in + [None, None])[:2]
        if m_key is None and c_key is None:
            return False  # no bound: the body decides at run time
        if (m_key is not None and m_key not in self.known) or (c_key is not None and c_key not in self.known):
            return False
        trip = int(self.known[m_key].reshape(())) if m_key is not None else None
        keep = bool(self.known[c_key].reshape(-1)[0]) if c_key is not None else True
        body: Graph = node.attrs["body"]
        carried = list(keys_in[2:])
        n_carried = len(carried)
        scans: list[list[str]] = [[] for _ in body.outputs[1 + n_carried:]]
        i = 0
        cond_key = f"{prefix}{node.name}#cond"
        self.known[cond_key] = torch.tensor(True)
        self.meta[cond_key] = _meta(self.known[cond_key])
        while keep and (trip is None or i < trip):
            if i >= UNROLL_LIMIT:
                raise _Abort("too many iterations to unroll")
            it_key = f"{prefix}{node.name}#{i}/#iter"
            self.known[it_key] = torch.tensor(i, dtype=torch.int64)
            self.meta[it_key] = _meta(self.known[it_key])
            bind = {id(body.inputs[0]): it_key, id(body.inputs[1]): cond_key}
            for v, k in zip(body.inputs[2:], carried):
                if k is None:
                    raise _Abort("an optional loop-carried value")
                bind[id(v)] = k
            scope = self._body(body, bind, f"{prefix}{node.name}#{i}/")
            outs = [scope.get(id(o)) or self.key(o) for o in body.outputs]
            carried = outs[1:1 + n_carried]
            for s, k in zip(scans, outs[1 + n_carried:]):
                s.append(k)
            if c_key is not None or m_key is None:  # the body's condition decides
                if outs[0] not in self.known:
                    raise _Abort("the loop condition is computed from data")
                keep = bool(self.known[outs[0]].reshape(-1)[0])
                cond_key = outs[0]
            i += 1
        for k_out, k_src in zip(out_keys[:n_carried], carried):
            self._alias(node, k_src, k_out)
        hints = [o.dtype for o in node.outputs[n_carried:]]
        for s, k_out, h in zip(scans, out_keys[n_carried:], hints):
            self._stack(node, s, k_out, h, axis=0, reverse=False)
        return True

    def _stack(self, node: Node, parts: list[str], dst: str, hint: Any, axis: int, reverse: bool) -> None:
        if not parts:
            dtype = to_torch(hint) if hint is not None else torch.float32
            self.big[dst] = torch.zeros((0,), dtype=dtype, device=self.device)
            self.meta[dst] = _meta(self.big[dst])
            return
        metas = [self.meta.get(k) for k in parts]
        if any(m is None for m in metas):
            raise _Abort("a scan output of unknown shape")
        order = parts[::-1] if reverse else parts

        def stack(*xs: torch.Tensor, _axis: int = axis) -> torch.Tensor:
            y = torch.stack(xs, 0)
            return y.movedim(0, _axis + y.dim() if _axis < 0 else _axis) if _axis else y

        m = torch.stack([torch.empty(metas[0].shape, dtype=metas[0].dtype, device="meta")] * len(parts), 0)
        if axis:
            m = m.movedim(0, axis + m.dim() if axis < 0 else axis)
        self._glue(node, stack, order, dst, m, "stack")

    def _unroll_scan(self, node: Node, keys_in: list, out_keys: list[str], prefix: str) -> bool:
        body: Graph = node.attrs["body"]
        n_scan = node.attrs["num_scan_inputs"]
        n_state = len(keys_in) - n_scan
        states, xs = list(keys_in[:n_state]), list(keys_in[n_state:])
        if any(k is None for k in keys_in):
            return False
        metas = [self.meta.get(k) for k in xs]
        if any(m is None for m in metas):
            return False
        axes = [a + m.dim() if a < 0 else a for a, m in zip(node.attrs.get("scan_input_axes") or [0] * n_scan, metas)]
        dirs = node.attrs.get("scan_input_directions") or [0] * n_scan
        length = metas[0].shape[axes[0]] if xs else 0
        n_out = len(node.outputs) - n_state
        collected: list[list[str]] = [[] for _ in range(n_out)]
        for t in range(length):
            slices = []
            for j, (k, a, d, m) in enumerate(zip(xs, axes, dirs, metas)):
                idx = length - 1 - t if d else t
                sk = f"{prefix}{node.name}#{t}/#x{j}"
                self._glue(node, lambda x, _a=a, _i=idx: x.select(_a, _i), [k], sk, m.select(a, idx), "slice")
                slices.append(sk)
            bind = {id(v): k for v, k in zip(body.inputs, states + slices)}
            scope = self._body(body, bind, f"{prefix}{node.name}#{t}/")
            outs = [scope.get(id(o)) or self.key(o) for o in body.outputs]
            states = outs[:n_state]
            for c, k in zip(collected, outs[n_state:]):
                c.append(k)
        for k_out, k_src in zip(out_keys[:n_state], states):
            self._alias(node, k_src, k_out)
        out_axes = node.attrs.get("scan_output_axes") or [0] * n_out
        out_dirs = node.attrs.get("scan_output_directions") or [0] * n_out
        hints = [o.dtype for o in node.outputs[n_state:]]
        for parts, k_out, a, d, h in zip(collected, out_keys[n_state:], out_axes, out_dirs, hints):
            self._stack(node, parts, k_out, h, axis=a, reverse=bool(d))
        return True

    # -- result ----------------------------------------------------------------------------------------
    def host_values(self, outputs: Iterable[str], tail: Optional[Tail]) -> dict[str, torch.Tensor]:
        """The host dict a run reads: host parameters, device copies of host values read as data."""
        host: dict[str, torch.Tensor] = {}
        for s in self.steps:
            for k in s.inputs:
                if k is None:
                    continue
                if k.endswith("@dev"):
                    host[k] = self.known[k[:-4]].to(self.device)
                elif k.endswith("@host"):
                    host[k] = self.known[k[:-5]]
                elif k in self.known and k not in self.const_names:
                    host[k] = self.known[k]
            for sg in s.node.subgraphs() if s.kernel is None else ():
                for v in sg.captured_values():  # bodies read outer values by name, as data
                    if v.name in self.known and v.name not in self.const_names:
                        host.setdefault(v.name, self.known[v.name].to(self.device))
        host.update(self.big)
        for name in outputs:
            if name in self.known and name not in host:
                host[name] = self.known[name].to(self.device)
        if tail is not None:  # host values the tail reads as data: on the device, like the rest
            for k in tail.reads:
                if k in self.known and k not in self.const_names and k not in host:
                    host[k] = self.known[k].to(self.device)
        return host


def specialize(graph: Graph, feeds: dict[str, Any], small_consts: dict[str, torch.Tensor],
               device: torch.device, values: "frozenset[str]" = frozenset()) -> Specialization:
    """Plan one input signature. ``small_consts``: CPU copies of constants of at most HOST_LIMIT
    elements; ``values``: inputs whose values are part of the signature (see value_inputs)."""
    sp = _Specializer(graph, small_consts, device, _input_dims(graph, feeds))
    for v in graph.inputs:
        x = feeds.get(v.name)
        sp.meta[v.name] = _meta(x)
        if v.name in values and isinstance(x, torch.Tensor):
            sp.known[v.name] = x.detach().cpu()
    # attention masks that mask nothing for this signature (all-zero additive, all-true boolean):
    # dropped, so the attention kernel takes its unmasked path (2-3x faster in cuDNN's flash)
    sp.masks = {n.inputs[3].name for n in graph.nodes
                if n.op == "Attention" and len(n.inputs) > 3 and n.inputs[3] is not None}
    sp.no_op_masks = {name for name in sp.masks & set(graph.initializers)
                      if _masks_nothing(torch.from_numpy(np.asarray(graph.initializers[name].data)))}
    return _finish(graph, sp, sp.run(graph.nodes), graph.nodes, signature_of(graph, feeds, values), ())


def _finish(graph: Graph, sp: _Specializer, stop: Optional[int], nodes: list[Node], signature: tuple,
            keep_extra: Iterable[str]) -> Specialization:
    tail = None
    if stop is not None and stop < len(nodes):
        rest = nodes[stop:]
        tail = Tail(rest, _reads(rest), {})
        tail.known = {k: sp.known[k] for k in tail.reads if k in sp.known}
    outputs = [v.name for v in graph.outputs]
    host = sp.host_values(outputs, tail)
    assign_frees(graph, sp.steps, keep=set(tail.reads) if tail else set(), extra_keep=keep_extra)
    shapes = {k: tuple(t.shape) for k, t in sp.meta.items() if isinstance(t, torch.Tensor)}
    reasons = [f"node '{b.node}' ({b.op}) {b.reason}" for b in sp.breaks]
    capturable = not sp.breaks and tail is None
    return Specialization(signature, sp.steps, host, shapes, capturable, reasons, sp.folded, sp.breaks, tail,
                          sp.unrolled)


def _reads(nodes: list[Node]) -> list[str]:
    """Names the nodes read from before them (inputs and subgraph captures), in first-use order."""
    defined: set[str] = set()
    out: dict[str, None] = {}
    for n in nodes:
        reads = [v for v in n.inputs if v is not None]
        for sg in n.subgraphs():
            reads.extend(sg.captured_values())
        for v in reads:
            if v.name not in defined and not v.is_const:
                out.setdefault(v.name, None)
        defined.update(o.name for o in n.outputs)
    return list(out)


def specialize_tail(graph: Graph, tail: Tail, env: Any, small_consts: dict[str, torch.Tensor],
                    device: torch.device) -> Specialization:
    """Plan the nodes of ``tail`` from the actual tensors reaching it (``env``: key -> value)."""
    sp = _Specializer(graph, small_consts, device, None)
    for k in tail.reads:
        x = env[k]
        sp.meta[k] = _meta(x)
        if k in tail.known:
            sp.known[k] = tail.known[k]
    stop = sp.run(tail.nodes)
    return _finish(graph, sp, stop, tail.nodes, tail.signature(env), ())


def assign_frees(graph: Graph, steps: list[Step], keep: "set[str] | None" = None,
                 extra_keep: Iterable[str] = ()) -> None:
    """Free each value after its last use among the steps (graph outputs and ``keep`` are kept)."""
    for s in steps:
        s.free_after = []
    kept = {v.name for v in graph.outputs} | set(keep or ()) | set(extra_keep)
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for k in s.inputs:
            if k is not None:
                last[k] = i
        if s.kernel is None:
            for sg in s.node.subgraphs():
                for v in sg.captured_values():
                    last[v.name] = i
    produced = {o for s in steps for o in s.outputs} | {v.name for v in graph.inputs}
    for k, i in last.items():
        if k in produced and k not in kept:
            steps[i].free_after.append(k)


def fuse_steps(graph: Graph, spec: Specialization, kernels: dict) -> int:
    """Replace the steps of each fusion group by one step running its generated kernel.

    ``kernels``: group id -> kernel with ``.nodes``, ``.inputs`` (Values) and ``.output``. A group
    is fused only when all its nodes are device steps of this signature. Returns groups fused.
    """
    by_node = {id(s.node): i for i, s in enumerate(spec.steps) if s.kernel is None and not s.host}
    drop: set[int] = set()
    fused = 0
    for k in kernels.values():
        idx = [by_node.get(id(n)) for n in k.nodes]
        if any(i is None for i in idx):
            continue  # part of the group was folded on the host at these shapes
        key_of: dict[str, Optional[str]] = {}
        for i in idx:
            st = spec.steps[i]
            for v, key in zip(st.node.inputs, st.inputs):
                if v is not None:
                    key_of[v.name] = key
        sink = spec.steps[idx[-1]]
        spec.steps[idx[-1]] = Step(sink.node, sink.opdef, [key_of.get(v.name, v.name) for v in k.inputs],
                                   [k.output.name], kernel=k, fused=len(idx))
        drop.update(idx[:-1])
        fused += 1
    if fused:
        spec.steps = [s for i, s in enumerate(spec.steps) if i not in drop]
        assign_frees(graph, spec.steps, keep=set(spec.tail.reads) if spec.tail else set())
    return fused
