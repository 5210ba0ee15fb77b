"""The scheduler on the CPU with a tiny model: continuous batching, chunked prefill, preemption by
recompute, prefix caching, the bounded queue, aborts that free KV blocks, and the asyncio front
(AsyncLLM) with cancellation. Every variant must give the tokens of an unconstrained run."""
from __future__ import annotations

import asyncio
import pytest
import torch

from ember.llm.async_engine import AsyncLLM, Observer
from ember.llm.engine import EngineOptions, LLMEngine
from ember.llm.errors import EngineDeadError, QueueFullError, RequestError
from ember.llm.kv_cache import BLOCK_SIZE, BlockManager, hash_block
from ember.llm.loader import load_model
from ember.llm.sampling import SamplingParams
from ember.llm.scheduler import Request, Status

from .helpers import save_hf_checkpoint, tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_hf_checkpoint(tiny_hf_model("llama3"), tmp_path_factory.mktemp("m") / "m"))


def _engine(model, **opts) -> LLMEngine:
    return LLMEngine(model, "cpu", EngineOptions(**opts))


def _prompts(lengths=(7, 40, 19, 3, 55), seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    """Each prompt alone, the whole prompt in one step, nothing shared."""
    eng = _engine(model, prefix_caching=False)
    return [eng.generate([p], GREEDY)[0].token_ids for p in _prompts()]


def test_block_manager_allocates_evicts_and_reuses():
    bm = BlockManager(4)
    a = bm.allocate(2)
    h0 = hash_block(None, list(range(16)))
    bm.seal(a[0], h0)
    bm.release(a)
    assert bm.num_free == 4 and bm.cached == {h0: a[0]}
    assert bm.cached_prefix([h0, hash_block(h0, [1] * 16)]) == [a[0]]  # the longest cached prefix
    b = bm.allocate(3)  # the uncached block goes first, the cached one last
    assert a[0] not in b and h0 in bm.cached
    c = bm.allocate(1)  # now the cached block is evicted
    assert c == [a[0]] and h0 not in bm.cached and bm.num_free == 0
    with pytest.raises(MemoryError):
        bm.allocate(1)
    bm.release(b + c)
    assert bm.usage() == 0.0


def test_continuous_batching_and_chunked_prefill(model, reference):
    eng = _engine(model, max_num_batched_tokens=16)
    prompts = _prompts()
    reqs = [eng.add_request(p, GREEDY) for p in prompts[:2]]
    outputs: dict[str, list[int]] = {}
    plans = []  # per step: (request, tokens computed in the step, tokens cached before it)
    schedule = eng.scheduler.schedule

    def spy():
        plan = schedule()
        plans.append([(s.request.id, s.num_tokens, s.request.num_computed) for s in plan])
        return plan

    eng.scheduler.schedule = spy
    while eng.has_unfinished():
        if eng.steps == 3:  # late arrivals join the running batch
            reqs += [eng.add_request(p, GREEDY) for p in prompts[2:]]
        for o in eng.step():
            outputs.setdefault(o.request_id, []).extend(o.token_ids)
    assert [outputs[r.id] for r in reqs] == reference
    assert all(sum(n for _, n, _ in plan) <= 16 for plan in plans)
    # the 40-token prompt is prefilled in chunks: 9 tokens next to the 7-token prompt, then 15 and 15 next to
    # the first request's decode token, then the last 1
    assert [(n, c) for plan in plans for rid, n, c in plan if rid == reqs[1].id][:4] == [(9, 0), (15, 9), (15, 24),
                                                                                        (1, 39)]
    # requests that arrived at step 3 ran while the first ones were decoding, in shared steps
    late = {r.id for r in reqs[2:]}
    assert any(any(rid in late for rid, _, _ in plan) and any(rid == reqs[0].id and n == 1 for rid, n, _ in plan)
               for plan in plans)
    assert eng.kv_usage() == 0.0


def test_preemption_by_recompute_gives_the_same_tokens(model, reference):
    # 12 blocks of 16 tokens: the five requests (up to 75 tokens each) cannot all hold their KV at once
    eng = _engine(model, num_blocks=12, prefix_caching=False)
    outs = eng.generate(_prompts(), GREEDY)
    assert eng.scheduler.preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert eng.blocks.num_used == 0


def test_prefix_cache_reuses_blocks_and_keeps_the_tokens(model, reference):
    eng = _engine(model)
    prompts = _prompts()
    shared = prompts[4]  # 55 tokens: three full blocks
    first = eng.generate([shared], GREEDY)[0]
    assert first.cached_tokens == 0
    again = eng.generate([shared], GREEDY)[0]
    assert again.cached_tokens == 3 * BLOCK_SIZE and again.token_ids == first.token_ids == reference[4]
    # a different continuation of the same prefix shares its full blocks
    other = shared[:40] + [1, 2, 3]
    want = _engine(model, prefix_caching=False).generate([other], GREEDY)[0].token_ids
    got = eng.generate([other], GREEDY)[0]
    assert got.cached_tokens == 2 * BLOCK_SIZE and got.token_ids == want
    assert eng.blocks.hits == 5 * BLOCK_SIZE and eng.blocks.num_used == 0


def test_bounded_queue_and_bad_requests(model):
    eng = _engine(model, max_waiting=2, max_model_len=64)
    eng.add_request([1, 2, 3], GREEDY)
    eng.add_request([1, 2, 3], GREEDY)
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        eng.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RequestError, match="at most 64 tokens"):
        eng.check_request(list(range(64)), GREEDY)
    with pytest.raises(RequestError, match="empty"):
        eng.check_request([], GREEDY)
    with pytest.raises(RequestError, match="token ids"):
        eng.check_request([1, 99999], GREEDY)


