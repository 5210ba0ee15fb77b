"""fp16/bf16 fidelity: find the layers whose reduced precision makes an engine drift from fp32, and
keep them in fp32 until the engine's outputs are within a budget of the fp32 graph's.

The budget is a relative L2 distance per float output, on the tuning inputs (default 1e-2;
``BuilderConfig.fidelity_budget``, ``ember build --fidelity-budget``, ``none`` to skip the check).

What drifts. Storage rounding of activations is noise that later layers average away; rounding
of a layer's *parameters* is the same error at every pixel, and what averages over pixels (the
global pooling of a squeeze-excitation gate, a norm's statistics) keeps it. On an OCR detector
(ppocrv6_tiny_det, 3.5e-2 from fp32 in fp16), rounding the weights and bias of one 1x1 conv alone
moved the output by 2e-2, while rounding every layer's activations moved it by 1e-3 each.

How the layers are found. To first order the output's drift is the sum of what each layer's
rounding contributes (measured on that detector: the two halves of the network in fp16 add up to
the whole within 9%). So one run with only a segment of layers (contiguous in graph order) in low
precision measures that segment's contribution. :class:`SegmentSearch` starts from the whole graph,
splits the segment that contributes most (one run measures the first half; the second half is the
difference), and keeps in fp32 the single layers, or, when its run budget is spent, the densest
segments, that bring the sum under the target. Each run uses the reference kernels; the engine
itself (its tactics, its fused kernels) is measured before and after.

Cost. The check itself is two runs (fp32 reference, engine). The search, only when the engine is
over budget, takes at most ``MAX_RUNS`` runs (and ``CPU_SECONDS`` on a CPU), then keeps segments
without splitting them further: more fp32 than needed, never over budget.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import EmberError
from ..ir.dtypes import DType
from ..ir.graph import Graph, Value
from .precision import convert_precision

log = logging.getLogger(__name__)
DEFAULT_BUDGET = 1e-2
MAX_RUNS = 64  # measurement runs of one search
CPU_SECONDS = 30.0  # a search on the CPU stops splitting after this long
TARGET = 0.7  # the search aims below budget * TARGET: headroom for what is not additive and for tactics


def parse_budget(value: Any) -> Optional[float]:
    """A relative L2 budget from a number or text; None (no check) for None, 'none' or 'off'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
        return None
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise EmberError(f"fidelity budget {value!r} is not a number; give a relative L2 distance such as "
                         "1e-2, or 'none' to skip the fp16/bf16 fidelity check") from None
    if not (budget > 0 and math.isfinite(budget)):
        raise EmberError(f"fidelity budget {value!r} must be a positive number (relative L2 distance "
                         "from fp32), or 'none' to skip the check")
    return budget


def clone_graph(graph: Graph, _values: "dict[int, Value] | None" = None) -> Graph:
    """A copy of ``graph`` (and its If/Loop/Scan bodies) to rewrite freely: new Graph, Node and Value
    objects (dims and constant arrays shared: never modified in place). Walks the nodes in a loop:
    copy.deepcopy recurses along producer links and overflows the stack on deep models (BERT)."""
    values = {} if _values is None else _values  # one map for every scope: bodies capture outer values

    def value(v: Optional[Value]) -> Optional[Value]:
        if v is None:
            return None
        nv = values.get(id(v))
        if nv is None:
            nv = values[id(v)] = copy.copy(v)
            nv.producer = None
        return nv

    def attr(a: Any) -> Any:
        if isinstance(a, Graph):
            return clone_graph(a, values)
        if isinstance(a, list) and a and all(isinstance(x, Graph) for x in a):
            return [clone_graph(x, values) for x in a]
        return copy.deepcopy(a)

    g = copy.copy(graph)
    g.inputs = [value(v) for v in graph.inputs]
    g.initializers = {k: value(v) for k, v in graph.initializers.items()}
    g.metadata = dict(graph.metadata)
    g.nodes = []
    for n in graph.nodes:
        nn = copy.copy(n)
        nn.inputs = [value(v) for v in n.inputs]
        nn.outputs = [value(o) for o in n.outputs]
        nn.attrs = {k: attr(a) for k, a in n.attrs.items()}
        nn.meta = dict(n.meta)
        for o in nn.outputs:
            o.producer = nn
        g.nodes.append(nn)
    g.outputs = [value(v) for v in graph.outputs]
    return g


Deltas = dict[str, torch.Tensor]  # output name -> (output - fp32 output) / |fp32 output|, flattened


