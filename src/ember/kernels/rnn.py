"""Recurrent tactics: an ONNX LSTM as torch's fused RNN (cuDNN on a GPU).

The reference LSTM loops over time steps in Python, a handful of kernels per step: on an OCR
recognizer with 80 steps that is most of the run, even in a CUDA graph. cuDNN runs the whole
sequence, both directions, in a few kernels. Gates are stored in ONNX order (i, o, f, c); torch's RNN
wants (i, f, c, o): the weights are reordered once, when the engine binds the tactic.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Node
from . import tactic

_TORCH_ORDER = (0, 2, 3, 1)  # ONNX gate blocks i, o, f, c -> torch's i, f, g (the cell input), o


def _name(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _plain_lstm(node: Node, device: torch.device) -> bool:
    """An LSTM torch's RNN computes exactly: default activations, no clip, no coupled gates, no
    peepholes, every sequence full length, forward or bidirectional, constant weights."""
    a = node.attrs
    direction = _name(a.get("direction", "forward"))
    if device.type != "cuda" or direction not in ("forward", "bidirectional"):
        return False
    dirs = 2 if direction == "bidirectional" else 1
    acts = a.get("activations")
    if acts and [_name(x) for x in acts] != ["Sigmoid", "Tanh", "Tanh"] * dirs:
        return False
    if a.get("clip") is not None or a.get("input_forget", 0) or a.get("activation_alpha") or a.get("activation_beta"):
        return False
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    if ins[4] is not None or ins[7] is not None:  # sequence_lens, peepholes
        return False
    return all(v is not None and v.is_const for v in ins[1:3]) and (ins[3] is None or ins[3].is_const)


def _reorder(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[dirs, 4H, ...] in ONNX gate order -> torch's order."""
    return torch.cat([t[:, k * hidden:(k + 1) * hidden] for k in _TORCH_ORDER], dim=1).contiguous()


def _prepare(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    W, R = consts[node.inputs[1].name], consts[node.inputs[2].name]
    hidden = R.shape[-1]
    out = {1: (node.inputs[1].name + "@lstm_ifgo", _reorder(W, hidden)),
           2: (node.inputs[2].name + "@lstm_ifgo", _reorder(R, hidden))}
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        B = consts[node.inputs[3].name]
        b = torch.cat([_reorder(B[:, :4 * hidden], hidden), _reorder(B[:, 4 * hidden:], hidden)], dim=1)
        out[3] = (node.inputs[3].name + "@lstm_ifgo", b)
    return out


@tactic("cudnn.lstm", ("LSTM",), _plain_lstm, prepare=_prepare)
def cudnn_lstm(args: list, attrs: dict, ctx: Any) -> tuple:
    args = list(args) + [None] * (8 - len(args))
    X, W, R, B, _, h0, c0 = args[:7]
    layout = attrs.get("layout", 0)
    dirs, hidden = W.shape[0], R.shape[-1]
    seq, batch = (X.shape[0], X.shape[1]) if layout == 0 else (X.shape[1], X.shape[0])
    dt = X.dtype
    params = []
    for d in range(dirs):
        params += [W[d].to(dt), R[d].to(dt)]
        if B is not None:
            params += [B[d, :4 * hidden].to(dt), B[d, 4 * hidden:].to(dt)]
    h = (h0 if layout == 0 else h0.transpose(0, 1)) if h0 is not None else X.new_zeros(dirs, batch, hidden)
    c = (c0 if layout == 0 else c0.transpose(0, 1)) if c0 is not None else X.new_zeros(dirs, batch, hidden)
    out, hn, cn = torch._VF.lstm(X, (h.to(dt).contiguous(), c.to(dt).contiguous()), params, B is not None, 1, 0.0,
                                 False, dirs == 2, layout == 1)
    if layout == 0:  # ONNX Y: [seq, dirs, batch, hidden]
        return out.view(seq, batch, dirs, hidden).permute(0, 2, 1, 3), hn, cn
    return out.view(batch, seq, dirs, hidden), hn.transpose(0, 1), cn.transpose(0, 1)


__all__ = ["cudnn_lstm"]
