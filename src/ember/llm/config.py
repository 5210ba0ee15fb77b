"""The model configuration: one dataclass for every supported architecture (Llama 2/3, Mistral, Qwen2,
Baichuan2-7B), read from a Hugging Face ``config.json`` or GGUF metadata, and written into LLM engines.

The architectures differ only in a few switches (biases, packed QKV, a normalized LM head, a sliding
window, RoPE scaling), so one model definition (model.py) runs all of them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .errors import CheckpointError, UnsupportedModelError

ARCHITECTURES = ("llama", "mistral", "qwen2", "baichuan")
ROPE_KINDS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``default``: none; ``linear``: positions divided by ``factor``;
    ``llama3``: Llama 3.1's band-wise scaling of the inverse frequencies."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_freq_factors: Optional[tuple[float, ...]] = None  # GGUF's rope_freqs tensor (Llama 3.1 files)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    norm_head: bool = False  # Baichuan2: the LM head's rows are L2-normalized
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        where = f"model config ({self.architecture})"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"{where}: '{name}' must be a positive integer, not {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{where}: num_attention_heads ({self.num_heads}) is not a multiple of "
                                  f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise CheckpointError(f"{where}: head_dim {self.head_dim} is odd; RoPE needs an even head size")
        if self.rope_scaling.kind not in ROPE_KINDS:
            raise UnsupportedModelError(f"{where}: RoPE scaling '{self.rope_scaling.kind}' is not supported "
                                        f"(supported: {', '.join(ROPE_KINDS)})")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise CheckpointError(f"{where}: rms_norm_eps and rope_theta must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def parameter_count(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + L * per_layer + h + head

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * element_size

    # -- the engine file's form: plain JSON, checked on the way in ------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_freq_factors"] = list(self.rope_freq_factors) if self.rope_freq_factors is not None else None
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "ModelConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: the model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown model config field(s) {unknown}; the engine was written by "
                                  "a newer ember: upgrade ember or rebuild the engine")
        d = dict(d)
        try:
            d["rope_scaling"] = RopeScaling(**(d.get("rope_scaling") or {}))
            d["eos_token_ids"] = tuple(int(t) for t in d.get("eos_token_ids") or ())
            if d.get("rope_freq_factors") is not None:
                d["rope_freq_factors"] = tuple(float(x) for x in d["rope_freq_factors"])
            return cls(**d)
        except TypeError as e:
            raise CheckpointError(f"{where}: malformed model config ({e}); rebuild the engine") from None


def _get(cfg: dict, key: str, where: str, default: Any = ..., kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(f"{where}: field '{key}' is missing")
        return default
    v = cfg[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise CheckpointError(f"{where}: field '{key}' must be an integer, not {v!r}")
    if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise CheckpointError(f"{where}: field '{key}' must be a number, not {v!r}")
    if kind is bool and not isinstance(v, bool):
        raise CheckpointError(f"{where}: field '{key}' must be true or false, not {v!r}")
    return kind(v)


def _token_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(t) for t in v)


def _rope_from_hf(cfg: dict, where: str) -> tuple[float, RopeScaling]:
    """RoPE base and scaling: older files have ``rope_theta`` and ``rope_scaling``; transformers 5 writes
    ``rope_parameters`` (holding both)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: 'rope_parameters' / 'rope_scaling' must be objects")
    merged = {**params, **scaling}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ROPE_KINDS:
        raise UnsupportedModelError(f"{where}: RoPE scaling type '{kind}' is not supported (supported: "
                                    f"{', '.join(ROPE_KINDS)}); remove rope_scaling to run without it")
    if kind == "default":
        return float(theta), RopeScaling()
    opt = {"kind": kind, "factor": float(_get(merged, "factor", where, kind=float))}
    if kind == "llama3":
        opt["low_freq_factor"] = float(_get(merged, "low_freq_factor", where, kind=float))
        opt["high_freq_factor"] = float(_get(merged, "high_freq_factor", where, kind=float))
        opt["original_max_position_embeddings"] = _get(merged, "original_max_position_embeddings", where)
    return float(theta), RopeScaling(**opt)


def config_from_hf(cfg: Any, where: str) -> ModelConfig:
    """A Hugging Face ``config.json`` (already parsed) of a supported architecture."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or []
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' ({', '.join(map(str, archs)) or 'no architectures'}) is not "
            f"supported; ember runs {', '.join(ARCHITECTURES)} checkpoints")
    check_activation(cfg, where)
    heads = _get(cfg, "num_attention_heads", where)
    hidden = _get(cfg, "hidden_size", where)
    layers = _get(cfg, "num_hidden_layers", where)
    theta, scaling = _rope_from_hf(cfg, where)
    sliding = None
    if model_type == "mistral":
        sliding = cfg.get("sliding_window")
    elif model_type == "qwen2" and cfg.get("use_sliding_window"):
        if cfg.get("max_window_layers", layers) < layers:
            raise UnsupportedModelError(f"{where}: Qwen2 with a sliding window on only some layers "
                                        "(max_window_layers) is not supported")
        sliding = cfg.get("sliding_window")
    if model_type == "baichuan" and layers >= 40:
        raise UnsupportedModelError(f"{where}: Baichuan 13B models use ALiBi attention, which ember does not run; "
                                    "Baichuan2-7B (RoPE) is supported")
    attention_bias = bool(cfg.get("attention_bias", False))
    max_pos = cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096
    return ModelConfig(
        architecture=model_type,
        vocab_size=_get(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size", where),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", where, heads),
        head_dim=_get(cfg, "head_dim", where, hidden // heads),
        rms_norm_eps=_get(cfg, "rms_norm_eps", where, 1e-6, float),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(max_pos),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_head=model_type == "baichuan" and "BaichuanForCausalLM" in archs,
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
    )


def check_activation(cfg: dict, where: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{where}: hidden_act '{act}' is not supported (ember runs SwiGLU: silu)")