def test_abort_frees_blocks(model):
    eng = _engine(model)
    a = eng.add_request(_prompts()[4], GREEDY)
    b = eng.add_request(_prompts()[1], GREEDY)
    for _ in range(3):
        eng.step()
    held = len(a.block_ids)
    used = eng.blocks.num_used
    assert held >= 4
    out = eng.abort(a.id)
    assert out.finished and out.finish_reason == "abort"
    assert eng.blocks.num_used == used - held and a.block_ids == [] and a.status is Status.FINISHED
    assert eng.abort(a.id) is None  # twice is harmless
    while eng.has_unfinished():
        eng.step()
    assert b.finished and eng.kv_usage() == 0.0


# -- AsyncLLM -------------------------------------------------------------------------------------------------
class _Recorder(Observer):
    def __init__(self):
        self.done = []

    def request_done(self, times):
        self.done.append(times)


def test_async_streams_cancellation_and_queue(model, reference):
    eng = _engine(model, max_num_seqs=4)
    rec = _Recorder()
    llm = AsyncLLM(eng, max_waiting=8, observer=rec)

    async def collect(p):
        toks = []
        async for o in llm.generate(p, GREEDY):
            toks += o.token_ids
        return toks

    async def cancelled(p):
        async for o in llm.generate(p, SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)):
            if o.completion_tokens >= 3:
                break  # the client went away: the request is aborted, its blocks freed

    async def main():
        prompts = _prompts()
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled(prompts[4]))
        assert list(results[:5]) == reference
        for _ in range(100):
            if eng.kv_usage() == 0.0:
                break
            await asyncio.sleep(0.02)
        assert eng.kv_usage() == 0.0 and not eng.has_unfinished()
        # the queue bound: 8 waiting requests are accepted, the 9th is refused at once
        streams = []
        with pytest.raises(QueueFullError):
            for _ in range(20):
                streams.append(llm.submit([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2)))
        assert 8 <= len(streams) <= 12
        for st in streams:
            while True:
                item = await st.queue.get()
                if isinstance(item, Exception) or item.finished:
                    break

    asyncio.run(main())
    assert any(t.finish_reason == "abort" for t in rec.done)
    assert all(t.first_token is not None and t.queue >= 0 for t in rec.done if t.finish_reason == "length")
    llm.close()

    async def after_close():
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate([1, 2], GREEDY):
                pass

    asyncio.run(after_close())


def test_a_failed_step_fails_requests_with_503(model):
    eng = _engine(model)

    def broken():
        raise RuntimeError("device lost")

    eng.step = broken
    llm = AsyncLLM(eng)

    async def main():
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in llm.generate([1, 2, 3], GREEDY):
                pass
        with pytest.raises(EngineDeadError, match="stopped"):
            llm.submit([1, 2, 3], GREEDY)

    asyncio.run(main())
    llm.close()


def test_request_ids_and_states():
    r = Request([1, 2, 3], SamplingParams())
    r.output_ids = [4, 5]
    assert r.tokens(1, 5) == [2, 3, 4, 5] and r.tokens(3, 5) == [4, 5] and r.num_tokens == 5
