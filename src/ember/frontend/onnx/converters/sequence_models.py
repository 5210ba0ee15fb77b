"""Converters of the sequence-model and signal families (attention, recurrent, Fourier ops).

Attention 23/24/25, RotaryEmbedding, RNN/GRU/LSTM, STFT and the windows only gained attributes
or inputs over their opsets, so the default converter carries them. DFT moved ``axis`` from an
attribute (default 1) to an input (default -2) in opset 20.
"""
from __future__ import annotations

from ..registry import converter


@converter("DFT", since=17, until=19)
def dft_axis_attribute(b) -> None:
    axis = b.attr("axis", 1)
    attrs = {k: v for k, v in b.attrs().items() if k != "axis"}
    b.emit("DFT", [b.input(0), b.input(1), b.const_i64(axis, hint="axis")], attrs)
