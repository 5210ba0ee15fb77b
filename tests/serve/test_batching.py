"""The dynamic batcher: batching really happens, results go back to the right request,
queues are bounded, timeouts and priorities behave, and one bad request cannot sink a batch."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from ember.serve.batcher import BatchPolicy, DynamicBatcher, FunctionRunner
from ember.serve.config import QueuePolicy
from ember.serve.engine import EngineAdapter
from ember.serve.errors import BadRequestError, InferenceFailedError, QueueFullError, RequestTimeoutError

pytestmark = pytest.mark.timeout(120)


def test_concurrent_single_requests_share_engine_runs(server):
    """N concurrent single-item requests run in fewer than N engine runs, each getting its own result."""
    base = f"http://127.0.0.1:{server.http_port}"
    n = 24
    xs = [np.full((1, 4), float(i), np.float32) + np.arange(4, dtype=np.float32) for i in range(n)]
    with httpx.Client(base_url=base) as c:
        before = c.get("/v2/models/batching/stats").json()["model_stats"][0]
    results: dict[int, list] = {}
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            barrier.wait(10)
            r = c.post("/v2/models/batching/infer", json={
                "id": str(i), "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": xs[i].tolist()}]})
            assert r.status_code == 200, r.text
            results[i] = r.json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    for i, doc in results.items():
        assert doc["id"] == str(i)
        np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32), (xs[i] * 2 + 1).reshape(-1))
    with httpx.Client(base_url=base) as c:
        after = c.get("/v2/models/batching/stats").json()["model_stats"][0]
    runs = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == n
    assert runs < n, f"{n} concurrent requests took {runs} engine runs"
    batch_sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert max(batch_sizes) > 1


# ---- the batcher on its own, driving a real engine -----------------------------------------------------


@pytest.fixture
def adapter(engines):
    import ember

    return EngineAdapter(ember.Engine.load(str(engines["affine"])), engines["affine"])


def _batcher(adapter, counter=None, **kw) -> DynamicBatcher:
    qp = kw.pop("queue", QueuePolicy(max_queue_size=64))
    levels = kw.pop("priority_levels", 1)
    policy = BatchPolicy(kw.pop("max_batch_size", 8), dynamic=kw.pop("dynamic", True),
                         max_queue_delay_ns=kw.pop("delay_ms", 5) * 1_000_000, priority_levels=levels,
                         default_priority=levels, queue_policies={lvl: qp for lvl in range(1, levels + 1)},
                         preferred_batch_sizes=kw.pop("preferred", ()))

    def run(feed):
        if counter is not None:
            counter.append(feed["x"].shape[0])
        return adapter.run(feed)

    return DynamicBatcher("test", [FunctionRunner(run) for _ in range(kw.pop("instances", 1))], policy)


def _x(v: float, rows: int = 1) -> dict:
    return {"x": np.full((rows, 4), v, np.float32)}


def test_batch_splits_per_request_with_mixed_sizes(adapter):
    async def main():
        runs: list[int] = []
        b = _batcher(adapter, runs, delay_ms=50)
        b.start()
        futs = [b.submit(_x(i, rows=r), r) for i, r in enumerate((1, 3, 2, 2))]
        res = await asyncio.gather(*futs)
        await b.close()
        return runs, res

    runs, res = asyncio.run(main())
    assert runs == [8]
    for i, (r, rows) in enumerate(zip(res, (1, 3, 2, 2))):
        np.testing.assert_array_equal(r.outputs["y"], np.full((rows, 4), i * 2 + 1, np.float32))
        assert r.timings.batch_size == 8


def test_full_batch_and_preferred_size_dispatch_without_waiting(adapter):
    async def main():
        runs: list[int] = []
        b = _batcher(adapter, runs, delay_ms=10_000, max_batch_size=4, preferred=(2,))
        b.start()
        t0 = time.monotonic()
        await asyncio.gather(*[b.submit(_x(i), 1) for i in range(4)])  # 4 = max: no waiting for the delay
        await asyncio.gather(*[b.submit(_x(i), 1) for i in range(2)])  # 2 = preferred: no waiting either
        elapsed = time.monotonic() - t0
        await b.close()
        return runs, elapsed

    runs, elapsed = asyncio.run(main())
    assert elapsed < 5 and sum(runs) == 6 and max(runs) >= 2


def test_queue_limit_rejects_and_recovers(adapter):
    async def main():
        b = _batcher(adapter, delay_ms=200, max_batch_size=8, queue=QueuePolicy(max_queue_size=3))
        b.start()
        futs = [b.submit(_x(i), 1) for i in range(3)]
        with pytest.raises(QueueFullError, match="queue is full"):
            b.submit(_x(9), 1)
        assert b.queued == 3
        await asyncio.gather(*futs)
        ok = await b.submit(_x(1), 1)  # room again
        await b.close()
        return ok

    np.testing.assert_array_equal(asyncio.run(main()).outputs["y"], np.full((1, 4), 3, np.float32))


def test_timeouts_reject_or_delay(adapter):
    async def main():
        b = _batcher(adapter, dynamic=False, queue=QueuePolicy(max_queue_size=16))
        gate = threading.Event()
        slow_run = b.runners[0].fn
        b.runners[0].fn = lambda feed: (gate.wait(5), slow_run(feed))[1]
        b.start()
        first = b.submit(_x(0), 1)  # occupies the only instance until the gate opens
        await asyncio.sleep(0.05)
        late = b.submit(_x(1), 1, timeout_us=20_000)
        await asyncio.sleep(0.1)
        gate.set()
        with pytest.raises(RequestTimeoutError, match="timed out after waiting 20 ms"):
            await late
        await first
        await b.close()

        gate.clear()
        d = _batcher(adapter, dynamic=False, queue=QueuePolicy(max_queue_size=16, timeout_action="DELAY"))
        d.runners[0].fn = lambda feed: (gate.wait(5), slow_run(feed))[1]
        d.start()
        f0 = d.submit(_x(0), 1)
        await asyncio.sleep(0.05)
        delayed = d.submit(_x(1), 1, timeout_us=10_000)
        await asyncio.sleep(0.05)
        fresh = d.submit(_x(2), 1)
        gate.set()
        order = []
        for name, f in (("delayed", delayed), ("fresh", fresh)):
            f.add_done_callback(lambda _f, name=name: order.append(name))
        await asyncio.gather(f0, delayed, fresh)
        await d.close()
        return order

    assert asyncio.run(main()) == ["fresh", "delayed"]


def test_priority_levels_run_high_priority_first(adapter):
    async def main():
        order: list[float] = []
        b = _batcher(adapter, dynamic=False, priority_levels=2)
        gate = threading.Event()
        base = b.runners[0].fn

        def run(feed):
            gate.wait(5)
            order.append(float(feed["x"][0, 0]))
            return base(feed)

        b.runners[0].fn = run
        b.start()
        blocker = b.submit(_x(0), 1)
        await asyncio.sleep(0.05)
        low = [b.submit(_x(10 + i), 1, priority=2) for i in range(2)]
        high = [b.submit(_x(20 + i), 1, priority=1) for i in range(2)]
        gate.set()
        await asyncio.gather(blocker, *low, *high)
        with pytest.raises(BadRequestError, match="priority 3 is out of range"):
            b.submit(_x(0), 1, priority=3)
        await b.close()
        return order

    assert asyncio.run(main()) == [0, 20, 21, 10, 11]


def test_a_failing_request_does_not_fail_its_batch_mates(adapter):
    async def main():
        b = _batcher(adapter, delay_ms=50)
        base = b.runners[0].fn

        def run(feed):
            if np.any(feed["x"] < 0):
                raise RuntimeError("negative input poisons the engine")
            return base(feed)

        b.runners[0].fn = run
        b.start()
        good = [b.submit(_x(i), 1) for i in range(3)]
        bad = b.submit(_x(-1), 1)
        res = await asyncio.gather(*good, bad, return_exceptions=True)
        await b.close()
        return res

    res = asyncio.run(main())
    for i, r in enumerate(res[:3]):
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 4), 2 * i + 1, np.float32))
    assert isinstance(res[3], InferenceFailedError) and "poisons" in str(res[3])


def test_drain_finishes_everything_queued(adapter):
    async def main():
        b = _batcher(adapter, delay_ms=20, max_batch_size=2, instances=2)
        b.start()
        futs = [b.submit(_x(i), 1) for i in range(9)]
        await b.close()
        assert all(f.done() and not f.exception() for f in futs)
        with pytest.raises(Exception, match="unloading"):
            b.submit(_x(0), 1)

    asyncio.run(main())
