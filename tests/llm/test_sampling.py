"""Sampling on fixed logits against reference implementations: transformers' logits processors (repetition
penalty, temperature, top-k, top-p, min-p), OpenAI's presence/frequency formula in float64, the law of the
draws, seeds, logprobs; then stop strings, stop tokens and max tokens through the engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from ember.llm.engine import LLMEngine
from ember.llm.errors import RequestError
from ember.llm.outputs import OutputState
from ember.llm.sampling import SampleRow, Sampler, SamplingParams, apply_penalties, truncate

from .helpers import save_hf_checkpoint, tiny_hf_model

V = 64


def _logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3.0


def _hf_processed(logits: torch.Tensor, p: SamplingParams, context: list[int]) -> torch.Tensor:
    ids = torch.tensor([context])
    x = logits[None].clone()
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


def _mine(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    x = apply_penalties(logits[None].clone(), [SampleRow(p, prompt, output)])
    x = x / p.temperature
    return truncate(x, torch.tensor([p.top_k]), torch.tensor([p.top_p]), torch.tensor([p.min_p]))[0]


CASES = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
         SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.5, min_p=0.05),
         SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.3),
         SamplingParams(temperature=2.0, top_p=0.3, repetition_penalty=0.8), SamplingParams(temperature=1.0, top_k=1)]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_processing_matches_transformers(i: int):
    p = CASES[i]
    prompt, output = [1, 5, 9, 9, 33], [2, 5, 60]
    for row in _logits():
        want = _hf_processed(row, p, prompt + output)
        got = _mine(row, p, prompt, output)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = ~torch.isinf(want)
        assert finite.any()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=1e-6)


def test_presence_and_frequency_penalties_follow_openai():
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.3, repetition_penalty=1.0)
    logits = _logits(1)[0]
    output = [3, 3, 3, 7, 12, 7]
    got = apply_penalties(logits[None].clone(), [SampleRow(p, [4, 4, 5], output)])[0].double().numpy()
    want = logits.double().numpy().copy()
    counts = np.bincount(output, minlength=V)
    want -= 0.7 * (counts > 0) + -0.3 * counts  # prompt tokens are not penalized by these two
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("i", [1, 2, 4])
def test_draws_follow_the_processed_distribution(i: int):
    p = CASES[i]
    logits = _logits(1, seed=3)[0]
    probs = torch.softmax(_hf_processed(logits, p, []).double(), dim=-1)
    sampler = Sampler(torch.device("cpu"), seed=1234)
    n = 20000
    rows = [SampleRow(p, [], [])] * 500
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(n // 500):
        toks = sampler(logits.expand(500, V).contiguous(), rows).tokens
        counts += torch.bincount(torch.tensor(toks), minlength=V).double()
    freq = counts / n
    assert (freq[probs == 0] == 0).all()  # a token outside top-k / top-p / min-p is never drawn
    assert float(0.5 * (freq - probs).abs().sum()) < 0.02  # total variation: ~0.005 expected at n = 20000


def test_greedy_is_the_argmax_after_penalties():
    logits = _logits(3)
    prompt = [int(logits[0].argmax())]
    p = SamplingParams(temperature=0.0, repetition_penalty=5.0)
    rows = [SampleRow(p, prompt, [])] * 3
    got = Sampler(torch.device("cpu"))(logits, rows).tokens
    assert got == apply_penalties(logits.clone(), rows).argmax(dim=-1).tolist()
    assert got[0] != prompt[0]  # the penalty demoted the raw argmax


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    logits = _logits(4)
    seeded = SamplingParams(temperature=4.0, seed=42)
    other = SamplingParams(temperature=4.0)

    def draws(batch: list[SamplingParams], at: int, steps: int = 20) -> list[int]:
        rows = [SampleRow(p, [], [], p.generator(torch.device("cpu"))) for p in batch]
        s = Sampler(torch.device("cpu"), seed=7)
        return [s(logits[0].expand(len(batch), V).contiguous(), rows).tokens[at] for _ in range(steps)]

    alone = draws([seeded], 0)
    assert alone == draws([other, other, seeded], 2) == draws([seeded, other], 0)
    assert len(set(alone)) > 1  # it does sample


def test_logprobs_are_the_raw_distribution():
    logits = _logits(2)
    p = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0)
    out = Sampler(torch.device("cpu"))(logits, [SampleRow(p, [0], []), SampleRow(SamplingParams(), [0], [])])
    lp = torch.log_softmax(logits[0].double(), dim=-1)
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(float(lp[out.tokens[0]]), abs=1e-5)
    assert [t for t, _ in top] == lp.topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-5)
    assert out.logprobs[1] is None


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_k", -1), ("min_p", 1.5),
                                          ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
                                          ("max_tokens", 0), ("logprobs", 21), ("stop", [""]), ("seed", "x"),
                                          ("temperature", float("nan"))])
def test_bad_parameters_are_named(field: str, value):
    with pytest.raises(RequestError, match=f"'{field}'"):
        SamplingParams(**{field: value})


# -- stop strings, stop tokens, max tokens -------------------------------------------------------------------
class _FakeTokenizer:
    """Each token id is one character of this string, for exact control over text boundaries."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .!XY"

    def decode_stream(self, prompt_ids):
        outer = self

        class D:
            def step(self, t):
                return outer.alphabet[t]
        return D()


