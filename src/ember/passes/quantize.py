"""Q/DQ insertion as a rule set: a calibrated INT8/FP8 build writes its choices in the graph the way an
explicitly quantized model does, and the same rules (qdq.py) turn both into quantized anchors.

For each layer of the plan (an anchor with ``OpDef.quant``), the rule rewrites

    y = Conv(x, W, b)   ->   y = Conv(DQ(Q(x * smooth, s)), DQ(W_q, s_w, axis), b)

with the activation's calibrated per-tensor scale ``s`` (zero point 0: symmetric), the weight's
per-output-channel scales, and SmoothQuant's per-input-channel multiplier when the plan has one
(its inverse is already in ``W_q``). :func:`quantize_layers` then runs the fold rules, which put
the Q/DQ pairs into ember.QConv / ember.QGemm and requantize between consecutive quantized layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..ir.dtypes import DTYPE_TO_ONNX, DType
from ..ir.graph import Graph
from ..ops import get
from .qdq import fold_rules
from .rewrite import Editor, Match, P, Rule, apply_rules


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: the activation's scale, the quantized weight (int8, or E4M3 as an
    ml_dtypes array) with one scale per output channel along ``axis``, and the smoothing multiplier."""

    act_scale: float
    weight: np.ndarray
    weight_scale: np.ndarray
    axis: int
    smooth: Optional[np.ndarray] = None

    @property
    def fp8(self) -> bool:
        return self.weight.dtype.name == "float8_e4m3fn"


def _insert(plan: dict[str, LayerPlan], top: set[int]):
    done: set[str] = set()

    def wants(v, m: Match) -> bool:
        n = v.producer
        return n is not None and id(n) in top and n.name in plan and n.name not in done

    def build(ed: Editor, m: Match):
        node = m["y"].producer
        spec = get(node.op).quant
        lp = plan[node.name]
        a, w = get(node.op).position(spec.activations[0]), get(node.op).position(spec.weight)
        x = node.inputs[a]
        if lp.smooth is not None:
            c = ed.const(lp.smooth.astype(np.float32 if x.dtype == DType.FLOAT32 else np.float16), x.name + "/smooth")
            x = ed.out("Mul", [x, c], name=x.name + "/smoothed")
        scale = ed.const(np.asarray(lp.act_scale, np.float32), x.name + "/scale")
        if lp.fp8:
            q = ed.out("QuantizeLinear", [x, scale], {"output_dtype": DTYPE_TO_ONNX[DType.FLOAT8E4M3]},
                       name=x.name + "/q")
            dq = ed.out("DequantizeLinear", [q, scale], name=x.name + "/dq")
        else:
            zp = ed.const(np.zeros((), np.int8), "zero_point")
            q = ed.out("QuantizeLinear", [x, scale, zp], name=x.name + "/q")
            dq = ed.out("DequantizeLinear", [q, scale, zp], name=x.name + "/dq")
        wname = node.inputs[w].name
        wq = ed.const(lp.weight, wname + "/quantized")
        ws = ed.const(lp.weight_scale.astype(np.float32), wname + "/scale")
        wdq = ed.out("DequantizeLinear", [wq, ws], {"axis": lp.axis}, name=wname + "/dq")
        ins = list(node.inputs)
        ins[a], ins[w] = dq, wdq
        done.add(node.name)
        return ed.out(node.op, ins, dict(node.attrs), name=m["y"].name, like=m["y"])

    return Rule("quantize_layer", P.any("y", where=wants), build, exclusive=False)


def quantize_layers(graph: Graph, plan: dict[str, LayerPlan], log: Optional[list[str]] = None) -> None:
    """Insert the plan's Q/DQ pairs, then fold them (and requantization, epilogues) into quantized anchors."""
    apply_rules(graph, [_insert(plan, {id(n) for n in graph.nodes})], log)
    for _ in range(4):  # a fold can enable another (an activation after a requantized anchor's producer...)
        if not apply_rules(graph, fold_rules(), log):
            break
