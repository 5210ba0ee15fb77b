"""ember's own fused IR ops: an anchor (GEMM, convolution) with its epilogue folded in.

    ember.Gemm(a, b, bias?, residual?)  y = act(alpha * a @ op(b) + bias) + residual
    ember.Conv(x, w, bias?, residual?)  y = act(conv(x, w) + bias) + residual

The epilogue order is the one models use: bias, then activation, then the residual add of a skip
connection. ``activation`` names an IR pointwise op (``Relu``, ``Gelu``, ``Clip``...), and its
attributes travel as two parallel lists (``act_keys``, ``act_values``) so the graph stays plain
JSON; ``Clip`` reads ``min``/``max`` from them. ``a`` may have any number of batch dims; ``b`` is
``[K, N]`` (``[N, K]`` with ``trans_b=1``) or batched like ``a``.
The optimizer creates these ops (ember.passes); the ONNX exporter writes them back as the
standard ops they stand for.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..ir.graph import Node, Value
from ..ir.shapes import broadcast_shapes
from .conv import CONV_QUANT
from .registry import OpContext, QuantSpec, get, op, shape_rule

CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def activation_attrs(keys: Optional[list], values: Optional[list]) -> dict[str, Any]:
    return dict(zip(keys or [], values or []))


def apply_activation(y: torch.Tensor, activation: str, keys: Optional[list], values: Optional[list]) -> torch.Tensor:
    if not activation:
        return y
    attrs = activation_attrs(keys, values)
    if activation == "Clip":
        return torch.clamp(y, attrs.get("min"), attrs.get("max"))
    return get(activation).call([y], attrs, OpContext(num_outputs=1))


@op("ember.Gemm", kind="anchor", low_precision="all",
    quant=QuantSpec(activations=("a",), weight="b", weight_axis=lambda attrs: 0 if attrs.get("trans_b") else 1,
                    quantized_op="ember.QGemm"))
def fused_gemm(a, b, bias=None, residual=None, *, trans_b: int = 0, alpha: float = 1.0, activation: str = "",
               act_keys: Optional[list] = None, act_values: Optional[list] = None, act_after_residual: int = 0):
    """GEMM over any batch rank with a bias / activation / residual epilogue."""
    if trans_b:
        b = b.transpose(-1, -2)
    y = get("MatMul").fn(a, b)
    if alpha != 1.0:
        y = y * alpha
    if bias is not None:
        y = y + bias.to(y.dtype)
    return epilogue(y, residual, activation, act_keys, act_values, act_after_residual)


def epilogue(y: torch.Tensor, residual: Optional[torch.Tensor], activation: str, keys: Optional[list],
             values: Optional[list], act_after_residual: int) -> torch.Tensor:
    if act_after_residual and residual is not None:
        return apply_activation(y + residual.to(y.dtype), activation, keys, values)
    y = apply_activation(y, activation, keys, values)
    return y if residual is None else y + residual.to(y.dtype)


@op("ember.Conv", kind="anchor", low_precision="all", quant=CONV_QUANT)
def fused_conv(x, w, bias=None, residual=None, *, auto_pad: str = "NOTSET", dilations: Optional[list] = None,
               group: int = 1, kernel_shape: Optional[list] = None, pads: Optional[list] = None,
               strides: Optional[list] = None, activation: str = "", act_keys: Optional[list] = None,
               act_values: Optional[list] = None, act_after_residual: int = 0):
    """Convolution with a bias / activation / residual epilogue."""
    y = get("Conv").fn(x, w, bias, auto_pad=auto_pad, dilations=dilations, group=group,
                       kernel_shape=kernel_shape, pads=pads, strides=strides)
    return epilogue(y, residual, activation, act_keys, act_values, act_after_residual)


@shape_rule("ember.Gemm")
def _gemm_shape(node: Node):
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
        return [(a.dtype if a is not None else None, None)]
    n = b.shape[-2] if node.attrs.get("trans_b") else b.shape[-1]
    batch = broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    return [(a.dtype, tuple(batch) + (a.shape[-2], n))]


@shape_rule("ember.Conv")
def _conv_shape(node: Node):
    base = Node("Conv", node.inputs[:3], [Value(node.outputs[0].name)],
                {k: v for k, v in node.attrs.items() if k in CONV_ATTRS})
    conv = get("Conv")
    if conv.shape_rule is not None:
        try:
            return conv.shape_rule(base)
        except Exception:
            pass
    from .infer import infer_by_meta

    return infer_by_meta(base) or [(node.inputs[0].dtype, None)]
