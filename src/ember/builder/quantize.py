"""An INT8/FP8 build from calibration data: calibrate, decide which layers stay in floating point,
write the Q/DQ pairs into the graph and fold them into quantized anchors.

    optimized fp32 graph --calibrate (quant/collect.py; cached: quant/cache.py)--> activation ranges
        --per-channel weights (quant/calibrators.py), SmoothQuant factors-------> a plan per layer
        --accuracy budget (quant/accuracy.py): most sensitive layers kept float--> the plan, trimmed
        --passes/quantize.py: Q/DQ pairs, folded into ember.QConv / ember.QGemm--> the quantized graph

The float layers then follow the build's precision (fp16/bf16 builds convert them as usual).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import EmberError
from ..ir.dtypes import to_numpy
from ..ir.graph import Graph
from ..passes.precision import KeptLayer
from ..passes.quantize import LayerPlan, quantize_layers
from ..quant import accuracy, cache
from ..quant.calibrators import quantize_weight, scale_of
from ..quant.collect import Calibration, Layer, activation_key, calibrate, describe, graph_digest, quantizable_layers
from ..quant.data import CalibrationError, InputSpec, open_source
from .fidelity import clone_graph
from .progress import report as send_progress

log = logging.getLogger(__name__)
QTYPES = ("int8", "fp8")
# INT8: MSE had the best mean cosine to fp32 over seven corpus CNNs (0.988; entropy 0.981, its worst
# case 0.970 where entropy clipped a ReLU's long tail at a quarter of its range) and the digits CNN;
# FP8's 3 mantissa bits want the whole range (docs/quantization.md)
DEFAULT_METHOD = {"int8": "mse", "fp8": "minmax"}
HOLDOUT = 0.2  # of the calibration batches, held out for the accuracy budget when no other data is given


@dataclass
class CalibrationOptions:
    """How calibration data is read (quant/data.py)."""

    batch_size: int = 8
    preprocess: Any = None  # images: an ImagePreprocess or its text form
    tokenizer: Optional[str] = None  # text: tokenizer.json (or its folder)
    seq_len: int = 128
    accuracy_data: Any = None  # held-out data for the accuracy budget (default: part of the calibration data)


@dataclass
class QuantizedBuild:
    graph: Graph
    kept: list[KeptLayer]
    manifest: dict[str, Any]
    calibration: Calibration
    budget: Optional[accuracy.BudgetResult] = None
    layers: list[str] = field(default_factory=list)  # the layers quantized


def input_specs(graph: Graph) -> list[InputSpec]:
    return [InputSpec(v.name, np.dtype(to_numpy(v.dtype)), tuple(d if isinstance(d, int) else None
                                                               for d in (v.shape or ()))) for v in graph.inputs]


def plan_layers(graph: Graph, layers: list[Layer], cal: Calibration) -> dict[str, LayerPlan]:
    """Each layer's activation scale and per-channel quantized weight (SmoothQuant's factor in it)."""
    nodes = {n.name: n for n in graph.nodes}
    plan = {}
    for layer in layers:
        w = graph.initializers[layer.weight].data.astype(np.float32)
        smooth = cal.smooth.get(layer.node)
        if smooth is not None:  # the weight's input channels carry s = 1 / smooth
            trans = nodes[layer.node].attrs.get("trans_b", 0)
            s = (1.0 / smooth.astype(np.float64))
            w = (w * (s[None, :] if trans else s[:, None])).astype(np.float32)
        qw = quantize_weight(w, layer.weight_axis, cal.qtype)
        amax = cal.amax.get(activation_key(layer, cal))
        if amax is None:
            raise CalibrationError(f"calibration has no range for '{layer.value}', the input of layer "
                                   f"'{layer.node}'; delete the calibration cache to calibrate again")
        plan[layer.node] = LayerPlan(scale_of(amax, cal.qtype), qw.data, qw.scale, layer.weight_axis, smooth)
    return plan


def quantized_graph(graph32: Graph, plan: dict[str, LayerPlan], quantized: set[str]) -> Graph:
    g = clone_graph(graph32)
    quantize_layers(g, {k: v for k, v in plan.items() if k in quantized})
    return g


def _split(batches: list[dict[str, np.ndarray]], fraction: float, batch_size: int) -> tuple[list, list]:
    """(calibration batches, held-out batches): the last ``fraction`` of the samples held out."""
    if not batches:
        return [], []
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(next(iter(arrays.values())))
    held = round(n * fraction)
    if n < 2 or held < 1:
        raise CalibrationError(f"the accuracy budget holds out {fraction:.0%} of the calibration samples, and "
                               f"{n} sample(s) leave none: give more samples, or --accuracy-data")

    def chunks(lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        return [{k: v[i:min(i + batch_size, hi)] for k, v in arrays.items()} for i in range(lo, hi, batch_size)]

    return chunks(0, n - held), chunks(n - held, n)


def build_quantized(graph32: Graph, qtype: str, device: torch.device, source: Any, *, method: Optional[str],
                    samples: Optional[int], cache_path: Optional[str], options: CalibrationOptions,
                    smooth_alpha: "float | str | None", budget: Optional[float],
                    progress: Optional[Callable[[str], None]] = None) -> QuantizedBuild:
    """Calibrate ``graph32`` (optimized, fp32) on ``source`` and quantize its layers to ``qtype``."""
    if qtype not in QTYPES:
        raise EmberError(f"quantization type '{qtype}' is not one of {', '.join(QTYPES)}")
    if qtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise EmberError("FP8 (E4M3) needs an Ada or Hopper GPU (compute capability 8.9 or later); this one is "
                         f"{torch.cuda.get_device_name(device)}. Build with --int8, or on the CPU to check the "
                         "numerics")
    if source is None:
        raise EmberError(f"--{qtype} needs calibration data: --calib DATA (a folder of .npz/.npy files or images, "
                         "one .npz, or a text file with --tokenizer)")
    method = method or DEFAULT_METHOD[qtype]
    layers = quantizable_layers(graph32)
    if not layers:
        raise EmberError(f"the model has no layer ember quantizes (Conv, Gemm/MatMul with constant weights): "
                         f"build it without --{qtype}")
    inputs = input_specs(graph32)
    held_out_of_calibration = budget is not None and options.accuracy_data is None
    if held_out_of_calibration and samples is not None:  # ``samples`` to calibrate on, and a fifth more to measure
        samples = math.ceil(samples / (1 - HOLDOUT))
    src = open_source(source, inputs, batch_size=options.batch_size, samples=samples,
                      preprocess=options.preprocess, tokenizer=options.tokenizer, seq_len=options.seq_len)
    held_batches: list = []
    calib_batches = src.batches
    if budget is not None:
        if options.accuracy_data is not None:
            held_batches = list(open_source(options.accuracy_data, inputs, batch_size=options.batch_size,
                                            preprocess=options.preprocess, tokenizer=options.tokenizer,
                                            seq_len=options.seq_len).batches())
        else:  # the last fifth of the samples read are held out (never calibrated on)
            calibration, held_batches = _split(list(src.batches()), HOLDOUT, options.batch_size)
            calib_batches = lambda: iter(calibration)  # noqa: E731

    def step(stage: str, done: int, total: int, item: str) -> None:
        send_progress(progress, stage, done, total, item)

    digest = graph_digest(graph32)
    data_key = None
    cal = None
    if cache_path:  # the cache holds for this graph and this data, read as it is read now
        data_key = hashlib.sha256(f"{src.fingerprint()}|samples={samples}|batch={options.batch_size}|"
                                  f"held_out={HOLDOUT if held_out_of_calibration else 0}".encode()).hexdigest()[:32]
        cal = cache.load(cache_path, digest, qtype, method, smooth_alpha, data=data_key)
        missing = [l.value for l in layers if cal is not None and activation_key(l, cal) not in cal.amax]
        if missing:
            log.warning("calibration cache %s has no range for %s; calibrating again and rewriting it", cache_path,
                        ", ".join(sorted(set(missing))[:4]))
            cal = None
    from_cache = cal is not None
    if cal is None:
        cal = calibrate(graph32, layers, calib_batches, device, method, qtype, smooth_alpha=smooth_alpha,
                        progress=step, total=samples or 0)
        if cache_path:
            cal.data = data_key or ""
            cache.save(cal, cache_path)
    plan = plan_layers(graph32, layers, cal)
    names = [l.node for l in layers]
    result = None
    quantized = set(names)
    if budget is not None:
        held = accuracy.HeldOut(graph32, held_batches, device)
        result = accuracy.fit_budget(names, lambda q: quantized_graph(graph32, plan, q), held, budget, step)
        quantized -= set(result.kept)
        if result.error > budget:
            log.warning("the %s engine is %.2e from fp32 on held-out data, over the budget %.1e", qtype, result.error,
                        budget)
    graph = quantized_graph(graph32, plan, quantized)
    ops = {l.node: l.op for l in layers}
    kept = [KeptLayer(n, ops[n], "sensitivity", accuracy.describe(n, s, budget, qtype))
            for n, s in (result.kept.items() if result else [])]
    manifest = {"type": qtype, "layers": len(quantized), "layers_total": len(layers),
                "calibration": {**describe(cal), "data": src.description, "kind": src.kind, "cached": from_cache,
                                "cache": cache_path, "graph": digest},
                "kept_layers": [str(k) for k in kept]}
    if result is not None:
        manifest["accuracy"] = {**result.to_json(), "held_out_samples": sum(len(next(iter(b.values())))
                                                                             for b in held_batches)}
    return QuantizedBuild(graph, kept, manifest, cal, result, sorted(quantized))
