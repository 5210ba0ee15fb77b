"""Vendor tactics through torch: cuDNN convolutions (channels-last, fused bias+ReLU), cuBLASLt GEMMs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..ir.graph import Node
from ..ops.fused import epilogue
from . import tactic


def _conv_geometry(node: Node) -> "tuple[list[int], list[int], list[int]] | None":
    """(stride, padding, dilation) for a 2-D conv with symmetric explicit padding, else None."""
    a = node.attrs
    w = node.inputs[1]
    if w is None or w.shape is None or len(w.shape) != 4 or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    pads = list(a.get("pads") or [0, 0, 0, 0])
    if a.get("auto_pad") == "VALID":
        pads = [0, 0, 0, 0]
    if len(pads) != 4 or pads[:2] != pads[2:]:
        return None
    return list(a.get("strides") or [1, 1]), pads[:2], list(a.get("dilations") or [1, 1])


def _vendor_conv_activation(act: str) -> bool:
    """An epilogue cuDNN conv tactics take (as one torch kernel after the conv): OpDef.epilogue.vendor_conv."""
    if not act:
        return True
    from ..ops import get, known_ops

    return act in known_ops() and get(act).epilogue is not None and get(act).epilogue.vendor_conv


def _is_cuda_conv(node: Node, device: torch.device) -> bool:
    return device.type == "cuda" and _conv_geometry(node) is not None and \
        (node.op == "Conv" or _vendor_conv_activation(node.attrs.get("activation", "")))


def _channels_last_weights(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    w = node.inputs[1]
    if w is not None and w.name in consts and consts[w.name].dim() == 4:
        return {1: (w.name + "@nhwc", consts[w.name].contiguous(memory_format=torch.channels_last))}
    return {}


_HAS_FUSED_RELU = hasattr(torch, "cudnn_convolution_relu")


@tactic("cudnn.conv_nhwc", ("Conv", "ember.Conv"), _is_cuda_conv, prepare=_channels_last_weights)
def cudnn_conv(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    residual = args[3] if len(args) > 3 else None
    node_geom = attrs["_geometry"]
    stride, padding, dilation = node_geom
    groups = attrs.get("group", 1)
    x = x.contiguous(memory_format=torch.channels_last)
    act = attrs.get("activation", "")
    after = attrs.get("act_after_residual", 0)
    if act == "Relu" and _HAS_FUSED_RELU and x.dtype == w.dtype:
        # cuDNN's fused epilogues: relu(conv + bias) and relu(conv + z + bias), one kernel each
        if residual is None:
            return torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
        if after and residual.dtype == x.dtype:
            z = residual.contiguous(memory_format=torch.channels_last)
            return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return vendor_epilogue(y, residual, act, attrs.get("act_keys"), attrs.get("act_values"), after)


def _is_cuda_linear(node: Node, device: torch.device) -> bool:
    b = node.inputs[1]
    return (device.type == "cuda" and b is not None and b.is_const and b.shape is not None and len(b.shape) == 2
            and node.inputs[0] is not None and node.inputs[0].rank is not None and node.inputs[0].rank >= 2)


def _linear_weights(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """Store B as [N, K] contiguous, the layout cuBLASLt's fastest path (and F.linear) takes."""
    b = node.inputs[1]
    if b.name not in consts:
        raise ValueError(f"node '{node.name}': weight '{b.name}' is not a constant")
    w = consts[b.name]
    return {1: (b.name + "@nk", (w if node.attrs.get("trans_b", 0) else w.t()).contiguous())}


