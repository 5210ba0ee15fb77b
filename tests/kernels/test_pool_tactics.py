"""Pooling tactics match the ops' reference functions (Triton kernels run in the interpreter on CPU)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ember.kernels.pool import max_pool_nhwc, torch_global_avg_pool, torch_max_pool  # noqa: E402
from ember.ops import OpContext, get  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},          # ResNet's stem pool
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 2, 0]},          # asymmetric pads
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_max_pool_matches_reference(attrs, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 9, 11, generator=g)  # 70 channels: two channel blocks, the second partial
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    want = get("MaxPool").fn(x.double(), **attrs, ctx=OpContext(num_outputs=1))
    got = max_pool_nhwc(x.to(DEV), attrs).cpu()
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0)  # max is exact


def test_triton_max_pool_half_and_nan():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 6, 6, generator=g).half()
    x[0, 3, 2, 2] = float("nan")
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    want = get("MaxPool").fn(x, **attrs, ctx=OpContext(num_outputs=1))
    got = max_pool_nhwc(x.to(DEV), attrs).cpu()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[0, 3]).any()


def test_torch_pool_tactics_match_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, 8, generator=g)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    torch.testing.assert_close(torch_max_pool([x], attrs, None), get("MaxPool").fn(x, **attrs), rtol=0, atol=0)
    want = get("GlobalAveragePool").fn(x.double())
    torch.testing.assert_close(torch_global_avg_pool([x], {}, None).double(), want, rtol=1e-6, atol=1e-7)
    xh = x.half()
    torch.testing.assert_close(torch_global_avg_pool([xh], {}, None).double(), want, rtol=2e-3, atol=2e-3)
