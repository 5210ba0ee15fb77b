"""Greedy generation on the CPU (fp32) against transformers: SmolLM2-135M (a real GGUF from PyPI) and a
tiny random model of each architecture. ember runs the prompts together (continuous batching, chunked
prefill, a paged KV cache); transformers runs each alone. The tokens must be identical."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ember.llm.engine import EngineOptions, LLMEngine
from ember.llm.loader import load_model
from ember.llm.sampling import SamplingParams

from .helpers import hf_greedy, save_baichuan_checkpoint, save_hf_checkpoint, tiny_hf_model, write_tiny_gguf

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(n: int = 3, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g).tolist() for length in (5, 17, 33)[:n]]


def _tiny(arch: str, tmp_path: Path):
    if arch == "baichuan":
        return save_baichuan_checkpoint(tmp_path / arch)
    ref = tiny_hf_model(arch)
    return save_hf_checkpoint(ref, tmp_path / arch), ref


@pytest.mark.parametrize("arch", ["llama2", "llama3", "mistral", "qwen2", "baichuan"])
def test_each_architecture_matches_transformers(tmp_path: Path, arch: str):
    folder, ref = _tiny(arch, tmp_path)
    prompts = _prompts()
    want = [hf_greedy(ref, p, 24) for p in prompts]
    # a 40-token budget per step: the 33-token prompt is prefilled in two chunks, next to decoding requests
    llm = LLMEngine.load(folder, device="cpu", options=EngineOptions(max_num_batched_tokens=40))
    got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))]
    assert got == want
    assert llm.kv_usage() == 0.0


@pytest.mark.parametrize("arch, change", [("mistral", {"sliding_window": None}),
                                          ("llama3", {"rope_scaling": None})])
def test_the_tiny_configs_exercise_window_and_rope_scaling(tmp_path: Path, arch: str, change: dict):
    """Without the sliding window (or Llama 3's RoPE scaling) the same weights give other tokens: the
    matches above test those features, not just the common path."""
    from ember.llm.config import RopeScaling

    folder, ref = _tiny(arch, tmp_path)
    loaded = load_model(folder)
    change = {k: (RopeScaling() if k == "rope_scaling" else v) for k, v in change.items()}
    plain = LLMEngine(dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, **change)), "cpu")
    prompt = _prompts()[2]
    assert plain.generate([prompt], SamplingParams(max_tokens=24, **GREEDY))[0].token_ids != hf_greedy(ref, prompt, 24)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_tiny_gguf_matches_transformers(tmp_path: Path, qtype: str):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / f"m-{qtype}.gguf", tiny_hf_model("llama3", hidden_size=64, intermediate_size=128),
                           qtype)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLMEngine.load(path, device="cpu")
    prompt = llm.tokenizer.encode("the cat sat on the dog")
    assert llm.generate([prompt], SamplingParams(max_tokens=16, **GREEDY))[0].token_ids == hf_greedy(ref, prompt, 16)


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------------------
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis in one sentence.", "List three primary colors.", "How do I boil an egg?",
             "What is machine learning?",
             "Translate 'good morning' into Spanish.", "Give me a tip for better sleep.", "Who wrote Romeo and Juliet?",
             "Why is the sky blue?"]
COMPLETIONS = ["The quick brown fox", "Once upon a time, in a small village,", "def fibonacci(n):",
               "The three laws of motion are", "In the beginning of the twentieth century", "Water boils at",
               "My favourite recipe for pancakes is", "The history of the Roman Empire", "import numpy as np\n",
               "Dear Sir or Madam,"]


def test_smollm2_20_prompts_64_greedy_tokens_match_transformers(smollm2: LLMEngine, smollm2_hf):
    prompts = [smollm2.prompt_ids(q, chat=True) for q in QUESTIONS] + [smollm2.prompt_ids(c) for c in COMPLETIONS]
    outs = smollm2.generate(prompts, SamplingParams(max_tokens=64, **GREEDY))
    for p, o in zip(prompts, outs):
        assert len(o.token_ids) == 64 and o.finish_reason == "length"
        assert o.token_ids == hf_greedy(smollm2_hf, p, 64), smollm2.tokenizer.decode(p)
    assert smollm2.kv_usage() == 0.0


def test_smollm2_first_step_logits(smollm2: LLMEngine, smollm2_hf):
    for text, chat in ((QUESTIONS[0], True), (COMPLETIONS[2], False)):
        ids = smollm2.prompt_ids(text, chat=chat)
        mine = smollm2.next_token_logits(ids).double()
        with torch.no_grad():
            ref = smollm2_hf(torch.tensor([ids])).logits[0, -1].double()
        assert float((mine - ref).norm() / ref.norm()) <= 1e-4


def test_smollm2_answers_paris(smollm2: LLMEngine):
    text = "".join(o.text for o in smollm2.stream("What is the capital of France?",
                                                  SamplingParams(temperature=0.0, max_tokens=32), chat=True))
    assert text == "The capital of France is Paris."
