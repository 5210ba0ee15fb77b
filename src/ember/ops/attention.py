"""Attention family: scaled dot-product Attention (ONNX opset 23-25), RotaryEmbedding, LinearAttention.

Attention follows the ONNX reference exactly where the spec is subtle:
- the causal and sliding-window masks are bottom-right aligned: query i sees key j iff
  j <= i + offset, offset = past length (internal cache) or nonpad_kv_seqlen - q_len per batch
  (external cache);
- a query row whose whole additive bias is -inf produces zeros (Y and the mode-3 probabilities),
  never NaN; the decision is taken on the bias, not on the (possibly NaN) logits;
- softcap is applied before the bias, so masked logits stay -inf.
The plain cases (no mask beyond top-left causal, no softcap, no debug output) go through torch SDPA,
which is what the vendor tactic will run on the GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ir.dtypes import ONNX_TO_DTYPE
from ..ir.graph import Node
from .infer import TypeInfo, same_as_input
from .registry import op, shape_rule
from .torch_types import to_torch

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """fp16/bf16 math runs in fp32 (DESIGN: FP32 accumulation); fp32/fp64 run as they are."""
    return torch.float32 if dt in _HALF else dt


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hd = x.shape
    return x.reshape(b, s, num_heads, hd // num_heads).transpose(1, 2)


def _attention_bias(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device,
                    attn_mask: Optional[torch.Tensor], is_causal: bool, offset: "int | torch.Tensor",
                    left_window: int, right_window: int,
                    nonpad_kv_seqlen: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The additive bias (broadcastable to (B, H, q, kv)) that all masks compose to; None if no mask."""
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)  # a fill kernel: CUDA-graph safe
    zero = torch.zeros((), dtype=dtype, device=device)
    bias: Optional[torch.Tensor] = None
    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]
        if pad > 0:  # a mask shorter than the total sequence is padded with "masked"
            fill = False if attn_mask.dtype == torch.bool else float("-inf")
            attn_mask = torch.nn.functional.pad(attn_mask, (0, pad), value=fill)
        if attn_mask.dtype == torch.bool:
            bias = torch.where(attn_mask, zero, neg_inf)  # select, not multiply: 0 * -inf is NaN
        else:
            bias = attn_mask.to(dtype)
    windowed = left_window >= 0 or right_window >= 0
    if is_causal or windowed:
        i = torch.arange(q_len, device=device).reshape(q_len, 1)
        j = torch.arange(kv_len, device=device).reshape(1, kv_len)
        if isinstance(offset, torch.Tensor):  # per-batch frontier: (B, 1, q, kv)
            pos = i + offset.to(torch.int64).reshape(-1, 1, 1, 1)
        else:
            pos = i + offset
        diff = pos - j  # how far key j lies behind the query's absolute position
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if is_causal:
            allowed = allowed & (diff >= 0)
        if left_window >= 0:
            allowed = allowed & (diff <= left_window)
        if right_window >= 0:
            allowed = allowed & (-diff <= right_window)
        frontier = torch.where(allowed, zero, neg_inf)
        bias = frontier if bias is None else bias + frontier
    if nonpad_kv_seqlen is not None:
        j = torch.arange(kv_len, device=device)
        valid = j < nonpad_kv_seqlen.to(device=device, dtype=torch.int64).reshape(-1, 1)
        padding = torch.where(valid, zero, neg_inf).reshape(-1, 1, 1, kv_len)
        bias = padding if bias is None else bias + padding
    return bias


def _safe_softmax(x: torch.Tensor, rnd=None, storage: Optional[torch.dtype] = None) -> torch.Tensor:
    """Softmax whose all -inf rows give 0 instead of NaN.

    rnd, when given, rounds every step to the storage type, as the spec's function body computes
    in fp16/bf16 (numpy sums fp16 in fp32 but bf16 element by element in bf16)."""
    row_max = x.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    if rnd is None:
        e = torch.exp(x - row_max)
        s = e.sum(dim=-1, keepdim=True)
        return e / torch.where(s == 0, torch.ones_like(s), s)
    e = rnd(torch.exp(rnd(x - row_max)))
    if storage == torch.bfloat16:
        s = torch.zeros_like(row_max)
        for j in range(e.shape[-1]):
            s = rnd(s + e[..., j:j + 1])
    else:
        s = rnd(e.sum(dim=-1, keepdim=True))
    return rnd(e / torch.where(s == 0, torch.ones_like(s), s))


