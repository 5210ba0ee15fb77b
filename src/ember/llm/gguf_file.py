"""GGUF files (llama.cpp's format), read with the ``gguf`` package: config and tokenizer from the metadata,
weights dequantized (F32/F16/BF16/Q8_0/Q4_0/Q4_1 and the other types ``gguf`` dequantizes), or 4-bit
blocks kept as they are (quant.Q4Blocks) for the q4 weight scheme.

llama.cpp stores Llama's q and k projections with their rows permuted for its interleaved RoPE; they are
permuted back here, as transformers does, so one model definition runs both sources.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, UnsupportedModelError
from .quant import Q4_GROUP, Q4Blocks, Weight
from .tokenizer import TokenizerSpec

ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# pre-tokenizer regexes by tokenizer.ggml.pre (as llama.cpp and transformers use them)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_DIGIT_SPLIT = ("smollm", "starcoder", "refact")  # single digits, then GPT-2's byte-level regex


class GGUFMetadata:
    def __init__(self, reader: Any, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = ...) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata '{key}' is missing")
            return default
        try:
            return f.contents()
        except Exception as e:
            raise CheckpointError(f"{self.path}: GGUF metadata '{key}' cannot be read ({e})") from None


def load_gguf(path: Path, keep_q4: bool = False) -> Checkpoint:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'ember[llm]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/KeyError/struct errors on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = GGUFMetadata(reader, path)
    config = _config(meta)
    tensors = {t.name: t for t in reader.tensors}
    weights = _weights(config, tensors, path, keep_q4, gguf)
    if "rope_freqs.weight" in tensors:
        factors = _dense(tensors["rope_freqs.weight"], gguf).reshape(-1)
        config = _replace(config, rope_freq_factors=tuple(float(x) for x in factors))
    if "output.weight" not in tensors and not config.tie_word_embeddings:
        config = _replace(config, tie_word_embeddings=True)
    return Checkpoint(config, weights, gguf_tokenizer(meta), str(path), path.stem)


def _replace(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


def _config(meta: GGUFMetadata) -> ModelConfig:
    arch = str(meta.get("general.architecture"))
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{meta.path}: GGUF architecture '{arch}' is not supported; ember reads "
                                    f"{', '.join(ARCHITECTURES)} GGUF files")
    heads = int(meta.get(f"{arch}.attention.head_count"))
    hidden = int(meta.get(f"{arch}.embedding_length"))
    tokens = meta.reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0))
    scaling = RopeScaling()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling("linear", float(meta.get(f"{arch}.rope.scaling.factor")))
    elif kind not in ("none", None):
        raise UnsupportedModelError(f"{meta.path}: RoPE scaling '{kind}' is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        architecture=ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length")),
        num_layers=int(meta.get(f"{arch}.block_count")), num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        qkv_bias=arch == "qwen2", tie_word_embeddings=False,
        sliding_window=None, bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=(int(eos),) if eos is not None else (),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None))


def _dense(t: Any, gguf: Any) -> np.ndarray:
    """A tensor as fp32 numpy [rows, cols] (GGUF lists dims innermost first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(f"tensor '{t.name}' is stored as {t.tensor_type.name}, which the gguf package "
                                    "cannot dequantize") from None
    return np.array(data, dtype=np.float32).reshape(shape)  # a copy: the file is mapped read-only


def _q4(t: Any, gguf: Any) -> Optional[Q4Blocks]:
    """A Q4_0/Q4_1 tensor's blocks, unchanged (None for other types)."""
    q = gguf.GGMLQuantizationType
    if t.tensor_type not in (q.Q4_0, q.Q4_1):
        return None
    rows, cols = int(t.shape[1]), int(t.shape[0])
    per_block = 20 if t.tensor_type == q.Q4_1 else 18
    blocks = np.ascontiguousarray(t.data).reshape(rows, cols // Q4_GROUP, per_block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if t.tensor_type == q.Q4_1:
        m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0], blocks[..., 4:]
    else:  # (q - 8) * d == q * d + (-8 d); -8 d is exact in fp16
        m, qs = (d.astype(np.float32) * -8.0).astype(np.float16), blocks[..., 2:]
    return Q4Blocks(torch.from_numpy(np.ascontiguousarray(qs).reshape(rows, cols // 2)),
                    torch.from_numpy(np.ascontiguousarray(d)), torch.from_numpy(np.ascontiguousarray(m)))


def _unpermute_rows(heads: int, rows: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute_weights)."""
    idx = torch.arange(rows).reshape(heads, rows // heads // 2, 2)
    return idx.transpose(1, 2).reshape(rows)


def _weights(cfg: ModelConfig, tensors: dict[str, Any], path: Path, keep_q4: bool, gguf: Any) -> dict[str, Weight]:
    def need(name: str, rows: int, cols: Optional[int] = None, q4: bool = False) -> Weight:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor '{name}' is missing; the file does not match its metadata")
        shape = (rows,) if cols is None else (rows, cols)
        got = tuple(int(d) for d in reversed(t.shape)) if len(t.shape) > 1 else (int(t.shape[0]),)
        if got != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(got)}, the metadata implies {list(shape)}")
        blocks = _q4(t, gguf) if q4 and keep_q4 else None
        return blocks if blocks is not None else torch.from_numpy(_dense(t, gguf))

    def permuted(w: Weight, heads: int) -> Weight:
        if cfg.architecture == "qwen2":  # stored in transformers' order (NeoX RoPE in llama.cpp)
            return w
        order = _unpermute_rows(heads, w.shape[0])
        return w.rows(order) if isinstance(w, Q4Blocks) else w[order]

    def cat(parts: list[Weight]) -> Weight:
        if all(isinstance(p, Q4Blocks) for p in parts):
            return Q4Blocks.cat(parts)  # type: ignore[arg-type]
        return torch.cat([p.dequantize() if isinstance(p, Q4Blocks) else p for p in parts])

    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out: dict[str, Weight] = {"tok_embeddings.weight": need("token_embd.weight", cfg.vocab_size, h),
                              "norm.weight": need("output_norm.weight", h)}
    for i in range(cfg.num_layers):
        b, dst = f"blk.{i}", f"layers.{i}"
        out[f"{dst}.attention.wqkv.weight"] = cat([
            permuted(need(f"{b}.attn_q.weight", q, h, True), cfg.num_heads),
            permuted(need(f"{b}.attn_k.weight", kv, h, True), cfg.num_kv_heads),
            need(f"{b}.attn_v.weight", kv, h, True)])
        if cfg.qkv_bias:
            out[f"{dst}.attention.wqkv.bias"] = torch.cat([need(f"{b}.attn_q.bias", q), need(f"{b}.attn_k.bias", kv),
                                                           need(f"{b}.attn_v.bias", kv)])
        out[f"{dst}.attention.wo.weight"] = need(f"{b}.attn_output.weight", h, q, True)
        out[f"{dst}.feed_forward.w13.weight"] = cat([need(f"{b}.ffn_gate.weight", inter, h, True),
                                                     need(f"{b}.ffn_up.weight", inter, h, True)])
        out[f"{dst}.feed_forward.w2.weight"] = need(f"{b}.ffn_down.weight", h, inter, True)
        out[f"{dst}.attention_norm.weight"] = need(f"{b}.attn_norm.weight", h)
        out[f"{dst}.ffn_norm.weight"] = need(f"{b}.ffn_norm.weight", h)
    if "output.weight" in tensors:
        out["output.weight"] = need("output.weight", cfg.vocab_size, h)
    return out


# -- the tokenizer -------------------------------------------------------------------------------------------
def gguf_tokenizer(meta: GGUFMetadata) -> TokenizerSpec:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    types = list(meta.get("tokenizer.ggml.token_type", [])) or [1] * len(tokens)
    merges_raw = meta.get("tokenizer.ggml.merges", None)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in (merges_raw or [])]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        if pre in _SPLITS:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
        elif pre in _DIGIT_SPLIT:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":  # sentencepiece BPE with byte fallback
        vocab = {t: i for i, t in enumerate(tokens)}
        scores = list(meta.get("tokenizer.ggml.scores", [])) or [0.0] * len(tokens)
        merges = ([tuple(m.split(" ", 1)) for m in merges_raw] if merges_raw
                  else _merges_from_scores(vocab, dict(zip(tokens, scores))))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True,
                                  byte_fallback=True))
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    else:
        raise UnsupportedModelError(f"{meta.path}: GGUF tokenizer model '{kind}' is not supported (gpt2 and llama "
                                    "are)")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id", None), meta.get("tokenizer.ggml.eos_token_id", None)
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, bos_id)])
    stops = tuple(int(t) for t in (eos_id, meta.get("tokenizer.ggml.eot_token_id", None)) if t is not None)
    return TokenizerSpec(tokenizer_json=tk.to_str(), chat_template=meta.get("tokenizer.chat_template", None),
                         bos_token=bos, eos_token=eos, add_bos_token=add_bos,
                         stop_token_ids=tuple(dict.fromkeys(stops)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two tokens, best score first
    (transformers' generate_merges)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
