"""The tuner's correctness gate: a tactic whose output differs from the reference is never chosen."""
from __future__ import annotations

import pytest
import torch

from ember.builder.tuner import _mismatch, pick


def test_matching_outputs_pass():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    assert _mismatch(w + 1e-4 * torch.randn(64, 32, generator=g), w) == ""
    assert _mismatch((w.half(), torch.arange(3)), (w.half(), torch.arange(3))) == ""


@pytest.mark.parametrize("case, words", [
    ("noise", "relative L2"), ("nan", "relative L2 nan"), ("dtype", "expected torch.float32"),
    ("shape", "expected torch.float32[64, 32]"), ("count", "2 outputs, expected 1"), ("ints", "values differ")])
def test_wrong_outputs_are_named(case, words):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    got, want = {
        "noise": (w + 0.2 * torch.randn(64, 32, generator=g), w),
        "nan": (w * float("nan"), w),
        "dtype": (w.half(), w),
        "shape": (w.t(), w),
        "count": ((w, w), w),
        "ints": (torch.arange(4), torch.arange(4).flip(0)),
    }[case]
    assert words in _mismatch(got, want)


def test_only_the_nodes_outputs_are_compared():
    """Attention's reference returns (Y, present_key, present_value, qk); a one-output node uses Y."""
    g = torch.Generator().manual_seed(3)
    y, extra = torch.randn(8, 4, generator=g), torch.randn(2, generator=g)
    assert _mismatch(y, (y, extra, extra, None), 1) == ""
    assert "1 outputs, expected 4" in _mismatch(y, (y, extra, extra, None))


def test_tolerance_follows_the_storage_type():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4096, generator=g)
    off = w + 3e-3 * torch.randn(4096, generator=g)  # ~3e-3 relative: fp16 rounding scale, not fp32's
    assert _mismatch(off.half(), w.half()) == ""
    assert "relative L2" in _mismatch(off.double(), w.double())


def test_reference_needs_a_clear_win():
    assert pick({"reference": 0.019, "sdpa": 0.020}) == "sdpa"  # within noise: the fused kernel
    assert pick({"reference": 0.010, "sdpa": 0.020}) == "reference"
    assert pick({"reference": 0.03, "a": 0.02, "b": 0.01}) == "b"
    assert pick({"reference": 0.03}) == "reference"