@tactic("cublaslt.linear", ("ember.Gemm",), _is_cuda_linear, prepare=_linear_weights)
def cublas_linear(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    a, w_nk = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    residual = args[3] if len(args) > 3 else None
    alpha = attrs.get("alpha", 1.0)
    if alpha != 1.0:
        a = a * alpha
    act = attrs.get("activation", "")
    after = attrs.get("act_after_residual", 0)
    lead, n = a.shape[:-1], w_nk.shape[0]
    a2 = a.reshape(-1, a.shape[-1])  # leading dims folded into M: one 2-D GEMM
    if bias is None and act in ("Relu", "Gelu") and not (after and residual is not None):
        bias = _zeros(n, a.dtype, a.device)  # the fused bias+activation epilogue needs a bias
    if bias is not None and bias.dim() == 1:
        bias = bias.to(a.dtype)
        gelu_ok = act == "Gelu" and a.dtype in (torch.float16, torch.bfloat16)
        if (act == "Relu" or gelu_ok) and not (after and residual is not None):
            # cuBLASLt bias+activation epilogue: one kernel. Its GELU is the tanh form: in fp16/bf16
            # engines only, where its distance to erf-GELU (< 3e-4 absolute) is below the storage
            # precision; fp32 engines keep the exact erf form as a separate kernel.
            y = torch._addmm_activation(bias, a2, w_nk.t(), use_gelu=gelu_ok).view(*lead, n)
            return y if residual is None else y.add_(residual.to(y.dtype))
        y = torch.addmm(bias, a2, w_nk.t()).view(*lead, n)  # cuBLASLt bias epilogue
    else:
        y = torch.mm(a2, w_nk.t()).view(*lead, n)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return vendor_epilogue(y, residual, act, attrs.get("act_keys"), attrs.get("act_values"), after)


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached zero bias (made during warm-up, so never inside a CUDA-graph capture)."""
    key = (n, dtype, device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros(n, dtype=dtype, device=device)
    return z


def bind(node: Node, name: str) -> dict[str, Any]:
    """Extra attributes a tactic needs, computed once per node (kept out of the graph's attrs)."""
    if name == "cudnn.conv_nhwc":
        return {"_geometry": _conv_geometry(node)}
    return {}


def _sdpa_static_ok(node: Node) -> bool:
    """What can be decided from attributes alone: no KV cache, no debug output, no softcap/windows."""
    a = node.attrs
    ins = node.inputs + [None] * (7 - len(node.inputs))
    if len(node.outputs) != 1 or any(ins[i] is not None for i in (4, 5, 6)):
        return False
    return not (a.get("qk_matmul_output_mode", 0) or a.get("softcap", 0.0) or a.get("left_window_size", -1) != -1
                or a.get("right_window_size", -1) != -1)


def _is_sdpa_attention(node: Node, device: torch.device) -> bool:
    """Attention that torch's fused SDPA kernels (flash / memory-efficient / cuDNN) compute exactly.
    Shapes the graph does not know statically are checked at run time (reference otherwise)."""
    return device.type == "cuda" and _sdpa_static_ok(node)


def _sdpa_runtime_ok(q: torch.Tensor, k: torch.Tensor, mask: Any, attrs: dict) -> bool:
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        return False
    if q.dim() == 3 and not (attrs.get("q_num_heads") and attrs.get("kv_num_heads")):
        return False
    kv_len = k.shape[-2] if q.dim() == 4 else k.shape[1]
    q_len = q.shape[-2] if q.dim() == 4 else q.shape[1]
    causal = attrs.get("is_causal", 0)
    if mask is not None and (causal or mask.dim() == 0 or mask.shape[-1] != kv_len):
        return False
    return not (causal and q_len != kv_len)  # ONNX aligns the causal frontier differently then


@tactic("sdpa", ("Attention",), _is_sdpa_attention)
def sdpa_attention(args: list, attrs: dict, ctx: Any) -> Any:
    q, k, v = args[0], args[1], args[2]
    mask = args[3] if len(args) > 3 else None
    if not _sdpa_runtime_ok(q, k, mask, attrs):
        from ..ops import get

        return get("Attention").fn(*args, **{n: attrs[n] for n in attrs if n in get("Attention").attrs})[0]
    three_d = q.dim() == 3
    if three_d:
        b, sq, _ = q.shape
        hq, hkv = attrs["q_num_heads"], attrs["kv_num_heads"]
        q = q.view(b, sq, hq, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], hkv, -1).transpose(1, 2)
        v = v.view(b, v.shape[1], hkv, -1).transpose(1, 2)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(attrs.get("is_causal", 0)),
                                       scale=attrs.get("scale"), enable_gqa=q.shape[1] != k.shape[1])
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y


# -- epilogue activations as single torch kernels (fp16/bf16 in, fp32 math inside) -------------------
def fast_activation(y: torch.Tensor, act: str, keys: Any, values: Any) -> "torch.Tensor | None":
    """One-kernel activation (the op's OpDef.epilogue.torch), or None to use the reference function."""
    from ..ops import get, known_ops

    spec = get(act).epilogue if act in known_ops() else None
    if spec is None or spec.torch is None:
        return None
    return spec.torch(y, dict(zip(keys or [], values or [])))


def vendor_epilogue(y: torch.Tensor, residual: Any, act: str, keys: Any, values: Any, after: int) -> torch.Tensor:
    if act and not (after and residual is not None):
        fast = fast_activation(y, act, keys, values)
        if fast is not None:
            return fast if residual is None else fast.add_(residual.to(fast.dtype))
    if act and after and residual is not None:
        y = y.add_(residual.to(y.dtype))
        fast = fast_activation(y, act, keys, values)
        if fast is not None:
            return fast
        return epilogue(y, None, act, keys, values, 0)
    return epilogue(y, residual, act, keys, values, after)


# -- normalizations: torch's fused kernels (one launch, fp32 statistics) -----------------------------
def _is_last_axis_norm(node: Node, device: torch.device) -> bool:
    x = node.inputs[0]
    if device.type != "cuda" or len(node.outputs) != 1 or x is None or x.rank is None:
        return False
    axis = node.attrs.get("axis", -1) % x.rank
    scale = node.inputs[1]
    return node.attrs.get("stash_type", 1) == 1 and scale is not None and scale.shape is not None \
        and len(scale.shape) == x.rank - axis and all(v is None or v.is_const for v in node.inputs[1:])


def _norm_params_like_input(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """Scale and bias in the input's dtype, as torch's kernels take them."""
    dt = node.inputs[0].dtype
    from ..ops.torch_types import to_torch

    out = {}
    for i, v in enumerate(node.inputs[1:], start=1):
        if v is not None and v.name in consts and dt is not None:
            out[i] = (f"{v.name}@{dt.value}", consts[v.name].to(to_torch(dt)))
    return out


@tactic("torch.layer_norm", ("LayerNormalization",), _is_last_axis_norm, prepare=_norm_params_like_input)
def torch_layer_norm(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    x, scale = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    return F.layer_norm(x, tuple(scale.shape), scale, b, attrs.get("epsilon", 1e-5))


@tactic("torch.rms_norm", ("RMSNormalization",), _is_last_axis_norm, prepare=_norm_params_like_input)
def torch_rms_norm(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    x, scale = args[0], args[1]
    return F.rms_norm(x, tuple(scale.shape), scale, attrs.get("epsilon", 1e-5))
