"""The cuDNN LSTM tactic computes ONNX's LSTM: gates reordered once, both directions, both layouts,
initial states or none, against the op's reference (float64 inputs on the CPU: torch's fused RNN runs
there too; on a GPU it is cuDNN, checked by the tuner's correctness gate before it is timed)."""
from __future__ import annotations

import pytest
import torch

from ember.kernels.rnn import _reorder, cudnn_lstm
from ember.ops import OpContext, get


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("with_bias_and_state", [True, False])
def test_cudnn_lstm_matches_the_reference(direction, layout, with_bias_and_state):
    g = torch.Generator().manual_seed(0)
    dirs, hidden, inp, seq, batch = (2 if direction == "bidirectional" else 1), 5, 7, 6, 3
    W = torch.randn(dirs, 4 * hidden, inp, generator=g, dtype=torch.float64) * 0.5
    R = torch.randn(dirs, 4 * hidden, hidden, generator=g, dtype=torch.float64) * 0.5
    B = torch.randn(dirs, 8 * hidden, generator=g, dtype=torch.float64) * 0.5 if with_bias_and_state else None
    X = torch.randn(*((seq, batch) if layout == 0 else (batch, seq)), inp, generator=g, dtype=torch.float64)
    st = (dirs, batch, hidden) if layout == 0 else (batch, dirs, hidden)
    h0 = torch.randn(*st, generator=g, dtype=torch.float64) if with_bias_and_state else None
    c0 = torch.randn(*st, generator=g, dtype=torch.float64) if with_bias_and_state else None
    attrs = {"direction": direction, "hidden_size": hidden, "layout": layout}
    want = get("LSTM").call([X, W, R, B, None, h0, c0, None], attrs, OpContext(num_outputs=3))
    Bp = None if B is None else torch.cat([_reorder(B[:, :4 * hidden], hidden), _reorder(B[:, 4 * hidden:], hidden)], 1)
    got = cudnn_lstm([X, _reorder(W, hidden), _reorder(R, hidden), Bp, None, h0, c0], attrs, None)
    for g_, w_ in zip(got, want):
        assert tuple(g_.shape) == tuple(w_.shape)
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-10)
