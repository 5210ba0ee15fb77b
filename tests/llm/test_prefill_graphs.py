"""Steps that prefill, through the graphs of the one run path (graphs.PrefillGraphs), emulated on the CPU: the
same padded inputs and device-only reads as a captured graph, with "replay" recomputing into the same
output. Padded steps must give the unpadded step's logits (fp32, a tiny random model: the padded path
attends with an einsum where the eager path calls SDPA, so equal to rounding, not bit for bit) and the
eager engine's greedy tokens; a prompt prefilled in chunks must give the whole prefill's logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.llm.attention import TILE_NONE, prefill_tiles, tile_capacity
from ember.llm.engine import EngineOptions, LLMEngine
from ember.llm.graphs import PrefillGraphs, seq_buckets, token_buckets
from ember.llm.loader import load_model
from ember.llm.sampling import SamplingParams
from ember.llm.scheduler import Request, Scheduled

from .helpers import save_hf_checkpoint, tiny_hf_model

TOL = 2e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # mistral: GQA and a sliding window shorter than the longest context here
    folder = tmp_path_factory.mktemp("prefill_graphs") / "m"
    return load_model(save_hf_checkpoint(tiny_hf_model("mistral", sliding_window=24), folder))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _step_logits(engine: LLMEngine, prompts: list[list[int]], chunks: "list[int] | None" = None) -> torch.Tensor:
    """The logits of one step prefilling all ``prompts`` (or, with ``chunks``, each prompt's next ``chunks[i]``
    tokens after what an earlier call computed), through the engine's runner as engine.step() runs it."""
    reqs = getattr(engine, "_test_reqs", None)
    if reqs is None:
        reqs = engine._test_reqs = [Request(p, SamplingParams(max_tokens=1)) for p in prompts]
    sched = []
    for i, r in enumerate(reqs):
        n = chunks[i] if chunks else len(r.prompt_ids) - r.num_computed
        if n == 0:
            continue
        r.block_ids += engine.blocks.allocate(-(-(r.num_computed + n) // 16) - len(r.block_ids))
        sched.append(Scheduled(r, n))
    inputs = engine._inputs(sched)
    engine.runner.prepare(inputs)
    with engine.runner.launching():
        out = engine.runner.run(inputs).clone()
    for s in sched:
        s.request.num_computed += s.num_tokens
    return out


def _finish(engine: LLMEngine) -> None:
    for r in engine._test_reqs:
        engine.blocks.release(r.block_ids)
    del engine._test_reqs


def test_buckets():
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(12) == [12] and token_buckets(100) == [16, 32, 64, 100]
    assert seq_buckets(128, 256) == [1, 4, 16, 64, 128] and seq_buckets(2048, 256) == [1, 4, 16, 64, 256]
    assert seq_buckets(16, 8) == [1, 4, 8]
    t = prefill_tiles([1, 130, 64], capacity=tile_capacity(256, 4))
    assert t[:, :5].tolist() == [[0, 1, 1, 1, 2], [0, 0, 64, 128, 0]]
    assert t.shape[1] == 8 and (t[1, 5:] == TILE_NONE).all()


@pytest.mark.parametrize("lengths", [[37], [5, 50, 19], [1, 16, 33, 2]])
def test_padded_graph_step_gives_the_unpadded_logits(model, monkeypatch, lengths):
    """Several sequences of different lengths in one step, none of the totals a bucket size."""
    prompts = _prompts(lengths)
    eager = LLMEngine(model, "cpu", EngineOptions(cuda_graphs=False, max_num_seqs=8))
    want = _step_logits(eager, prompts)
    _finish(eager)
    monkeypatch.setattr(PrefillGraphs, "emulate", True)
    graphed = LLMEngine(model, "cpu", EngineOptions(max_num_seqs=8))
    graphs = graphed.runner.prefill_graphs
    assert graphs is not None and graphs.sizes == [16, 32, 64, 128, 256, 512]
    got = _step_logits(graphed, prompts)
    _finish(graphed)
    (bucket,) = graphs.graphs  # one graph: the bucket of this step, captured at its first use
    assert bucket[0] == min(t for t in graphs.sizes if t >= sum(lengths)) > sum(lengths)
    assert bucket[1] == min(s for s in seq_buckets(bucket[0], 8) if s >= len(lengths))
    assert graphs.replays == 1 and got.shape == want.shape == (len(lengths), model.config.vocab_size)
    assert _rel(got, want) <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_chunked_prefill_equals_the_whole_prefill(model, monkeypatch):
    """A 70-token prompt (past the sliding window) in chunks 16 + 23 + 31, next to a second prompt in
    chunks 9 + 0 + 3, through the padded graphs; the last chunk's logits are the whole prefill's."""
    prompts = _prompts([70, 12], seed=5)
    eager = LLMEngine(model, "cpu", EngineOptions(cuda_graphs=False, max_num_seqs=8))
    whole = _step_logits(eager, prompts)
    _finish(eager)
    monkeypatch.setattr(PrefillGraphs, "emulate", True)
    graphed = LLMEngine(model, "cpu", EngineOptions(max_num_seqs=8))
    _step_logits(graphed, prompts, [16, 9])
    _step_logits(graphed, prompts, [23, 0])
    last = _step_logits(graphed, prompts, [31, 3])
    _finish(graphed)
    assert _rel(last, whole) <= TOL and torch.equal(last.argmax(-1), whole.argmax(-1))
    assert graphed.runner.prefill_graphs.replays == 3


def test_engine_with_prefill_graphs_gives_the_eager_tokens(model, monkeypatch):
    """Continuous batching with chunked prefill (12 tokens a step): prompts, chunks and decode tokens mixed in
    one step all go through the padded prefill graphs (decode-only steps through the decode graphs), and
    the greedy tokens are the eager engine's."""
    from ember.llm.graphs import DecodeGraphs

    prompts = _prompts([9, 30, 4, 17, 2], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    opts = dict(max_num_batched_tokens=12, max_num_seqs=4)
    want = [o.token_ids for o in LLMEngine(model, "cpu", EngineOptions(cuda_graphs=False, **opts))
            .generate(prompts, params)]
    monkeypatch.setattr(PrefillGraphs, "emulate", True)
    monkeypatch.setattr(DecodeGraphs, "emulate", True)
    graphed = LLMEngine(model, "cpu", EngineOptions(**opts))
    assert [o.token_ids for o in graphed.generate(prompts, params)] == want
    pg = graphed.runner.prefill_graphs
    assert pg.sizes == [12] and pg.replays >= 5 and graphed.runner.graphs.replays >= 5
    assert graphed.kv_usage() == 0.0


def test_prefill_graphs_through_the_triton_kernels(tmp_path: Path, monkeypatch):
    """The padded prefill step through every Triton kernel (interpreted on the CPU): the attention kernel
    reads its tiles and lengths from the graph's buffers and skips the padding tiles."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (run with test_kernels.py)")
    from ember.llm.kernels import dispatch

    model = load_model(save_hf_checkpoint(tiny_hf_model("llama3", num_hidden_layers=1), tmp_path / "m"))
    prompts = _prompts([21, 3, 30], seed=6)  # 54 tokens: bucket (64, 4)
    want = _step_logits(LLMEngine(model, "cpu", EngineOptions(cuda_graphs=False)), prompts)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(dispatch, "_FORCE", "interpret" if dev == "cpu" else "")
    monkeypatch.setattr(PrefillGraphs, "emulate", True)
    graphed = LLMEngine(model, dev, EngineOptions(max_num_seqs=4, max_num_batched_tokens=64))
    got = _step_logits(graphed, prompts)
    assert graphed.runner.prefill_graphs.replays == 1
    assert _rel(got.cpu(), want) <= TOL


@pytest.mark.cuda
def test_prefill_graphs_on_the_gpu(smollm2_path: Path):
    """SmolLM2 fp16 on the GPU: first-step logits of prompts of 37, 128 and 300 tokens replayed from the
    prefill graphs (captured at load) against the eager step; several prompts in one step; tokens of a
    batch with mixed steps equal the eager engine's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    graphed = LLMEngine.load(smollm2_path, device="cuda", dtype="fp16")
    eager = LLMEngine.load(smollm2_path, device="cuda", dtype="fp16",
                           options=EngineOptions(cuda_graphs=False))
    pg = graphed.runner.prefill_graphs
    assert pg is not None and len(pg.graphs) == len(pg.buckets)
    for n in (37, 128, 300):
        ids = _prompts([n], seed=n)[0]
        before = pg.replays
        got, want = graphed.next_token_logits(ids), eager.next_token_logits(ids)
        assert pg.replays == before + 1 and pg.last[0] >= n
        assert _rel(got, want) <= 1e-2 and got.argmax() == want.argmax()
    prompts = _prompts([5, 50, 19, 77])
    got, want = _step_logits(graphed, prompts), _step_logits(eager, prompts)
    _finish(graphed)
    _finish(eager)
    assert _rel(got.cpu(), want.cpu()) <= 1e-2
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
