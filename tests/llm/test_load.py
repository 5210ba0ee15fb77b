"""A load test of `ember serve` with an LLM engine on the CPU: concurrent chat streams for a while, a quarter
of them cancelled by their client mid-stream. Zero failures; cancelled streams free their blocks; when the
load stops, no request runs or waits and KV-cache use is back to zero.

CI runs 16 streams for 8 s. The issue's run is 64 streams for 60 s:
``EMBER_LLM_LOAD=64x60 python -m pytest -q tests/llm/test_load.py -s``.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from ember.cli.main import main
from ember.serve import ServerSettings, ServerThread

from .helpers import save_hf_checkpoint, tiny_hf_model

STREAMS, SECONDS = (int(x) for x in os.environ.get("EMBER_LLM_LOAD", "16x8").split("x"))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bard".split()


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)


async def _client(i: int, url: str, deadline: float, tally: Tally) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(timeout=120) as c:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            cancel_after = rng.randint(2, 6) if n % 4 == 0 else None
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "stream": True,
                    "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0.0, 0.8]), "seed": i * 1000 + n,
                    "stream_options": {"include_usage": True}}
            start = time.monotonic()
            try:
                async with c.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        tally.failures.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    events, done, finish, first = 0, False, None, None
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        doc = json.loads(line[6:])
                        if "error" in doc:
                            tally.failures.append(f"error event: {doc['error']}")
                            break
                        for ch in doc["choices"]:
                            if ch["delta"].get("content") and first is None:
                                first = time.monotonic() - start
                            finish = ch["finish_reason"] or finish
                        if doc.get("usage"):
                            tally.tokens += doc["usage"]["completion_tokens"]
                        events += 1
                        if cancel_after is not None and events >= cancel_after:
                            break
                    if cancel_after is not None and not done:
                        tally.cancelled += 1
                    elif done and finish in ("stop", "length"):
                        tally.completed += 1
                        if first is not None:
                            tally.ttft.append(first)
                    else:
                        tally.failures.append(f"stream ended without [DONE] or finish reason ({finish}, {done})")
            except Exception as e:  # a transport error is a failure too
                tally.failures.append(f"{type(e).__name__}: {e}")


def test_concurrent_chat_streams(tmp_path: Path):
    folder = save_hf_checkpoint(tiny_hf_model("llama3"), tmp_path / "ckpt")
    repo = tmp_path / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    assert main(["llm", "build", str(folder), "-o", str(repo / "tiny" / "1" / "model.engine"), "--dtype", "fp32"]) == 0
    # a small KV pool (96 blocks of 16 tokens; a stream holds up to ~170 tokens of prompt and reply): with many
    # streams the pool runs out and requests are preempted
    (repo / "tiny" / "config.pbtxt").write_text('parameters { key: "num_blocks" value { string_value: "96" } }\n')
    srv = ServerThread(ServerSettings(repo, host="127.0.0.1", http_port=0, grpc_port=None, gpu_metrics=False)).start()
    try:
        url = f"http://127.0.0.1:{srv.http_port}/v1/chat/completions"
        tally = Tally()
        t0 = time.monotonic()

        async def run():
            await asyncio.gather(*(_client(i, url, t0 + SECONDS, tally) for i in range(STREAMS)))

        asyncio.run(run())
        elapsed = time.monotonic() - t0
        engine = srv.service.repository.get("tiny", None).llm.engine
        for _ in range(400):
            if engine.kv_usage() == 0.0 and not engine.has_unfinished():
                break
            time.sleep(0.025)
        metrics = httpx.get(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30).text
        aborted = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                      if ln.startswith('ember_llm_requests_total{finish_reason="abort"'))
        ttft = sorted(tally.ttft)
        print(f"\n{STREAMS} streams for {elapsed:.0f} s: {tally.completed} completed, {tally.cancelled} cancelled by "
              f"their clients ({aborted:.0f} aborted in the engine), {len(tally.failures)} failures, "
              f"{tally.tokens} tokens streamed ({tally.tokens / elapsed:.0f} tok/s); time to first token p50 "
              f"{ttft[len(ttft) // 2] * 1e3:.0f} ms, p99 {ttft[int(len(ttft) * 0.99)] * 1e3:.0f} ms; "
              f"{engine.scheduler.preemptions} preemptions; KV use after: {engine.kv_usage():.3f}")
        assert tally.failures == [], tally.failures[:5]
        assert tally.completed >= STREAMS and tally.cancelled >= 1 and aborted >= 1
        assert engine.kv_usage() == 0.0 and not engine.has_unfinished()
        assert engine.blocks.num_used == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    finally:
        srv.stop()
        shutil.rmtree(repo, ignore_errors=True)

