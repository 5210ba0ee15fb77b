"""Calibration: run the fp32 graph on sample inputs and collect the range of every tensor that an
INT8/FP8 layer quantizes; with SmoothQuant, the per-channel ranges first.

The layers are the graph's anchors whose op says how it quantizes (``OpDef.quant``) and whose
weight is a constant: their activation input is quantized per tensor, their weight per output
channel. Layers that read the same tensor share its statistics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..ir.graph import Graph, Node
from ..ops import get, known_ops
from .calibrators import ChannelMaxCollector, collector_for, compute_amax
from .data import CalibrationError

log = logging.getLogger(__name__)
Progress = Optional[Callable[[str, int, int, str], None]]  # (stage, done, total, item)


@dataclass(frozen=True)
class Layer:
    """A layer an INT8/FP8 engine may quantize."""

    node: str
    op: str
    value: str  # the activation input's name
    position: int  # its input position
    weight: str  # the weight constant's name
    weight_axis: int  # the weight's output-channel axis
    gemm: bool  # a GEMM (may be smoothed: its activation's channels are the last axis)


def quantizable_layers(graph: Graph) -> list[Layer]:
    """The main graph's anchors with a quantized form, a float activation and a constant float weight."""
    out = []
    for n in graph.nodes:
        spec = get(n.op).quant if n.op in known_ops() else None
        if spec is None or any(n.subgraphs()):
            continue
        d = get(n.op)
        a, w = d.position(spec.activations[0]), d.position(spec.weight)
        if len(n.inputs) <= w or n.inputs[a] is None or n.inputs[w] is None:
            continue
        x, wv = n.inputs[a], n.inputs[w]
        if x.dtype is None or not x.dtype.is_float or wv.data is None or wv.dtype is None or not wv.dtype.is_float:
            continue
        if wv.data.ndim < 2 or x.shape is None or not x.shape:
            continue
        if n.op == "ember.Gemm" and wv.data.ndim != 2:
            continue
        out.append(Layer(n.name, n.op, x.name, a, wv.name, spec.weight_axis(n.attrs) % wv.data.ndim,
                         n.op == "ember.Gemm"))
    return out


def graph_digest(graph: Graph) -> str:
    """A hash of the graph the calibration ran on: its structure and its weights (a cache made for
    another graph, or another export of the same model, is stale)."""
    from ..ir.serialize import graph_to_json

    doc, arrays = graph_to_json(graph)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.view(np.uint8).reshape(-1).tobytes() if a.size else b"")
    return h.hexdigest()[:32]


@dataclass
class Calibration:
    """What calibration found: the range of each quantized activation, and SmoothQuant's factors."""

    qtype: str  # "int8" | "fp8"
    method: str
    samples: int
    graph: str  # graph_digest of the graph it ran on
    amax: dict[str, float] = field(default_factory=dict)  # activation value -> range
    smooth: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> per-input-channel multiplier
    smooth_alpha: "float | str | None" = None
    seconds: float = 0.0
    data: str = ""  # the calibration data's fingerprint (quant/data.py), which the cache is keyed on


def _weight_channel_max(graph: Graph, layer: Layer, node: Node) -> np.ndarray:
    """max |W| over the output channels, per input channel (the GEMM's K)."""
    w = np.abs(graph.initializers[layer.weight].data.astype(np.float64))
    return w.max(axis=0) if node.attrs.get("trans_b") else w.max(axis=1)


# what "auto" smoothing uses: on MiniLM (all-MiniLM-L6-v2), INT8 with entropy calibration gives a mean
# cosine of 0.958 to fp32 unsmoothed, 0.963 with alpha 0.5 and 0.9965 with 0.8 (docs/quantization.md)
AUTO_ALPHA = 0.8


def smoothing_factors(graph: Graph, layers: list[Layer], channel_max: dict[str, torch.Tensor],
                      alpha: "float | str") -> dict[str, np.ndarray]:
    """SmoothQuant: s_k = max|X_k|^alpha / max|W_k|^(1 - alpha) per input channel k; the activation is
    multiplied by 1/s (before quantizing) and the weight's row k by s. Returns layer -> 1/s
    (``alpha`` "auto": AUTO_ALPHA)."""
    a = AUTO_ALPHA if alpha == "auto" else float(alpha)
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for layer in layers:
        if not layer.gemm or layer.value not in channel_max:
            continue
        ax = channel_max[layer.value].double().numpy()
        aw = _weight_channel_max(graph, layer, nodes[layer.node])
        if ax.shape != aw.shape:
            continue
        s = np.power(np.maximum(ax, 1e-5), a) / np.power(np.maximum(aw, 1e-5), 1.0 - a)
        s = np.clip(s, 1e-4, 1e4)
        out[layer.node] = (1.0 / s).astype(np.float32)
    return out