@op("Attention", kind="anchor", low_precision=("Q", "K", "V", "attn_mask", "past_key", "past_value"))
def attention(Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *,
              is_causal: int = 0, kv_num_heads: Optional[int] = None, q_num_heads: Optional[int] = None,
              qk_matmul_output_mode: int = 0, scale: Optional[float] = None, softcap: float = 0.0,
              softmax_precision: Optional[int] = None, left_window_size: int = -1,
              right_window_size: int = -1, ctx=None):
    """Scaled dot-product attention (MHA/GQA/MQA) with optional KV cache and debug QK output."""
    out_dtype = Q.dtype
    rank3 = Q.dim() == 3
    if rank3:
        if q_num_heads is None or kv_num_heads is None:
            raise ValueError("Attention with 3-D inputs needs q_num_heads and kv_num_heads")
        Q, K, V = _split_heads(Q, q_num_heads), _split_heads(K, kv_num_heads), _split_heads(V, kv_num_heads)
    present_key = K if past_key is None else torch.cat([past_key, K], dim=2)
    present_value = V if past_value is None else torch.cat([past_value, V], dim=2)
    batch, q_heads, q_len, head_size = Q.shape
    kv_heads, kv_len = present_key.shape[1], present_key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_size)
    wants_qk = ctx is not None and ctx.num_outputs >= 4
    if past_key is not None:
        offset: "int | torch.Tensor" = past_key.shape[2]
    elif nonpad_kv_seqlen is not None:
        offset = nonpad_kv_seqlen.reshape(-1) - q_len
    else:
        offset = 0

    cdt = _compute_dtype(out_dtype)
    if softmax_precision is not None:
        sm_dt = to_torch(ONNX_TO_DTYPE[int(softmax_precision)])
        cdt = torch.float64 if sm_dt == torch.float64 or cdt == torch.float64 else cdt
    q, k, v = Q.to(cdt), present_key.to(cdt), present_value.to(cdt)

    plain = (attn_mask is None and nonpad_kv_seqlen is None and left_window_size < 0 and right_window_size < 0
             and softcap <= 0 and not wants_qk and softmax_precision is None
             and (not is_causal or offset == 0) and q_heads % kv_heads == 0)
    if plain and (Q.is_cuda or out_dtype not in _HALF):
        y = torch.nn.functional.scaled_dot_product_attention(
            Q if Q.is_cuda else q, present_key if Q.is_cuda else k, present_value if Q.is_cuda else v,
            is_causal=bool(is_causal), scale=float(scale), enable_gqa=q_heads != kv_heads)
        return _finish(y.to(out_dtype), rank3, present_key, present_value, None)

    # The spec's function body computes every step in the input type. On the CPU, fp16/bf16 steps run
    # in fp32 and are rounded back after each one, which reproduces the spec's numbers to the bit in
    # practice; on the GPU the reference keeps fp32 throughout, as the fused kernels do.
    emulate_storage = out_dtype in _HALF and not Q.is_cuda

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype).to(cdt) if emulate_storage else t

    if q_heads != kv_heads:  # GQA: each KV head serves q_heads // kv_heads consecutive query heads
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)
    # scale both sides by sqrt(scale), as the spec does, against overflow; the factor is of type T
    root = float(rnd(torch.tensor(math.sqrt(scale), dtype=cdt)))
    scores = rnd(torch.matmul(rnd(q * root), rnd(k * root).transpose(-1, -2)))
    if softcap > 0:
        scores = rnd(softcap * rnd(torch.tanh(rnd(scores / softcap))))
    qk_out = scores
    bias = _attention_bias(q_len, kv_len, cdt, Q.device, attn_mask, bool(is_causal), offset,
                           left_window_size, right_window_size, nonpad_kv_seqlen)
    logits = scores if bias is None else rnd(scores + rnd(bias))
    if qk_matmul_output_mode == 2:
        qk_out = logits
    if softmax_precision is not None:
        logits = logits.to(sm_dt)
        emulate = sm_dt in _HALF and not Q.is_cuda
        probs = _safe_softmax(logits.to(_compute_dtype(sm_dt)),
                              (lambda t: t.to(sm_dt).to(torch.float32)) if emulate else None, sm_dt)
    else:
        probs = _safe_softmax(logits, rnd if emulate_storage else None, out_dtype)
    probs = probs.to(cdt)
    if bias is not None:
        # a row with no attendable key (decided on the bias, not on NaN-able logits) is all zeros
        fully_masked = torch.isneginf(bias.amax(dim=-1, keepdim=True))
        probs = torch.where(fully_masked, torch.zeros((), dtype=cdt, device=Q.device), probs)
    if qk_matmul_output_mode == 3:
        qk_out = probs
    # the spec casts the probabilities to the output type before the second matmul
    y = torch.matmul(rnd(probs), v).to(out_dtype)
    qk = qk_out.to(out_dtype).expand(batch, q_heads, q_len, kv_len) if wants_qk else None
    return _finish(y, rank3, present_key, present_value, qk)


