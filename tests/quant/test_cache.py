"""The calibration cache: readable text, read back exactly, stale for another graph, type or method."""
from __future__ import annotations

import numpy as np
import pytest

from ember.quant import cache
from ember.quant.collect import Calibration
from ember.quant.data import CalibrationError


def test_round_trip_and_staleness(tmp_path):
    cal = Calibration("int8", "entropy", 512, "abc123", {"x": 2.5, 'odd "name" with spaces': 1e-3},
                      {"gemm1": np.array([0.5, 2.0, 1.25], np.float32)}, 0.5)
    path = tmp_path / "cal.txt"
    cache.save(cal, path)
    text = path.read_text()
    assert 'amax "x" 2.5' in text and "graph abc123" in text and "smooth_alpha 0.5" in text
    back = cache.load(path, "abc123", "int8", "entropy", 0.5)
    assert back.amax == cal.amax and back.samples == 512
    assert np.array_equal(back.smooth["gemm1"], cal.smooth["gemm1"])
    assert cache.load(path, "another-graph", "int8", "entropy", 0.5) is None
    assert cache.load(path, "abc123", "fp8", "entropy", 0.5) is None
    assert cache.load(path, "abc123", "int8", "mse", 0.5) is None
    assert cache.load(path, "abc123", "int8", "entropy", None) is None
    assert cache.load(tmp_path / "none.txt", "abc123", "int8", "entropy", 0.5) is None
    path.write_text(text.replace('amax "x" 2.5', 'amax "x" two'))
    with pytest.raises(CalibrationError, match="line .* is malformed"):
        cache.load(path, "abc123", "int8", "entropy", 0.5)