class _Req:
    def __init__(self, stop):
        self.prompt_ids = []
        self.params = SamplingParams(stop=stop)


def _feed(text: str, stop: list[str], include: bool = False) -> tuple[list[str], bool]:
    state = OutputState(_FakeTokenizer(), _Req(stop))
    deltas, stopped = [], False
    for ch in text:
        stopped = state.add(_FakeTokenizer.alphabet.index(ch), include)
        deltas.append(state.take(final=stopped))
        if stopped:
            break
    if not stopped:
        deltas.append(state.take(final=True))
    return deltas, stopped


def test_stop_strings_cut_and_hold_back():
    deltas, stopped = _feed("hello world. more", ["d. m"])
    assert stopped and "".join(deltas) == "hello worl"
    # text that may begin a stop string is held back, then released when it cannot
    deltas, stopped = _feed("abXcXYd", ["XYZ"])
    assert not stopped and "".join(deltas) == "abXcXYd"
    assert deltas[2] == "" and deltas[3] == "Xc"  # 'X' waited for the next character
    deltas, stopped = _feed("one. two. three", [". t", "wo"], include=True)
    assert stopped and "".join(deltas) == "one. t"  # the earliest stop wins; included on request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLMEngine:
    folder = save_hf_checkpoint(tiny_hf_model("llama2"), tmp_path_factory.mktemp("s") / "m")
    return LLMEngine.load(folder, device="cpu")


def test_engine_stops_on_strings_tokens_and_length(tiny: LLMEngine):
    prompt = [256, 10, 20, 30, 40]
    free = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    tok = free.token_ids[4]
    by_id = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    saved, tiny.tokenizer.stop_token_ids = tiny.tokenizer.stop_token_ids, frozenset({free.token_ids[2]})
    try:  # the model's end-of-sequence tokens end a generation, unless ignore_eos
        eos = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30))[0]
        first = free.token_ids.index(free.token_ids[2])
        assert eos.finish_reason == "stop" and eos.token_ids == free.token_ids[: first + 1]
        past = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
        assert past.token_ids == free.token_ids
    finally:
        tiny.tokenizer.stop_token_ids = saved
    assert tiny.kv_usage() == 0.0


def test_seeded_generation_is_reproducible(tiny: LLMEngine):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True)
    a = tiny.generate([[256, 1, 2, 3]], p)[0].token_ids
    b = tiny.generate([[256, 1, 2, 3], [256, 9, 9]], [p, SamplingParams(temperature=1.0, max_tokens=8)])[0].token_ids
    assert a == b
    c = tiny.generate([[256, 1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.9, seed=6, max_tokens=16,
                                                      ignore_eos=True))[0].token_ids
    assert a != c