def calibrate(graph: Graph, layers: list[Layer], batches: Callable[[], Iterable[dict[str, np.ndarray]]],
              device: torch.device, method: str, qtype: str, *, smooth_alpha: "float | str | None" = None,
              progress: Progress = None, total: int = 0) -> Calibration:
    """Run ``graph`` (fp32, reference kernels) over the calibration batches and compute each quantized
    activation's range with ``method``. With ``smooth_alpha`` (a number, or "auto"), a first pass
    collects per-channel maxima of the GEMMs' inputs for SmoothQuant, and the second collects the
    smoothed inputs (a graph without GEMMs needs no first pass)."""
    t0 = time.perf_counter()
    smooth: dict[str, np.ndarray] = {}
    if smooth_alpha is not None and any(l.gemm for l in layers):
        gemm_values = {l.value for l in layers if l.gemm}
        channel = _run(graph, layers, batches, device, {v: ChannelMaxCollector() for v in gemm_values}, {},
                       progress, total, "calibrate (SmoothQuant ranges)")[0]
        smooth = smoothing_factors(graph, layers, {k: c.amax for k, c in channel.items() if c.amax is not None},
                                   smooth_alpha)
    make = collector_for(method)
    # a smoothed layer's input is its own tensor (x / s), collected apart from the unsmoothed one
    keys = {l.node: (f"{l.value}@smooth:{l.node}" if l.node in smooth else l.value) for l in layers}
    collectors, seen = _run(graph, layers, batches, device, {k: make() for k in set(keys.values())}, smooth,
                            progress, total, "calibrate", keys)
    if seen == 0:
        raise CalibrationError("the calibration data gave no sample; check the path and --calib-samples")
    amax = {k: compute_amax(method, c, qtype) for k, c in collectors.items()}
    return Calibration(qtype, method, seen, graph_digest(graph), amax, smooth, smooth_alpha,
                       time.perf_counter() - t0)


def activation_key(layer: Layer, cal: Calibration) -> str:
    """The name calibration keeps a layer's activation range under."""
    return f"{layer.value}@smooth:{layer.node}" if layer.node in cal.smooth else layer.value


def _run(graph: Graph, layers: list[Layer], batches: Callable[[], Iterable[dict[str, np.ndarray]]],
         device: torch.device, collectors: dict[str, Any], smooth: dict[str, np.ndarray], progress: Progress,
         total: int, stage: str, keys: Optional[dict[str, str]] = None) -> tuple[dict[str, Any], int]:
    from ..runtime.interpreter import Interpreter

    interp = Interpreter(graph, device, fuse_groups=False)
    by_node: dict[str, list[tuple[int, str]]] = {}
    for layer in layers:
        key = keys[layer.node] if keys is not None else layer.value
        if key in collectors:
            by_node.setdefault(layer.node, []).append((layer.position, key))
    multipliers = {n: torch.from_numpy(s).to(device) for n, s in smooth.items()}
    done: set[tuple[str, str]] = set()  # (key, batch) pairs seen: a tensor several layers read counts once

    def on_step(step: Any, args: list) -> None:
        for pos, key in by_node.get(step.node.name, ()):
            if (key, batch_id[0]) in done or not isinstance(args[pos], torch.Tensor):
                continue
            done.add((key, batch_id[0]))
            x = args[pos]
            m = multipliers.get(step.node.name)
            collectors[key].update(x * m if m is not None else x)

    batch_id = [0]
    seen = 0
    interp.on_step = on_step
    try:
        with torch.inference_mode():
            for feeds in batches():
                batch_id[0] += 1
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
                try:
                    interp.run(tensors)
                except Exception as e:
                    raise CalibrationError(f"calibration batch {batch_id[0]} failed to run: {type(e).__name__}: {e}") \
                        from None
                seen += len(next(iter(feeds.values())))
                if progress is not None:
                    progress(stage, seen, max(total, seen), "")
    finally:
        interp.on_step = None
    return collectors, seen


def describe(cal: Calibration) -> dict[str, Any]:
    """The manifest's account of a calibration (ranges are in the calibration cache, not here)."""
    finite = [v for v in cal.amax.values() if math.isfinite(v)]
    return {"type": cal.qtype, "method": cal.method, "samples": cal.samples, "tensors": len(cal.amax),
            "smooth_alpha": cal.smooth_alpha, "smoothed_layers": len(cal.smooth),
            "amax_range": [round(min(finite), 6), round(max(finite), 6)] if finite else None,
            "seconds": round(cal.seconds, 3)}
