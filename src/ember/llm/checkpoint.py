"""Reading checkpoints: Hugging Face folders (config.json, safetensors, tokenizer.json) here, GGUF files in
gguf_file.py. Both give a :class:`Checkpoint`: the config, the weights under ember's names, the tokenizer.

ember's weight names (one fused QKV and one fused gate/up projection per layer, as gpt-fast)::

    tok_embeddings.weight                          norm.weight            output.weight (absent when tied)
    layers.<i>.attention_norm.weight               layers.<i>.ffn_norm.weight
    layers.<i>.attention.wqkv.weight|bias          layers.<i>.attention.wo.weight|bias
    layers.<i>.feed_forward.w13.weight|bias        layers.<i>.feed_forward.w2.weight|bias

Pickled weights (``pytorch_model.bin``) are refused: loading them runs code from the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import ModelConfig, config_from_hf
from .errors import CheckpointError
from .tokenizer import TokenizerSpec

MAX_JSON_BYTES = 64 << 20


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # ember's names; dense, or 4-bit blocks kept from a GGUF file (quant.py)
    tokenizer: TokenizerSpec
    source: str
    name: str


def load_checkpoint(path: "str | os.PathLike") -> Checkpoint:
    """A Hugging Face checkpoint folder or a .gguf file."""
    p = Path(path)
    if p.is_dir():
        return load_hf_folder(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf_file import load_gguf

        return load_gguf(p)
    if not p.exists():
        raise CheckpointError(f"'{p}' does not exist; give a Hugging Face checkpoint folder, a .gguf file or an "
                              "LLM engine (.engine)")
    raise CheckpointError(f"'{p}' is neither a checkpoint folder nor a .gguf file; give a Hugging Face checkpoint "
                          "folder (config.json, *.safetensors, tokenizer.json) or a GGUF file")


def read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} is over {MAX_JSON_BYTES >> 20} MiB; not a {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: the {what} is not valid JSON: {e}") from None


# -- Hugging Face folders ------------------------------------------------------------------------------------
def load_hf_folder(folder: Path) -> Checkpoint:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face checkpoint folder has config.json, "
                              "*.safetensors and tokenizer.json")
    raw = read_json(cfg_path, "model config")
    config = config_from_hf(raw, str(cfg_path))
    tensors = _safetensors_reader(folder)
    weights = map_hf_weights(config, tensors, str(folder))
    return Checkpoint(config, weights, _hf_tokenizer(folder, config), str(folder), folder.name)


def _safetensors_reader(folder: Path) -> Callable[[str], Optional[torch.Tensor]]:
    """A function name -> tensor (None when absent) over the folder's safetensors files."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted(set(wm.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        wm = None
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f" It has {', '.join(pickles[:3])}: pickled weights, which ember does not load (loading them runs "
                "code from the file). Convert them once where you trust the file: "
                "`python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"`"
                ) if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights.{hint}")
    handles: dict[str, Any] = {}
    where: dict[str, str] = {}
    for f in files:
        path = folder / os.path.basename(f)
        try:
            h = safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: cannot read the safetensors file: {e}") from None
        handles[f] = h
        for k in h.keys():
            where[k] = f
    if wm is not None:
        missing = sorted(k for k, f in wm.items() if where.get(k) != f)
        if missing:
            raise CheckpointError(f"{index}: tensor '{missing[0]}' is not in {wm[missing[0]]} "
                                  f"({len(missing)} missing); the download is incomplete")

    def get(name: str) -> Optional[torch.Tensor]:
        f = where.get(name)
        return None if f is None else handles[f].get_tensor(name)

    get.names = set(where)  # type: ignore[attr-defined]
    return get


def map_hf_weights(cfg: ModelConfig, get: Callable[[str], Optional[torch.Tensor]],
                   where: str) -> dict[str, torch.Tensor]:
    """transformers' names -> ember's, fusing q/k/v and gate/up (Baichuan's W_pack is already fused)."""
    def need(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise CheckpointError(f"{where}: tensor '{name}' is missing; the checkpoint does not match its config "
                                  f"({cfg.architecture})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(t.shape)}, the config implies "
                                  f"{list(shape)}")
        return t

    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": need("model.embed_tokens.weight", (cfg.vocab_size, h)),
                                    "norm.weight": need("model.norm.weight", (h,))}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        if cfg.architecture == "baichuan":
            out[f"{dst}.attention.wqkv.weight"] = need(f"{src}.self_attn.W_pack.weight", (q + 2 * kv, h))
        else:
            out[f"{dst}.attention.wqkv.weight"] = torch.cat([
                need(f"{src}.self_attn.q_proj.weight", (q, h)), need(f"{src}.self_attn.k_proj.weight", (kv, h)),
                need(f"{src}.self_attn.v_proj.weight", (kv, h))])
            if cfg.qkv_bias:
                out[f"{dst}.attention.wqkv.bias"] = torch.cat([
                    need(f"{src}.self_attn.q_proj.bias", (q,)), need(f"{src}.self_attn.k_proj.bias", (kv,)),
                    need(f"{src}.self_attn.v_proj.bias", (kv,))])
        out[f"{dst}.attention.wo.weight"] = need(f"{src}.self_attn.o_proj.weight", (h, q))
        if cfg.o_bias:
            out[f"{dst}.attention.wo.bias"] = need(f"{src}.self_attn.o_proj.bias", (h,))
        out[f"{dst}.feed_forward.w13.weight"] = torch.cat([need(f"{src}.mlp.gate_proj.weight", (inter, h)),
                                                           need(f"{src}.mlp.up_proj.weight", (inter, h))])
        out[f"{dst}.feed_forward.w2.weight"] = need(f"{src}.mlp.down_proj.weight", (h, inter))
        if cfg.mlp_bias:
            out[f"{dst}.feed_forward.w13.bias"] = torch.cat([need(f"{src}.mlp.gate_proj.bias", (inter,)),
                                                             need(f"{src}.mlp.up_proj.bias", (inter,))])
            out[f"{dst}.feed_forward.w2.bias"] = need(f"{src}.mlp.down_proj.bias", (h,))
        out[f"{dst}.attention_norm.weight"] = need(f"{src}.input_layernorm.weight", (h,))
        out[f"{dst}.ffn_norm.weight"] = need(f"{src}.post_attention_layernorm.weight", (h,))
    if not cfg.tie_word_embeddings:
        head = need("lm_head.weight", (cfg.vocab_size, h))
        if cfg.norm_head:  # Baichuan2's NormHead: the rows are normalized once, at inference
            head = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
        out["output.weight"] = head
    return out


def _special(v: Any) -> Optional[str]:
    if isinstance(v, dict):  # an AddedToken serialized as {"content": ..., ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


def _hf_tokenizer(folder: Path, cfg: ModelConfig) -> TokenizerSpec:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        extra = " It has tokenizer.model (sentencepiece): save it as tokenizer.json once with transformers: " \
                "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`." if (folder / "tokenizer.model").is_file() \
            else ""
        raise CheckpointError(f"{folder}: no tokenizer.json.{extra}")
    try:
        text = tj.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tj}: cannot read the tokenizer: {e}") from None
    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer config") if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json", "chat template").get("chat_template")
    stops = list(cfg.eos_token_ids)
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen, "generation config").get("eos_token_id")
        stops += [eos] if isinstance(eos, int) else [int(t) for t in eos or []]
    return TokenizerSpec(tokenizer_json=text, chat_template=template if isinstance(template, str) else None,
                         bos_token=_special(tc.get("bos_token")), eos_token=_special(tc.get("eos_token")),
                         add_bos_token=bool(tc.get("add_bos_token", False)),
                         stop_token_ids=tuple(dict.fromkeys(int(t) for t in stops)))
