"""The LLM engine on an NVIDIA GPU (skipped elsewhere; tests/llm/test_kernels.py also runs its kernel tests
compiled on the GPU): SmolLM2 through the Triton kernels and the decode CUDA graphs against transformers
on the same GPU, graphs against eager steps, weight-only int8 and fp8, and the OpenAI server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.llm.engine import EngineOptions, LLMEngine
from ember.llm.sampling import SamplingParams

from .helpers import hf_greedy
from .test_correctness import COMPLETIONS, QUESTIONS

pytestmark = pytest.mark.cuda
GREEDY = dict(temperature=0.0, ignore_eos=True)
PARIS = "The capital of France is Paris."


def _answer(llm: LLMEngine) -> str:
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    return "".join(o.text for o in llm.stream("What is the capital of France?", greedy, chat=True))


def test_fp32_on_the_gpu_matches_transformers(smollm2_path: Path, smollm2_hf):
    llm = LLMEngine.load(smollm2_path, device="cuda", dtype="fp32")
    assert llm.runner.graphs is not None and llm.runner.graphs.graphs  # captured at load
    hf = smollm2_hf.to("cuda")
    try:
        prompts = [llm.prompt_ids(q, chat=True) for q in QUESTIONS] + [llm.prompt_ids(c) for c in COMPLETIONS]
        outs = llm.generate(prompts, SamplingParams(max_tokens=64, **GREEDY))
        same = sum(o.token_ids == hf_greedy(hf, p, 64) for p, o in zip(prompts, outs))
        assert same >= 19, f"{same}/20 prompts identical"  # fp32 on a GPU: a near-tie may flip one
        ids = prompts[0]
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device="cuda")).logits[0, -1].double().cpu()
        mine = llm.next_token_logits(ids).double()
        assert float((mine - ref).norm() / ref.norm()) <= 1e-4
        assert llm.runner.graphs.replays > 0
    finally:
        smollm2_hf.to("cpu")


@pytest.mark.parametrize("dtype, weights", [("fp16", "dense"), ("bf16", "dense"), ("fp16", "int8"), ("fp16", "fp8"),
                                            ("fp16", "q4")])
def test_paris_in_every_precision(smollm2_path: Path, dtype: str, weights: str):
    if weights == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 weights need sm_89 or newer")
    llm = LLMEngine.load(smollm2_path, device="cuda", dtype=dtype, weights=weights)
    assert _answer(llm) == PARIS


def test_graphs_give_the_eager_tokens(smollm2_path: Path):
    graphed = LLMEngine.load(smollm2_path, device="cuda", dtype="fp16")
    eager = LLMEngine.load(smollm2_path, device="cuda", dtype="fp16", options=EngineOptions(cuda_graphs=False))
    prompts = [graphed.prompt_ids(q, chat=True) for q in QUESTIONS]
    for batch in (prompts[:1], prompts[:3], prompts):
        a = [o.token_ids for o in graphed.generate(batch, SamplingParams(max_tokens=48, **GREEDY))]
        b = [o.token_ids for o in eager.generate(batch, SamplingParams(max_tokens=48, **GREEDY))]
        assert a == b
    assert graphed.kv_usage() == 0.0


def test_openai_server_on_the_gpu(smollm2_path: Path, tmp_path: Path):
    import openai

    from ember.cli.main import main
    from ember.serve import ServerSettings, ServerThread

    (tmp_path / "repo" / "smollm2" / "1").mkdir(parents=True)
    eng = tmp_path / "repo" / "smollm2" / "1" / "model.engine"
    assert main(["llm", "build", str(smollm2_path), "-o", str(eng), "--dtype", "fp16"]) == 0
    with ServerThread(ServerSettings(tmp_path / "repo", http_port=0, grpc_port=None)) as srv:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content == PARIS
        assert srv.service.repository.get("smollm2", None).engine.device.type == "cuda"
