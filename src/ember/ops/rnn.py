"""Recurrent ops: RNN, GRU, LSTM (ONNX layout: Y (S, D, B, H) or batch-first with layout=1), and
CausalConvWithState (the stateful depthwise conv of Mamba / Gated DeltaNet).

The recurrences run one time step at a time in the compute dtype (fp32 for fp16/bf16), with
sequence_lens honoured: past its length a batch row keeps its state and writes zeros to Y.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ir.graph import Node
from .infer import TypeInfo
from .registry import op, shape_rule

_HALF = (torch.float16, torch.bfloat16)

# name -> (function(x, alpha, beta), default alpha, default beta); None = the function takes no such parameter
_ACTIVATIONS: dict[str, tuple[Callable, Optional[float], Optional[float]]] = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: torch.where(x >= 0, x, a * (torch.exp(x) - 1)), 1.0, None),
    "softsign": (lambda x, a, b: x / (1 + torch.abs(x)), None, None),
    "softplus": (lambda x, a, b: torch.nn.functional.softplus(x), None, None),
}

Act = Callable[[torch.Tensor], torch.Tensor]


def _activations(names: list[str], alphas: Optional[list[float]], betas: Optional[list[float]]) -> list[Act]:
    """Bind activation names to functions. activation_alpha/beta are consumed in order by the
    functions that take a parameter (the onnxruntime convention)."""
    alpha_iter, beta_iter = iter(alphas or []), iter(betas or [])
    out: list[Act] = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(f"unknown recurrent activation '{name}'")
        fn, da, db = _ACTIVATIONS[key]
        a = next(alpha_iter, da) if da is not None else None
        b = next(beta_iter, db) if db is not None else None
        out.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    return out


class _Recurrence:
    """What RNN, GRU and LSTM share: layout, directions, sequence lengths, initial states."""

    def __init__(self, X, W, sequence_lens, states: list, direction: str, layout: int, hidden: int):
        self.out_dtype = X.dtype
        self.cdt = torch.float32 if X.dtype in _HALF else X.dtype
        if layout:  # batch-first: X (B, S, I), states (B, D, H)
            X = X.transpose(0, 1)
            states = [s.transpose(0, 1) if s is not None else None for s in states]
        self.X = X.to(self.cdt)
        self.seq, self.batch = X.shape[0], X.shape[1]
        self.num_dirs = 2 if direction == "bidirectional" else 1
        if W.shape[0] != self.num_dirs:
            raise ValueError(f"direction '{direction}' needs W with {self.num_dirs} directions, got {W.shape[0]}")
        self.reverse_first = direction == "reverse"
        self.layout = layout
        self.hidden = hidden
        self.states = [
            (s.to(self.cdt) if s is not None
             else torch.zeros(self.num_dirs, self.batch, hidden, dtype=self.cdt, device=X.device))
            for s in states
        ]
        self.lens = sequence_lens.to(device=X.device, dtype=torch.int64) if sequence_lens is not None else None

    def run(self, cell: Callable[[int, torch.Tensor, list], list]) -> tuple:
        """cell(direction, x_t, states) -> new states (the first one is h). Returns (Y, *final states)."""
        ys, finals = [], []
        for d in range(self.num_dirs):
            reverse = self.reverse_first or d == 1
            states = [s[d] for s in self.states]
            y = [None] * self.seq
            steps = range(self.seq - 1, -1, -1) if reverse else range(self.seq)
            for t in steps:
                new = cell(d, self.X[t], states)
                if self.lens is not None:  # rows past their length keep their state, output zeros
                    live = (t < self.lens).reshape(-1, 1)
                    new = [torch.where(live, n, s) for n, s in zip(new, states)]
                    y[t] = torch.where(live, new[0], torch.zeros_like(new[0]))
                else:
                    y[t] = new[0]
                states = new
            ys.append(torch.stack(y, dim=0))  # (S, B, H)
            finals.append(states)
        Y = torch.stack(ys, dim=1)  # (S, D, B, H)
        outs = [torch.stack([f[i] for f in finals], dim=0) for i in range(len(self.states))]  # (D, B, H)
        if self.layout:
            Y = Y.permute(2, 0, 1, 3)
            outs = [o.transpose(0, 1) for o in outs]
        return (Y.to(self.out_dtype), *[o.to(self.out_dtype) for o in outs])


def _clip(x: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    return x if clip is None else torch.clamp(x, -clip, clip)


def _bias(B, num_dirs: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(D, 2*size): input bias and recurrence bias, summed where the cell allows it."""
    if B is None:
        return torch.zeros(num_dirs, 2 * size, dtype=like.dtype, device=like.device)
    return B.to(like.dtype)