def _finish(y: torch.Tensor, rank3: bool, present_key, present_value, qk):
    if rank3:  # (B, H, S, Dv) -> (B, S, H*Dv)
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y, present_key, present_value, qk


@shape_rule("Attention")
def _attention_shape(node: Node) -> list[TypeInfo]:
    Q, K, V = node.inputs[:3]
    past = node.inputs[4] if len(node.inputs) > 4 else None
    dt = Q.dtype
    if Q.shape is None or K.shape is None or V.shape is None:
        return [(dt, None)] * len(node.outputs)
    if len(Q.shape) == 3:
        hq, hkv = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
        batch, q_len = Q.shape[0], Q.shape[1]
        kv_len, head, v_head = K.shape[1], K.shape[2] // hkv, V.shape[2] // hkv
        y = (batch, q_len, hq * v_head)
    else:
        batch, hq, q_len = Q.shape[:3]
        hkv, kv_len, head, v_head = K.shape[1], K.shape[2], K.shape[3], V.shape[3]
        y = (batch, hq, q_len, v_head)
    total = kv_len
    if past is not None:
        if past.shape is None:
            total = None
        else:
            total = past.shape[2] + kv_len
    out: list[TypeInfo] = [(dt, y)]
    out.append((dt, None if total is None else (batch, hkv, total, head)))
    out.append((dt, None if total is None else (batch, hkv, total, v_head)))
    out.append((dt, None if total is None else (batch, hq, q_len, total)))
    return out[: len(node.outputs)]


