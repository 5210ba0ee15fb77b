"""Control flow: If, Loop, Scan, SequenceMap. Bodies are IR subgraphs run through ``ctx.run_graph``.

Bodies read outer-scope values by reference; the interpreter gives each run of a body a scope
chained to the caller's. Loop-carried values may be tensors, sequences (lists) or optionals.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.graph import Graph
from .infer import fresh_dim
from .registry import OpContext, op, shape_rule
from .torch_types import to_torch


def _truth(t: torch.Tensor) -> bool:
    return bool(t.reshape(-1)[0].item())


def _stack(parts: list, dtype_hint, device) -> torch.Tensor:
    if parts:
        return torch.stack(parts, 0)
    dtype = to_torch(dtype_hint) if dtype_hint is not None else torch.float32
    return torch.zeros((0,), dtype=dtype, device=device)


@op("If", kind="control")
def if_(cond, *, then_branch: Graph, else_branch: Graph, ctx: OpContext):
    return tuple(ctx.run_graph(then_branch if _truth(cond) else else_branch, []))


@op("Loop", kind="control")
def loop(M=None, cond=None, *v_initial, body: Graph, ctx: OpContext):
    device = M.device if M is not None else (cond.device if cond is not None else torch.device("cpu"))
    trip_count = int(M.reshape(()).item()) if M is not None else None
    keep_going = _truth(cond) if cond is not None else True
    carried = list(v_initial)
    n_scan = ctx.num_outputs - len(carried)
    scans: list[list] = [[] for _ in range(n_scan)]
    i = 0
    cond_value = torch.tensor(keep_going, dtype=torch.bool, device=device)
    while keep_going and (trip_count is None or i < trip_count):
        outs = ctx.run_graph(body, [torch.tensor(i, dtype=torch.int64, device=device), cond_value, *carried])
        cond_value = outs[0]
        carried = list(outs[1:1 + len(carried)])
        for s, v in zip(scans, outs[1 + len(carried):]):
            s.append(v)
        keep_going = _truth(cond_value) if cond is not None or M is None else True
        i += 1
    hints = ctx.output_dtypes[len(carried):] if ctx.output_dtypes else [None] * n_scan
    return tuple(carried) + tuple(_stack(s, h, device) for s, h in zip(scans, hints))


@op("Scan", kind="control")
def scan(*initial_state_and_scan_inputs, body: Graph, num_scan_inputs: int,
         scan_input_axes: Optional[list[int]] = None, scan_input_directions: Optional[list[int]] = None,
         scan_output_axes: Optional[list[int]] = None, scan_output_directions: Optional[list[int]] = None,
         ctx: OpContext):
    values = list(initial_state_and_scan_inputs)
    n_state = len(values) - num_scan_inputs
    states, xs = values[:n_state], values[n_state:]
    in_axes = [a + x.dim() if a < 0 else a for a, x in zip(scan_input_axes or [0] * len(xs), xs)]
    in_dirs = scan_input_directions or [0] * len(xs)
    length = xs[0].shape[in_axes[0]] if xs else 0
    n_out = ctx.num_outputs - n_state
    collected: list[list] = [[] for _ in range(n_out)]
    for t in range(length):
        slices = [x.select(a, length - 1 - t if d else t) for x, a, d in zip(xs, in_axes, in_dirs)]
        outs = ctx.run_graph(body, [*states, *slices])
        states = list(outs[:n_state])
        for c, v in zip(collected, outs[n_state:]):
            c.append(v)
    out_axes = scan_output_axes or [0] * n_out
    out_dirs = scan_output_directions or [0] * n_out
    device = xs[0].device if xs else torch.device("cpu")
    hints = ctx.output_dtypes[n_state:] if ctx.output_dtypes else [None] * n_out
    results = []
    for parts, a, d, h in zip(collected, out_axes, out_dirs, hints):
        if d:
            parts = parts[::-1]
        y = _stack(parts, h, device)
        if parts:
            rank = y.dim()
            y = y.movedim(0, a + rank if a < 0 else a)
        results.append(y)
    return tuple(states) + tuple(results)


@op("SequenceMap", kind="control")
def sequence_map(input_sequence, *additional_inputs, body: Graph, ctx: OpContext):
    outs: list[list] = [[] for _ in range(ctx.num_outputs)]
    for i, first in enumerate(input_sequence):
        args = [first] + [a[i] if isinstance(a, list) else a for a in additional_inputs]
        for o, v in zip(outs, ctx.run_graph(body, args)):
            o.append(v)
    return tuple(outs)


# -- shape rules: output types come from the bodies' declared outputs ------------------------------
@shape_rule("If")
def if_rule(node) -> list:
    then_outs, else_outs = node.attrs["then_branch"].outputs, node.attrs["else_branch"].outputs
    out = []
    for t, e in zip(then_outs, else_outs):
        shape = t.shape if t.shape == e.shape else (
            tuple(a if a == b else fresh_dim() for a, b in zip(t.shape, e.shape))
            if t.shape is not None and e.shape is not None and len(t.shape) == len(e.shape) else None)
        out.append((t.dtype or e.dtype, shape))
    return out


@shape_rule("Loop")
def loop_rule(node) -> list:
    body_outs = node.attrs["body"].outputs[1:]
    n_carried = len(node.inputs) - 2
    out = [(v.dtype, v.shape) for v in node.inputs[2:]]
    for v in body_outs[n_carried:]:
        out.append((v.dtype, (fresh_dim(),) + tuple(v.shape) if v.shape is not None else None))
    return out


@shape_rule("Scan")
def scan_rule(node) -> list:
    n_scan = node.attrs["num_scan_inputs"]
    n_state = len(node.inputs) - n_scan
    xs = node.inputs[n_state:]
    in_axes = node.attrs.get("scan_input_axes") or [0] * n_scan
    length = None
    if xs and xs[0].shape is not None:
        a = in_axes[0]
        length = xs[0].shape[a + len(xs[0].shape) if a < 0 else a]
    out = [(v.dtype, v.shape) for v in node.inputs[:n_state]]
    body_outs = node.attrs["body"].outputs[n_state:]
    out_axes = node.attrs.get("scan_output_axes") or [0] * len(body_outs)
    for v, a in zip(body_outs, out_axes):
        if v.shape is None or length is None:
            out.append((v.dtype, None))
            continue
        shape = list(v.shape)
        shape.insert(a + len(shape) + 1 if a < 0 else a, length)
        out.append((v.dtype, tuple(shape)))
    return out