@op("RNN", kind="anchor")
def rnn(X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha: Optional[list] = None,
        activation_beta: Optional[list] = None, activations: list = ("Tanh", "Tanh"), clip: Optional[float] = None,
        direction: str = "forward", hidden_size: Optional[int] = None, layout: int = 0):
    """Elman RNN: H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)."""
    hidden = R.shape[-1]
    rec = _Recurrence(X, W, sequence_lens, [initial_h], direction, layout, hidden)
    acts = _activations(list(activations), activation_alpha, activation_beta)
    W, R = W.to(rec.cdt), R.to(rec.cdt)
    bias = _bias(B, rec.num_dirs, hidden, rec.X)
    b = bias[:, :hidden] + bias[:, hidden:]
    f = [acts[d] if d < len(acts) else acts[0] for d in range(rec.num_dirs)]

    def cell(d, x, states):
        (h,) = states
        return [f[d](_clip(x @ W[d].T + h @ R[d].T + b[d], clip))]

    return rec.run(cell)


@op("GRU", kind="anchor")
def gru(X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha: Optional[list] = None,
        activation_beta: Optional[list] = None, activations: Optional[list] = None, clip: Optional[float] = None,
        direction: str = "forward", hidden_size: Optional[int] = None, layout: int = 0,
        linear_before_reset: int = 0):
    """GRU with gates z, r, h (ONNX order); linear_before_reset applies r after the recurrence matmul."""
    hidden = R.shape[-1]
    rec = _Recurrence(X, W, sequence_lens, [initial_h], direction, layout, hidden)
    names = list(activations) if activations else ["Sigmoid", "Tanh"] * rec.num_dirs
    acts = _activations(names, activation_alpha, activation_beta)
    W, R = W.to(rec.cdt), R.to(rec.cdt)
    bias = _bias(B, rec.num_dirs, 3 * hidden, rec.X)
    wb, rb = bias[:, : 3 * hidden], bias[:, 3 * hidden:]
    H = hidden

    def cell(d, x, states):
        (h,) = states
        f, g = acts[2 * d], acts[2 * d + 1]
        xw = x @ W[d].T + wb[d]  # (B, 3H): z, r, h
        hr = h @ R[d].T  # (B, 3H)
        z = f(_clip(xw[:, :H] + hr[:, :H] + rb[d, :H], clip))
        r = f(_clip(xw[:, H:2 * H] + hr[:, H:2 * H] + rb[d, H:2 * H], clip))
        if linear_before_reset:
            pre = xw[:, 2 * H:] + r * (hr[:, 2 * H:] + rb[d, 2 * H:])
        else:
            pre = xw[:, 2 * H:] + (r * h) @ R[d, 2 * H:].T + rb[d, 2 * H:]
        n = g(_clip(pre, clip))
        return [(1 - z) * n + z * h]

    return rec.run(cell)