class Reference:
    """The fp32 graph's float outputs on the tuning inputs (reference kernels, no TF32), and the
    relative distance of other runs' outputs from them."""

    def __init__(self, graph32: Graph, device: torch.device, feeds: dict[str, Any]):
        from ..runtime.interpreter import Interpreter

        self.outputs: dict[str, torch.Tensor] = {}
        self.norms: dict[str, float] = {}
        out = _run(Interpreter(graph32, device, fuse_groups=False), feeds)
        for name, t in out.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                ref = t.detach().reshape(-1).double()
                norm = float(ref.norm())
                if norm > 0 and math.isfinite(norm):
                    self.outputs[name], self.norms[name] = ref, norm

    def deltas(self, outputs: dict[str, Any]) -> Deltas:
        return {name: (outputs[name].detach().reshape(-1).double() - ref) / self.norms[name]
                for name, ref in self.outputs.items()}


def size(d: Deltas) -> float:
    """The largest output drift in ``d`` (inf if any is not finite)."""
    worst = 0.0
    for t in d.values():
        n = float(t.norm())
        worst = max(worst, n if math.isfinite(n) else math.inf)
    return worst


def drift(d: Deltas) -> dict[str, float]:
    return {k: (float(t.norm()) if math.isfinite(float(t.norm())) else math.inf) for k, t in d.items()}


def _run(interp: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    from .tuner import tf32_mode

    with torch.inference_mode(), tf32_mode(False):
        return interp.run(feeds)


def measure_engine(graph: Graph, device: torch.device, feeds: dict[str, Any], ref: Reference) -> Deltas:
    """The built graph (its tactics, its fused kernels) against the fp32 reference."""
    from ..runtime.interpreter import Interpreter

    return ref.deltas(_run(Interpreter(graph, device), feeds))


@dataclass
class SegmentSearch:
    """Which layers to keep in fp32 so that the engine's outputs are within a target of fp32's.

    The search goes in rounds. A round starts from the layers kept so far (``kept``) and the drift
    measured with them (``whole``), and splits the remaining low-precision layers into segments
    until the contributions it leaves are under the target (:meth:`round`). What is not additive
    shows in the next round's measurement: a value rounded at a boundary between a kept layer and
    a low one (its producer kept fp32, a consumer still reading it in fp16) is found then.
    """

    graph32: Graph
    low: DType
    device: torch.device
    feeds: dict[str, Any]
    ref: Reference
    layers: list[str]  # the layers that may compute in low precision, in graph order
    max_runs: int = MAX_RUNS
    seconds: float = math.inf
    runs: int = 0
    _weights: dict[str, torch.Tensor] = field(default_factory=dict)  # device copies shared by every run
    _start: float = field(default_factory=time.perf_counter)

    def measure(self, low_layers: "list[str] | set[str]") -> Deltas:
        """One run with only ``low_layers`` in low precision (reference kernels)."""
        from ..runtime.interpreter import Interpreter

        self.runs += 1
        low = set(low_layers)
        g = clone_graph(self.graph32)
        convert_precision(g, self.low, {n: ("accuracy", "") for n in self.layers if n not in low})
        interp = Interpreter(g, self.device, weights=self._weights, fuse_groups=False)
        self._weights.update(interp.consts)
        return self.ref.deltas(_run(interp, self.feeds))

    def can_run(self) -> bool:
        return self.runs < self.max_runs and time.perf_counter() - self._start < self.seconds

    def round(self, kept: "set[str] | dict[str, Any]", whole: Deltas, target: float) -> dict[str, float]:
        """Layers to keep besides ``kept`` (with the drift their segment contributed) so that the
        others' contributions sum to at most ``target``; ``whole``: the drift with ``kept`` in fp32."""
        order = [n for n in self.layers if n not in kept]
        segments: dict[tuple[int, int], Deltas] = {(0, len(order)): whole} if order else {}
        found: dict[str, float] = {}
        while segments and size(_sum(segments.values())) > target:
            splittable = self.can_run()
            if splittable:  # split what contributes most
                (a, b), d = max(segments.items(), key=lambda kv: size(kv[1]))
            else:  # no runs left: keep what removes most drift per layer
                (a, b), d = max(segments.items(), key=lambda kv: size(kv[1]) / (kv[0][1] - kv[0][0]))
            del segments[(a, b)]
            if b - a > 1 and splittable:
                m = (a + b) // 2
                left = self.measure(order[a:m])
                right = _sub(d, left)
                if not math.isfinite(size(right)) and self.can_run():  # an overflow: measure, don't subtract
                    right = self.measure(order[m:b])
                segments[(a, m)], segments[(m, b)] = left, right
            else:
                found.update({n: size(d) for n in order[a:b]})
        return found


def _sum(ds: Any) -> Deltas:
    out: Deltas = {}
    for d in ds:
        for k, t in d.items():
            out[k] = t.clone() if k not in out else out[k] + t
    return out


def _sub(a: Deltas, b: Deltas) -> Deltas:
    return {k: a[k] - b[k] for k in a}


def describe(contribution: float, budget: float) -> str:
    shown = "overflow" if not math.isfinite(contribution) else f"{contribution:.1e}"
    return f"output drift {shown} from its rounding (budget {budget:.0e})"