@op("RotaryEmbedding", kind="other", low_precision=("X", "cos_cache", "sin_cache"))
def rotary_embedding(X, cos_cache, sin_cache, position_ids=None, *, interleaved: int = 0,
                     num_heads: int = 0, rotary_embedding_dim: int = 0):
    """RoPE on (B, H, S, D) or (B, S, H*D) input; rotates the first rotary_embedding_dim features."""
    out_dtype = X.dtype
    cdt = _compute_dtype(out_dtype)
    if X.dim() == 4:
        x = X.transpose(1, 2)  # (B, S, H, D)
    else:
        if not num_heads:
            raise ValueError("RotaryEmbedding with a 3-D input needs the num_heads attribute")
        b, s, hidden = X.shape
        x = X.reshape(b, s, num_heads, hidden // num_heads)
    x = x.to(cdt)
    head_size = x.shape[-1]
    rot = rotary_embedding_dim or head_size
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids.long()], sin_cache[position_ids.long()]
    cos = cos_cache.to(cdt).unsqueeze(2)  # (B, S, 1, rot/2)
    sin = sin_cache.to(cdt).unsqueeze(2)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rotated = torch.stack([real, imag], dim=-1).reshape(x_rot.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    y = torch.cat([rotated, x_pass], dim=-1).to(out_dtype)
    return y.transpose(1, 2) if X.dim() == 4 else y.reshape(X.shape)


shape_rule("RotaryEmbedding")(same_as_input(0))


@op("LinearAttention", kind="anchor")
def linear_attention(query, key, value, past_state=None, decay=None, beta=None, *, chunk_size: int = 64,
                     kv_num_heads: int, q_num_heads: int, scale: float = 0.0,
                     update_rule: str = "gated_delta"):
    """Recurrent linear attention (linear / gated / delta / gated_delta), run token by token in fp32.

    chunk_size is a tuning hint of chunk-parallel kernels; it never changes the result.
    """
    if update_rule not in ("linear", "gated", "delta", "gated_delta"):
        raise ValueError(f"LinearAttention: unknown update_rule '{update_rule}'")
    gated = update_rule in ("gated", "gated_delta")
    delta = update_rule in ("delta", "gated_delta")
    if gated and decay is None or delta and beta is None:
        raise ValueError(f"LinearAttention: update_rule '{update_rule}' needs "
                         f"{'decay' if gated and decay is None else 'beta'}")
    f32 = torch.float32
    b, t, _ = query.shape
    d_k = query.shape[-1] // q_num_heads
    d_v = value.shape[-1] // kv_num_heads
    group = q_num_heads // kv_num_heads
    q = _split_heads(query, q_num_heads).to(f32)
    k = _split_heads(key, kv_num_heads).to(f32)
    v = _split_heads(value, kv_num_heads).to(f32)
    if gated:
        if decay.shape[-1] == kv_num_heads:  # one decay per head: (B, T, H) -> (B, H, T, 1)
            g = decay.reshape(b, t, kv_num_heads, 1).transpose(1, 2).to(f32)
        else:  # one decay per key dim: (B, H, T, d_k)
            g = _split_heads(decay, kv_num_heads).to(f32)
    if delta:
        beta4 = beta.reshape(b, t, beta.shape[-1], 1).transpose(1, 2).to(f32)  # (B, H|1, T, 1)
    state_dtype = past_state.dtype if past_state is not None else query.dtype
    state = (past_state.to(f32).clone() if past_state is not None
             else torch.zeros(b, kv_num_heads, d_k, d_v, dtype=f32, device=query.device))
    scale_val = scale if scale else 1.0 / math.sqrt(d_k)
    outs = []
    for i in range(t):
        k_t, v_t = k[:, :, i], v[:, :, i]
        if gated:
            state = state * torch.exp(g[:, :, i]).unsqueeze(-1)
        if delta:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = beta4[:, :, i] * (v_t - retrieved)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = state if group == 1 else state.repeat_interleave(group, dim=1)
        outs.append(scale_val * torch.einsum("bhd,bhdm->bhm", q[:, :, i], read))
    out = torch.stack(outs, dim=2)  # (B, Hq, T, d_v)
    out = out.transpose(1, 2).reshape(b, t, q_num_heads * d_v).to(query.dtype)
    return out, state.to(state_dtype)


@shape_rule("LinearAttention")
def _linear_attention_shape(node: Node) -> list[TypeInfo]:
    q, _, v = node.inputs[:3]
    hq, hkv = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
    past = node.inputs[3] if len(node.inputs) > 3 else None
    if q.shape is None or v.shape is None:
        return [(q.dtype, None), (past.dtype if past is not None else q.dtype, None)]
    d_k, d_v = q.shape[2] // hq, v.shape[2] // hkv
    state_dtype = past.dtype if past is not None else q.dtype
    return [(q.dtype, (q.shape[0], q.shape[1], hq * d_v)), (state_dtype, (q.shape[0], hkv, d_k, d_v))]

