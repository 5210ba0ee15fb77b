"""`ember serve` with LLM engines in the repository, through the official `openai` Python client (and raw
HTTP where the client hides what is checked): models, completions, chat, SSE streaming ending with [DONE],
usage, logprobs, errors in OpenAI's shape (400/404/429), client disconnects that free KV blocks,
Prometheus metrics, and KServe v2 infer on the same model."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from ember.cli.main import main
from ember.llm.engine import LLMEngine
from ember.llm.sampling import SamplingParams
from ember.serve import ServerSettings, ServerThread

from .helpers import save_hf_checkpoint, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> Path:
    folder = save_hf_checkpoint(tiny_hf_model("llama3"), tmp_path_factory.mktemp("ck") / "tiny")
    out = tmp_path_factory.mktemp("eng") / "tiny.engine"
    assert main(["llm", "build", str(folder), "-o", str(out), "--dtype", "fp32"]) == 0
    return out


def _repo(root: Path, engine: Path, models: dict[str, str]) -> Path:
    for name, config in models.items():
        (root / name / "1").mkdir(parents=True)
        shutil.copy(engine, root / name / "1" / "model.engine")
        if config:
            (root / name / "config.pbtxt").write_text(config)
    return root


def _server(repo: Path) -> ServerThread:
    return ServerThread(ServerSettings(repo, host="127.0.0.1", http_port=0, grpc_port=None, gpu_metrics=False)).start()


SMALL_QUEUE = 'parameters { key: "max_queue_size" value { string_value: "2" } }\n' \
              'parameters { key: "max_num_seqs" value { string_value: "1" } }\n'


@pytest.fixture(scope="module")
def server(tiny_engine: Path, tmp_path_factory):
    repo = _repo(tmp_path_factory.mktemp("repo"), tiny_engine, {"tiny": "", "tiny-small-queue": SMALL_QUEUE})
    srv = _server(repo)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_engine: Path) -> LLMEngine:
    return LLMEngine.load(tiny_engine, device="cpu")


def _kv_usage(server, name: str = "tiny") -> float:
    return server.service.repository.get(name, None).llm.engine.kv_usage()


def test_models_and_completions(client: openai.OpenAI, reference: LLMEngine):
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "tiny-small-queue"]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    want = reference.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 12, 18)
    # several prompts (strings or token ids) are several choices
    r = client.completions.create(model="tiny", prompt=["Hello", "Hi"], max_tokens=4, temperature=0.0)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == want.text[: len(r.choices[0].text)]
    ids = reference.prompt_ids("Hello")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0.0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == want.text


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI, reference: LLMEngine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    ids = reference.tokenizer.chat_prompt_ids(messages)
    want = reference.generate([ids], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want.text
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_sse_wire_format_ends_with_done(server, reference: LLMEngine):
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) >= 1
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    want = reference.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].text
    assert "".join(e["choices"][0]["text"] for e in events) == want


def test_logprobs_n_seed_and_stop(client: openai.OpenAI, reference: LLMEngine):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0.0, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert lp[0].logprob == pytest.approx(lp[0].top_logprobs[0].logprob)  # greedy picks the most likely
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0.0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 1
    a = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=3,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=3,
                                  extra_body={"ignore_eos": True})
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2
    assert a.usage.completion_tokens == 16 and a.usage.prompt_tokens == 6
    full = reference.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].text
    stop = full[4:7]
    s = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0.0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert s.choices[0].text == full[: full.index(stop)] and s.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(client: openai.OpenAI, server):
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1.0)
    with pytest.raises(openai.BadRequestError, match="must be shorter"):
        client.completions.create(model="tiny", prompt="x" * 300, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    r = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions", json={"model": "tiny"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]


def test_a_full_queue_answers_429(server):
    """max_num_seqs 1 and max_queue_size 2: of many concurrent requests, some run, the rest get 429 at once."""
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    body = {"model": "tiny-small-queue", "prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(url, json=body) for _ in range(12)))

    results = asyncio.run(main())
    codes = [r.status_code for r in results]
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}
    err = next(r for r in results if r.status_code == 429).json()["error"]
    assert err["code"] == "queue_full" and "retry" in err["message"]
    assert _kv_usage(server, "tiny-small-queue") == 0.0


def test_disconnects_abort_and_free_blocks(server):
    url = f"http://127.0.0.1:{server.http_port}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 200,
            "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", url, json={**body, "stream": True}) as r:  # leave after 3 events
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n == 3:
                        break
            while engine.has_unfinished():  # the stream's abort reaches the engine at its next step
                await asyncio.sleep(0.001)
            # a non-streaming request whose client gives up while it runs
            task = asyncio.ensure_future(c.post(url, json=body))
            while not engine.scheduler.running:
                assert not task.done(), task.result().text
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    engine = server.service.repository.get("tiny", None).llm.engine
    step = engine.step

    def slow_step():  # 200 tokens take a second or more: the clients leave while their requests run
        time.sleep(0.005)
        return step()

    before = _aborted(server)
    engine.step = slow_step
    try:
        asyncio.run(main())
    finally:
        engine.step = step
    for _ in range(200):
        if _kv_usage(server) == 0.0 and _aborted(server) >= before + 2:
            break
        time.sleep(0.05)
    assert _kv_usage(server) == 0.0 and _aborted(server) >= before + 2


def _metrics(server) -> str:
    return httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text


def _aborted(server) -> float:
    for line in _metrics(server).splitlines():
        if line.startswith('ember_llm_requests_total{finish_reason="abort",model="tiny"'):
            return float(line.split()[-1])
    return 0.0


def test_metrics_next_to_the_servers(client: openai.OpenAI, server):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0.0)
    text = _metrics(server)
    for name in ("ember_llm_time_to_first_token_seconds_bucket", "ember_llm_inter_token_latency_seconds_bucket",
                 "ember_llm_queue_time_seconds_bucket", "ember_llm_request_duration_seconds_count",
                 "ember_llm_requests_running", "ember_llm_requests_waiting", "ember_llm_kv_cache_usage",
                 "ember_llm_prompt_tokens_total", "ember_llm_generation_tokens_total",
                 'nv_inference_request_success{model="tiny",version="1"}'):
        assert name in text, name
    usage = [ln for ln in text.splitlines() if ln.startswith('ember_llm_kv_cache_usage{model="tiny"')]
    assert usage and float(usage[0].split()[-1]) == 0.0


def test_kserve_v2_infer_on_the_llm(server, reference: LLMEngine):
    url = f"http://127.0.0.1:{server.http_port}/v2/models/tiny"
    meta = httpx.get(url, timeout=30).json()
    assert meta["platform"] == "ember_llm" and meta["inputs"][0]["name"] == "text_input"
    r = httpx.post(url + "/infer", json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                                     "data": ["Hello"]}],
                                         "parameters": {"max_tokens": 6, "temperature": 0}}, timeout=60)
    assert r.status_code == 200, r.text
    want = reference.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=6))[0].text
    assert r.json()["outputs"][0]["data"] == [want]


def test_smollm2_answers_paris_through_the_openai_client(smollm2_path: Path, tmp_path: Path):
    eng = tmp_path / "smol.engine"
    assert main(["llm", "build", str(smollm2_path), "-o", str(eng), "--dtype", "fp32"]) == 0
    srv = _server(_repo(tmp_path / "repo", eng, {"smollm2": ""}))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content == "The capital of France is Paris."
        assert r.choices[0].finish_reason == "stop"
        stream = c.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32, stream=True,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "The capital of France is Paris."
    finally:
        srv.stop()
