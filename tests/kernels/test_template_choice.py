"""Which Triton template configurations a layer's shape gets compiled and timed (kernels/template_choice.py).

The model ranks configurations by the work they waste on a shape; these tests pin what it must
never do (drop every configuration, keep one that is mostly padding while a fitting one exists)
and what it must do (keep every configuration when asked, let non-template tactics through).
"""
from __future__ import annotations

import pytest
import torch

from ember.kernels import template_choice as tc

CONV = {f"triton.conv_nhwc[{c}]": ("conv", c) for c in tc.CONV_CONFIGS}
GEMM = {f"triton.gemm[{c}]": ("gemm", c) for c in tc.GEMM_CONFIGS}


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """The registry as triton_templates fills it, also where triton is not installed."""
    monkeypatch.setattr(tc, "TEMPLATES", {**CONV, **GEMM})


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float16, device="meta")


def conv_args(n: int, cin: int, hw: int, cout: int, k: int) -> tuple[list, dict]:
    return [meta(n, cin, hw, hw), meta(cout, cin, k, k)], {"pads": [k // 2] * 4, "kernel_shape": [k, k]}


def test_problem_size_of_a_conv_and_a_gemm():
    args, attrs = conv_args(2, 64, 14, 256, 3)
    assert tc.problem_size("conv", args, attrs) == (2 * 14 * 14, 256, 9 * 64)
    assert tc.problem_size("gemm", [meta(4, 32, 768), meta(3072, 768)], {"trans_b": 1}) == (128, 3072, 768)
    assert tc.problem_size("gemm", [meta(8, 100), meta(100, 40)], {}) == (8, 40, 100)


def test_padding_and_idle_sms_cost_more():
    small, big = tc.TileConfig(64, 64, 64, 4, 4), tc.TileConfig(128, 128, 64, 8, 4)
    # 49 rows: a 128-row tile computes 79 rows of padding; both grids leave most SMs idle
    assert tc.modeled_cost(big, 49, 512, 4608, 132) > tc.modeled_cost(small, 49, 512, 4608, 132)
    # K = 147 padded to 160 by BK=32 and to 192 by BK=64
    k32, k64 = tc.TileConfig(128, 64, 32, 4, 4), tc.TileConfig(128, 64, 64, 4, 4)
    assert tc.modeled_cost(k32, 12544, 64, 147, 132) < tc.modeled_cost(k64, 12544, 64, 147, 132)
    # a huge problem: work divided by SMs, so the cost grows with M
    assert tc.modeled_cost(big, 1 << 20, 256, 256, 132) == pytest.approx(
        2 * tc.modeled_cost(big, 1 << 19, 256, 256, 132), rel=0.01)


@pytest.mark.parametrize("case", [conv_args(1, 512, 7, 512, 3), conv_args(256, 64, 56, 64, 3),
                                  conv_args(1, 3, 224, 64, 7), conv_args(256, 1024, 14, 256, 1)])
@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_shortlist_keeps_between_two_and_keep_configurations(case, keep):
    args, attrs = case
    names = ["cudnn.conv_nhwc", *CONV]
    out = tc.shortlist(names, args, attrs, keep)
    assert "cudnn.conv_nhwc" in out  # other tactics are never pruned
    templates = [n for n in out if n in CONV]
    assert min(2, keep) <= len(templates) <= keep
    assert templates == [n for n in CONV if n in templates]  # order kept
    costs = {n: tc.modeled_cost(CONV[n][1], *tc.problem_size("conv", args, attrs), 132) for n in CONV}
    best = min(costs.values())
    assert any(costs[n] == best for n in templates)  # the cheapest is always timed
    for kept in templates:  # a kept configuration is near the best, or cheaper than every dropped one
        assert costs[kept] <= 1.25 * best or all(costs[kept] <= costs[d] for d in CONV if d not in templates)


def test_shortlist_drops_tiles_that_are_mostly_padding():
    args, attrs = conv_args(256, 64, 56, 64, 1)  # Cout 64: a 256-column tile is 3/4 padding
    out = tc.shortlist(list(CONV), args, attrs, 3)
    assert not any("128x256" in n for n in out) and not any("x128x64,w8" in n for n in out)


def test_keep_zero_or_unknown_shapes_keep_everything():
    args, attrs = conv_args(1, 64, 56, 64, 3)
    assert tc.shortlist(list(CONV), args, attrs, 0) == list(CONV)
    assert tc.shortlist(list(CONV), [meta(1, 64, 56, 56)], attrs, 3) == list(CONV)  # no weight: no shape
    assert tc.KEEP_BY_LEVEL[4] == tc.KEEP_BY_LEVEL[5] == 0  # the deepest levels time every configuration
