"""`ember llm build` and `ember generate`: the LLM engine file (format.py's checked, signable zip, no code),
its weight schemes, and streaming a completion to the terminal."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import ember
from ember.cli.main import main
from ember.errors import EngineFileError
from ember.llm.engine import LLMEngine
from ember.llm.engine_file import read_llm_engine
from ember.llm.loader import load_model
from ember.llm.sampling import SamplingParams
from ember.runtime.format import read_manifest

from .helpers import save_hf_checkpoint, tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_hf_checkpoint(tiny_hf_model("qwen2", hidden_size=64, intermediate_size=128),
                              tmp_path_factory.mktemp("ckpt") / "qwen2")


def test_build_fp32_engine_runs_like_the_checkpoint(folder: Path, tmp_path: Path, capsys):
    eng = tmp_path / "m.engine"
    assert main(["llm", "build", str(folder), "-o", str(eng), "--dtype", "fp32"]) == 0
    assert "qwen2" in capsys.readouterr().out
    m = read_manifest(eng)
    assert m["kind"] == "llm" and m["precision"] == "fp32" and m["llm"]["weights"] == "dense"
    with zipfile.ZipFile(eng) as z:  # data only: the format's members, no code
        assert sorted(z.namelist()) == ["digest.json", "graph.json", "manifest.json", "weights.safetensors"]
    loaded = read_llm_engine(eng)
    direct = load_model(folder, dtype="fp32")
    assert loaded.config == direct.config and loaded.tokenizer == direct.tokenizer
    assert all(torch.equal(loaded.weights[k], direct.weights[k]) for k in direct.weights)
    a = LLMEngine(loaded, "cpu").generate([PROMPT], GREEDY)[0].token_ids
    assert a == LLMEngine(direct, "cpu").generate([PROMPT], GREEDY)[0].token_ids
    with pytest.raises(EngineFileError, match="is an LLM engine"):
        ember.Engine.load(str(eng))


@pytest.mark.parametrize("dtype, weights, tol", [("fp16", "dense", 1e-2), ("bf16", "dense", 5e-2),
                                                 ("fp32", "int8", 5e-2), ("fp32", "fp8", 2e-1),
                                                 ("fp32", "q4", 5e-1)])
def test_weight_schemes_stay_close_to_fp32(folder: Path, tmp_path: Path, dtype: str, weights: str, tol: float):
    eng = tmp_path / f"{dtype}-{weights}.engine"
    assert main(["llm", "build", str(folder), "-o", str(eng), "--dtype", dtype, "--weights", weights]) == 0
    loaded = read_llm_engine(eng)
    assert loaded.scheme == weights and loaded.dtype_name == dtype
    quant = LLMEngine(loaded, "cpu").next_token_logits(PROMPT).double()
    ref = LLMEngine(load_model(folder, dtype="fp32"), "cpu").next_token_logits(PROMPT).double()
    err = float((quant - ref).norm() / ref.norm())
    assert 0 < err <= tol, err  # not equal (the scheme is applied), within its rounding


def test_smollm2_q4_keeps_the_gguf_blocks_and_int8_still_answers(smollm2: LLMEngine, smollm2_path: Path):
    """The GGUF's Q4_1 blocks kept as they are give the dense model's logits; int8 re-quantization of them
    changes the logits but not the answer."""
    ids = smollm2.prompt_ids("What is the capital of France?", chat=True)
    ref = smollm2.next_token_logits(ids)
    q4 = LLMEngine.load(smollm2_path, device="cpu", dtype="fp32", weights="q4")
    assert q4.model.layers[0].wqkv.scheme == "q4"
    assert torch.allclose(q4.next_token_logits(ids), ref, rtol=0, atol=1e-4)
    int8 = LLMEngine.load(smollm2_path, device="cpu", dtype="fp32", weights="int8")
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    text = "".join(o.text for o in int8.stream("What is the capital of France?", greedy, chat=True))
    assert text == "The capital of France is Paris."


def test_signed_engine_needs_its_key(folder: Path, tmp_path: Path, capsys):
    key = tmp_path / "k"
    key.write_text("0123456789abcdef0123456789abcdef")
    eng = tmp_path / "s.engine"
    assert main(["llm", "build", str(folder), "-o", str(eng), "--dtype", "fp32", "--sign-key", str(key)]) == 0
    assert main(["generate", str(eng), "hi", "--max-tokens", "2", "--device", "cpu"]) == 1
    assert "is signed" in capsys.readouterr().err
    assert main(["generate", str(eng), "hi", "--max-tokens", "2", "--device", "cpu", "--verify-key", str(key)]) == 0


def test_a_damaged_engine_is_refused(folder: Path, tmp_path: Path):
    eng = tmp_path / "d.engine"
    assert main(["llm", "build", str(folder), "-o", str(eng), "--dtype", "fp32"]) == 0
    data = bytearray(eng.read_bytes())
    with zipfile.ZipFile(eng) as z:
        info = z.getinfo("graph.json")
    data[info.header_offset + 100] ^= 0xFF  # inside graph.json's bytes (stored, not deflated)
    eng.write_bytes(bytes(data))
    with pytest.raises(EngineFileError):
        read_llm_engine(eng)


def test_generate_streams_and_stops(folder: Path, capsys):
    assert main(["generate", str(folder), "Hello", "--max-tokens", "5", "--device", "cpu", "--ignore-eos",
                 "--stats"]) == 0
    captured = capsys.readouterr()
    assert "1 prompt tokens" not in captured.err and "5 generated (length)" in captured.err
    llm = LLMEngine.load(folder, device="cpu")
    want = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].text
    assert captured.out == want + "\n"
    assert main(["generate", str(folder), "Hello", "--temperature", "-1", "--device", "cpu"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_generate_chat_answers_paris(smollm2_path: Path, capsys):
    assert main(["generate", str(smollm2_path), "What is the capital of France?", "--chat", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"