@op("LSTM", kind="anchor")
def lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         activation_alpha: Optional[list] = None, activation_beta: Optional[list] = None,
         activations: Optional[list] = None, clip: Optional[float] = None, direction: str = "forward",
         hidden_size: Optional[int] = None, input_forget: int = 0, layout: int = 0):
    """LSTM with gates i, o, f, c (ONNX order), optional peepholes P (i, o, f) and coupled input-forget."""
    hidden = R.shape[-1]
    rec = _Recurrence(X, W, sequence_lens, [initial_h, initial_c], direction, layout, hidden)
    names = list(activations) if activations else ["Sigmoid", "Tanh", "Tanh"] * rec.num_dirs
    acts = _activations(names, activation_alpha, activation_beta)
    W, R = W.to(rec.cdt), R.to(rec.cdt)
    bias = _bias(B, rec.num_dirs, 4 * hidden, rec.X)
    b = bias[:, : 4 * hidden] + bias[:, 4 * hidden:]
    peep = (P.to(rec.cdt) if P is not None
            else torch.zeros(rec.num_dirs, 3 * hidden, dtype=rec.cdt, device=rec.X.device))
    H = hidden

    def cell(d, x, states):
        h, c = states
        f, g, hact = acts[3 * d], acts[3 * d + 1], acts[3 * d + 2]
        gates = x @ W[d].T + h @ R[d].T + b[d]
        p_i, p_o, p_f = peep[d, :H], peep[d, H:2 * H], peep[d, 2 * H:]
        inp = f(_clip(gates[:, :H] + p_i * c, clip))
        # input_forget couples the gates as onnxruntime does: the forget gate is 1 - input gate
        forget = 1 - inp if input_forget else f(_clip(gates[:, 2 * H:3 * H] + p_f * c, clip))
        cand = g(_clip(gates[:, 3 * H:], clip))
        c_new = forget * c + inp * cand
        o = f(_clip(gates[:, H:2 * H] + p_o * c_new, clip))
        return [o * hact(c_new), c_new]

    return rec.run(cell)


@shape_rule("RNN", "GRU", "LSTM")
def _recurrent_shape(node: Node) -> list[TypeInfo]:
    X, W, R = node.inputs[:3]
    dt = X.dtype
    if X.shape is None or W.shape is None or R.shape is None:
        return [(dt, None)] * len(node.outputs)
    dirs, hidden = W.shape[0], R.shape[-1]
    if node.attrs.get("layout", 0):
        batch, seq = X.shape[0], X.shape[1]
        y, state = (batch, seq, dirs, hidden), (batch, dirs, hidden)
    else:
        seq, batch = X.shape[0], X.shape[1]
        y, state = (seq, dirs, batch, hidden), (dirs, batch, hidden)
    return [(dt, y), (dt, state), (dt, state)][: len(node.outputs)]


@op("CausalConvWithState", kind="anchor")
def causal_conv_with_state(input, weight, bias=None, past_state=None, *, activation: str = "none"):
    """Depthwise causal conv1d over (B, C, L) whose left context is past_state (zeros if absent);
    returns the output and the last k-1 positions of the padded input as the next state."""
    if activation not in ("none", "silu", "swish"):
        raise ValueError(f"CausalConvWithState: unknown activation '{activation}'")
    b, c, _ = input.shape
    k = weight.shape[2]
    if past_state is None:
        past_state = torch.zeros(b, c, k - 1, dtype=input.dtype, device=input.device)
    padded = torch.cat([past_state.to(input.dtype), input], dim=2)
    cdt = torch.float32 if input.dtype in _HALF else input.dtype
    y = torch.nn.functional.conv1d(padded.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt),
                                   groups=c)
    y = y.to(input.dtype)
    if activation != "none":
        y32 = y.to(cdt)
        y = (y32 * torch.sigmoid(y32)).to(input.dtype)
    return y, padded[:, :, padded.shape[2] - (k - 1):]


@shape_rule("CausalConvWithState")
def _causal_conv_shape(node: Node) -> list[TypeInfo]:
    x, w = node.inputs[:2]
    if x.shape is None or w.shape is None:
        return [(x.dtype, x.shape), (x.dtype, None)]
    return [(x.dtype, x.shape), (x.dtype, (x.shape[0], x.shape[1], w.shape[2] - 1))]

