"""Loading checkpoints: Hugging Face folders and GGUF files, for every supported architecture, against
transformers' own reading of the same files (weights bit for bit, tokenizer id for id)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.llm.checkpoint import load_checkpoint, load_hf_folder
from ember.llm.config import ModelConfig, config_from_hf
from ember.llm.errors import CheckpointError, UnsupportedModelError
from ember.llm.gguf_file import load_gguf
from ember.llm.loader import prepare
from ember.llm.model import check_weights
from ember.llm.quant import Q4Blocks, quantize_fp8, quantize_int8, quantize_q4
from ember.llm.tokenizer import Tokenizer

from .helpers import save_baichuan_checkpoint, save_hf_checkpoint, tiny_hf_model, write_tiny_gguf

ARCHS = ("llama2", "llama3", "mistral", "qwen2")


def _fused(sd: dict, i: int, names: tuple[str, ...], kind: str = "weight") -> torch.Tensor:
    return torch.cat([sd[f"model.layers.{i}.{n}.{kind}"] for n in names])


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_config_and_weights(tmp_path: Path, arch: str):
    ref = tiny_hf_model(arch)
    ckpt = load_checkpoint(save_hf_checkpoint(ref, tmp_path / arch))
    c, hc = ckpt.config, ref.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.hidden_size // hc.num_attention_heads, hc.vocab_size)
    assert c.qkv_bias == (arch == "qwen2") and c.tie_word_embeddings == (arch == "qwen2")
    assert c.sliding_window == (12 if arch == "mistral" else None)
    assert c.rope_scaling.kind == ("llama3" if arch == "llama3" else "default")
    assert c.eos_token_ids == (257,) and c.bos_token_id == 256
    sd = ref.state_dict()
    w = ckpt.weights
    for i in range(c.num_layers):
        assert torch.equal(w[f"layers.{i}.attention.wqkv.weight"],
                           _fused(sd, i, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
        assert torch.equal(w[f"layers.{i}.feed_forward.w13.weight"], _fused(sd, i, ("mlp.gate_proj", "mlp.up_proj")))
        assert torch.equal(w[f"layers.{i}.feed_forward.w2.weight"], sd[f"model.layers.{i}.mlp.down_proj.weight"])
        if arch == "qwen2":
            assert torch.equal(w[f"layers.{i}.attention.wqkv.bias"],
                               _fused(sd, i, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "bias"))
    assert ("output.weight" in w) == (arch != "qwen2")
    check_weights(c, prepare(ckpt, torch.float32).weights, "dense")
    tok = Tokenizer(ckpt.tokenizer)
    assert tok.encode("hi") == [256, ord("h"), ord("i")]  # add_bos_token from tokenizer_config.json
    assert tok.stop_token_ids == {257}


def test_baichuan_packed_qkv_and_norm_head(tmp_path: Path):
    folder, ref = save_baichuan_checkpoint(tmp_path / "baichuan")
    ckpt = load_checkpoint(folder)
    assert ckpt.config.architecture == "baichuan" and ckpt.config.norm_head
    sd = ref.state_dict()
    assert torch.equal(ckpt.weights["layers.0.attention.wqkv.weight"],
                       _fused(sd, 0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
    # the head is stored raw and normalized on load, as Baichuan2's NormHead does at inference
    assert torch.allclose(ckpt.weights["output.weight"], sd["lm_head.weight"], atol=1e-6)
    assert torch.allclose(ckpt.weights["output.weight"].norm(dim=-1), torch.ones(ref.config.vocab_size), atol=1e-5)


def test_rope_config_forms():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling}, "config.json")
    new = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}}, "config.json")
    assert old == new and old.rope_theta == 500000.0 and old.rope_scaling.factor == 8.0
    lin = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}, "config.json")
    assert lin.rope_scaling.kind == "linear" and lin.num_kv_heads == 2 and lin.head_dim == 4
    with pytest.raises(UnsupportedModelError, match="yarn"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        config_from_hf({**base, "model_type": "gpt2"}, "config.json")
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        config_from_hf({**base, "model_type": "baichuan", "num_hidden_layers": 40}, "config.json")
    with pytest.raises(CheckpointError, match="'num_attention_heads' is missing"):
        config_from_hf({k: v for k, v in base.items() if k != "num_attention_heads"}, "config.json")
    with pytest.raises(UnsupportedModelError, match="gelu"):
        config_from_hf({**base, "hidden_act": "gelu"}, "config.json")
    cfg = old
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json())), "engine") == cfg


def test_folder_errors_name_the_problem(tmp_path: Path):
    folder = save_hf_checkpoint(tiny_hf_model("llama2"), tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickled weights"):
        load_hf_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_tokenizer_is_named(tmp_path: Path):
    folder = save_hf_checkpoint(tiny_hf_model("llama2"), tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"spm")
    with pytest.raises(CheckpointError, match="no tokenizer.json.*tokenizer.model"):
        load_hf_folder(folder)


def test_weight_shapes_are_checked(tmp_path: Path):
    ckpt = load_checkpoint(save_hf_checkpoint(tiny_hf_model("llama2"), tmp_path / "m"))
    w = prepare(ckpt, torch.float32).weights
    w["layers.1.attention.wo.weight"] = w["layers.1.attention.wo.weight"][:, :8]
    with pytest.raises(CheckpointError, match="'layers.1.attention.wo.weight' has shape"):
        check_weights(ckpt.config, w, "dense")


# -- GGUF ----------------------------------------------------------------------------------------------------
def _hf_fused_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(model.config.num_hidden_layers):
        out[f"layers.{i}.attention.wqkv.weight"] = _fused(sd, i, ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj"))
        out[f"layers.{i}.attention.wo.weight"] = sd[f"model.layers.{i}.self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w13.weight"] = _fused(sd, i, ("mlp.gate_proj", "mlp.up_proj"))
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[f"model.layers.{i}.mlp.down_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def test_smollm2_gguf_matches_transformers(smollm2_path, smollm2_hf):
    ckpt = load_gguf(smollm2_path)
    c = ckpt.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    want = _hf_fused_state(smollm2_hf)
    assert set(ckpt.weights) == set(want)
    for name, t in want.items():  # the same dequantization and the same undoing of llama.cpp's q/k permutation
        assert torch.equal(ckpt.weights[name], t), name


SMOL_TEXTS = ["What is the capital of France?", "Hello world! How are you doing today?",
              "def f(x):\n    return x * x\n", "  indented text with  double spaces", "naïve café déjà vu",
              "<|im_start|>user\nhi<|im_end|>"]


def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2, smollm2_hf_tokenizer):
    tok, ref = smollm2.tokenizer, smollm2_hf_tokenizer
    for text in SMOL_TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages) == want
    assert tok.chat_prompt_ids(messages) == ref(want, add_special_tokens=False)["input_ids"]
    assert tok.stop_token_ids == {2}  # <|im_end|>
    # digits are split one by one, as SmolLM2's own tokenizer and llama.cpp's "smollm" pre-tokenizer do
    assert [tok.decode([t]) for t in tok.encode("2024")] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_tiny_gguf_matches_transformers(tmp_path: Path, qtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_hf_model("llama3", hidden_size=64, intermediate_size=128)
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", src, qtype)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ckpt = load_gguf(path)
    assert ckpt.config.num_kv_heads == 2 and not ckpt.config.tie_word_embeddings
    for name, t in _hf_fused_state(ref).items():
        assert torch.equal(ckpt.weights[name], t), name
    # a sentencepiece vocabulary (no merges in the file: they come from the scores), byte fallback
    tok, ref_tok = Tokenizer(ckpt.tokenizer), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the cat sat on the dog", "a cat", "hello wörld 123", "the  dog\nsat"]:
        assert tok.encode(text) == ref_tok(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    # a leading space gets sentencepiece's dummy prefix too (as llama.cpp and sentencepiece do)
    assert tok.encode(" a cat")[:2] == [1, tok.backend.token_to_id("\u2581")]


def test_q4_blocks_are_kept_and_exact(tmp_path: Path):
    src = tiny_hf_model("llama2", hidden_size=64, intermediate_size=128)
    path = write_tiny_gguf(tmp_path / "q41.gguf", src, "Q4_1")
    dense, blocks = load_gguf(path), load_gguf(path, keep_q4=True)
    for name, w in blocks.weights.items():
        if name.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight")):
            assert isinstance(w, Q4Blocks), name
            assert torch.equal(w.dequantize(), dense.weights[name]), name
    prepared = prepare(blocks, torch.float32, "q4")
    check_weights(blocks.config, prepared.weights, "q4")
    assert prepared.weights["layers.0.attention.wqkv.qweight"].dtype == torch.uint8


def test_weight_quantizers_bound_their_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * torch.linspace(0.1, 3.0, 64)[:, None]
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    f8, s8 = quantize_fp8(w)
    assert f8.dtype == torch.float8_e4m3fn
    assert ((f8.float() * s8[:, None] - w).abs() <= w.abs() * 2 ** -3 + s8[:, None] * 2 ** -9).all()
    blocks = quantize_q4(w)
    err = (blocks.dequantize() - w).abs().reshape(64, 4, 32)
    step = blocks.scales.float()[..., None]
    assert (err <= step / 2 + 2e-3 * w.abs().amax()).all()
