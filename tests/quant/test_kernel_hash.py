"""The timing cache is keyed on a quantized choice's code hash: it must cover the helpers the kernel and
its launch call (an edited helper is timed again), not only the kernel and launch functions themselves."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported, as tests/kernels do: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import ember.kernels as kernels  # noqa: E402
from ember.kernels import get_tactic  # noqa: E402
from ember.kernels import quantized as q  # noqa: E402
from ember.kernels import quantized_templates as qt  # noqa: E402
from ember.kernels import triton_math as tm  # noqa: E402


def names(choice):
    return {getattr(c, "fn", c).__qualname__ for c in choice.code}


def test_quantized_choices_hash_the_helpers_they_call(monkeypatch):
    gemm = q.qgemm_choice(qt.QGEMM_CONFIGS[0])
    assert {"_common", "_colsum", "_clean", "_out_dtype", "_epilogue", "_finish"} <= names(gemm)
    assert getattr(tm.rint, "fn", tm.rint) in {getattr(c, "fn", c) for c in gemm.code}  # triton_math's rounding
    assert {"_common", "dequantize_accumulator", "_colsum"} <= names(get_tactic("cublaslt.int8"))
    assert {"finish", "quantize_activation", "_conv_core"} <= names(get_tactic("torch.qconv_dequant"))
    before = gemm.code_hash
    real = kernels.source_of

    def edited(obj):  # _common (the launch's shared set-up) and triton_math.rint edited in turn
        return real(obj) + "# edited" if getattr(obj, "fn", obj) is target else real(obj)

    monkeypatch.setattr(kernels, "source_of", edited)
    for target in (qt._common, getattr(tm.rint, "fn", tm.rint)):
        assert q.qgemm_choice(qt.QGEMM_CONFIGS[0]).code_hash != before, target
    target = None
    assert q.qgemm_choice(qt.QGEMM_CONFIGS[0]).code_hash == before  # the hash is stable otherwise
