"""Host-side shape arithmetic, once per input signature.

Given the concrete shapes and dtypes of a run's inputs, walk the graph once on meta tensors and
evaluate on the CPU every node whose inputs are all known and small (Shape, Gather of a shape,
Concat of dims, Range...). What is left are the nodes that touch real data: the run executes
only those. Shape parameters they read (Reshape's shape, Slice's starts...) are already on the
host, so a run needs no device-to-host sync and can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..ir.graph import Graph, Node
from ..ir.shapes import Sym, as_symbol
from ..ops import OpContext, OpDef, get
from ..ops.torch_types import to_torch

HOST_LIMIT = 1 << 14  # elements: above this a value is data, not shape arithmetic
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                "Multinomial"}
Signature = tuple


@dataclass
class Step:
    node: Node
    opdef: OpDef
    inputs: list[Optional[str]]  # env keys ('name' or 'name@dev' for a host value used as data)
    outputs: list[str]
    free_after: list[str] = field(default_factory=list)
    kernel: Optional[Callable[..., Any]] = None  # a generated kernel standing for several nodes
    fused: int = 1  # how many graph nodes this step computes


@dataclass
class Specialization:
    signature: Signature
    steps: list[Step]
    host: dict[str, torch.Tensor]  # values computed on the host (CPU tensors), keyed by env key
    shapes: dict[str, tuple[int, ...]]  # concrete shapes of values, where known
    capturable: bool  # no data-dependent shapes, no host syncs, no control flow
    reasons: list[str] = field(default_factory=list)  # why not capturable
    folded: int = 0  # nodes evaluated on the host


def signature_of(graph: Graph, feeds: dict[str, Any]) -> Signature:
    sig = []
    for v in graph.inputs:
        x = feeds.get(v.name)
        if isinstance(x, torch.Tensor):
            sig.append((v.name, tuple(x.shape), x.dtype))
        else:
            sig.append((v.name, type(x).__name__))
    return tuple(sig)


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
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
                except KeyError:
                    return None
            if d < 0:
                return None
            shape.append(d)
        try:
            outs.append(torch.empty(shape, dtype=to_torch(o.dtype), device="meta"))
        except (KeyError, ValueError, TypeError):
            return None
    return outs[0] if len(outs) == 1 else tuple(outs)


def specialize(graph: Graph, feeds: dict[str, Any], small_consts: dict[str, torch.Tensor],
               device: torch.device) -> Specialization:
    """Plan one input signature. ``small_consts``: CPU copies of constants of at most HOST_LIMIT elements."""
    meta: dict[str, Any] = {}
    known: dict[str, torch.Tensor] = {}  # host values
    big: dict[str, torch.Tensor] = {}  # shape-only values too large for the host: on the device
    for v in graph.inputs:
        meta[v.name] = _meta(feeds.get(v.name))
    for name, v in graph.initializers.items():
        meta[name] = torch.empty(v.data.shape, dtype=to_torch(v.dtype), device="meta") if v.dtype else None
        if name in small_consts:
            known[name] = small_consts[name]
    dims = _input_dims(graph, feeds)
    # attention masks that mask nothing for this signature (all-zero additive, all-true boolean):
    # dropped, so the attention kernel takes its unmasked path (2-3x faster in cuDNN's flash)
    masks = {n.inputs[3].name for n in graph.nodes
             if n.op == "Attention" and len(n.inputs) > 3 and n.inputs[3] is not None}
    no_op_masks = {name for name in masks & set(graph.initializers)
                   if _masks_nothing(torch.from_numpy(np.asarray(graph.initializers[name].data)))}
    runtime: list[tuple[Node, OpDef, list[Optional[str]]]] = []
    reasons: list[str] = []
    folded = 0
    for node in graph.nodes:
        opdef = get(node.op)
        ins = node.inputs
        ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name,
                        output_dtypes=[o.dtype for o in node.outputs])
        if node.op in ("Shape", "Size") and ins[0] is not None and isinstance(meta.get(ins[0].name), torch.Tensor):
            shaped = torch.zeros((), dtype=meta[ins[0].name].dtype).expand(meta[ins[0].name].shape)
            out = opdef.call([shaped], node.attrs, ctx)
            known[node.outputs[0].name] = out
            meta[node.outputs[0].name] = _meta(out)
            folded += 1
            continue
        foldable = (opdef.kind != "control" and node.op not in NOT_FOLDABLE and not any(node.subgraphs())
                    and all(v is None or v.name in known for v in ins))
        if foldable:
            try:
                out = opdef.call([known[v.name] if v is not None else None for v in ins], node.attrs, ctx)
            except Exception:
                out = None  # let the run report it, with the node's name
            outs = list(out) if isinstance(out, tuple) else [out]
            if out is not None and all(isinstance(t, torch.Tensor) for t in outs[: len(node.outputs)]):
                # small results are shape arithmetic (kept on the host); large ones are data that
                # depends only on shapes (masks, position ids): computed once, kept on the device
                for o, t in zip(node.outputs, outs):
                    if o.name in masks and _masks_nothing(t):
                        no_op_masks.add(o.name)
                    if t.numel() <= HOST_LIMIT:
                        known[o.name] = t
                    else:
                        big[o.name] = t.to(device)
                    meta[o.name] = _meta(t)
                folded += 1
                continue
        # a node that touches data: runs on the device
        keys: list[Optional[str]] = []
        args: list[Any] = []
        for i, v in enumerate(ins):
            if v is None or (i == 3 and node.op == "Attention" and v.name in no_op_masks):
                keys.append(None)
                args.append(None)
            elif i in opdef.host_inputs and v.name in known:
                # shape parameters are read on the host: constants too (their device copy would sync)
                keys.append(v.name + "@host" if v.name in graph.initializers else v.name)
                args.append(known[v.name])
            elif v.name in known and v.name not in graph.initializers:
                keys.append(v.name + "@dev")
                args.append(_meta(known[v.name]))
            else:
                keys.append(v.name)
                args.append(meta.get(v.name))
                if i in opdef.host_inputs:
                    reasons.append(f"node '{node.name}' ({node.op}) reads a shape parameter computed from data")
        runtime.append((node, opdef, keys))
        if opdef.kind == "control" or any(node.subgraphs()):
            reasons.append(f"node '{node.name}' ({node.op}) is control flow")
        out_meta = None
        if all(a is not None or k is None for a, k in zip(args, keys)):  # k None: no input, or a dropped mask
            # the graph's own shapes when they are known for this signature; running an op on meta
            # tensors costs more (and conv's meta kernel imports torch._dynamo: seconds, once)
            out_meta = _declared_outputs(node, dims) if dims is not None else None
            if out_meta is None:
                try:
                    out_meta = opdef.call(args, node.attrs, ctx)
                except Exception:
                    out_meta = None
        if out_meta is None:
            reasons.append(f"node '{node.name}' ({node.op}) has data-dependent output shapes")
        outs = list(out_meta) if isinstance(out_meta, tuple) else [out_meta]
        for j, o in enumerate(node.outputs):
            t = outs[j] if j < len(outs) else None
            meta[o.name] = _meta(t) if isinstance(t, torch.Tensor) else None

    steps = [Step(n, d, keys, [o.name for o in n.outputs]) for n, d, keys in runtime]
    host: dict[str, torch.Tensor] = {}
    for s in steps:
        for k in s.inputs:
            if k is None:
                continue
            if k.endswith("@dev"):
                host[k] = known[k[:-4]].to(device)
            elif k.endswith("@host"):
                host[k] = known[k[:-5]]
            elif k in known and k not in graph.initializers:
                host[k] = known[k]
        for sg in s.node.subgraphs():  # subgraphs read outer values by name, as data
            for v in sg.captured_values():
                if v.name in known and v.name not in graph.initializers:
                    host.setdefault(v.name, known[v.name].to(device))
    host.update(big)
    for v in graph.outputs:
        if v.name in known:
            host[v.name] = known[v.name].to(device)
    assign_frees(graph, steps)
    shapes = {k: tuple(t.shape) for k, t in meta.items() if isinstance(t, torch.Tensor)}
    return Specialization(signature_of(graph, feeds), steps, host, shapes, not reasons, reasons, folded)


def assign_frees(graph: Graph, steps: list[Step]) -> None:
    """Free each value after its last use among the steps (graph outputs are kept)."""
    for s in steps:
        s.free_after = []
    keep = {v.name for v in graph.outputs}
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for k in s.inputs:
            if k is not None:
                last[k] = i
        for sg in s.node.subgraphs():
            for v in sg.captured_values():
                last[v.name] = i
    produced = {o for s in steps for o in s.outputs} | {v.name for v in graph.inputs}
    for k, i in last.items():
        if k in produced and k not in keep:
            steps[i].free_after.append(k)


def fuse_steps(graph: Graph, spec: Specialization, kernels: dict) -> int:
    """Replace the steps of each fusion group by one step running its generated kernel.

    ``kernels``: group id -> kernel with ``.nodes``, ``.inputs`` (Values) and ``.output``. A group
    is fused only when all its nodes are device steps of this signature. Returns groups fused.
    """
    by_node = {id(s.node): i for i, s in enumerate(spec.steps)}
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
        assign_frees(graph, spec.steps)
    return fused
