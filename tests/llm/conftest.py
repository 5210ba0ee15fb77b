"""Fixtures of the LLM tests: SmolLM2-135M-Instruct (a real GGUF from PyPI) loaded once per session by
ember and by transformers (the reference)."""
from __future__ import annotations

import pytest
import torch

from .helpers import smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """ember's engine for SmolLM2, fp32 on the CPU."""
    from ember.llm.engine import LLMEngine

    return LLMEngine.load(smollm2_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' model of the same file (its own GGUF reader and dequantization), fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
