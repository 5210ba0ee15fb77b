"""Tokenizer and chat template: a ``tokenizers`` tokenizer (serialized as its JSON, the form an engine
file stores), the special tokens, and the Jinja chat template rendered in a sandbox as transformers
renders it. Streaming text comes from ``DecodeStream``, which holds back incomplete UTF-8."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Optional

from .errors import CheckpointError, RequestError


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild the tokenizer: plain data, written into the engine file."""

    tokenizer_json: str
    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    add_bos_token: bool = False  # completions: prepend BOS when the tokenizer's post-processor does not
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # end a generation (eos, <|eot_id|>...)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "TokenizerSpec":
        if not isinstance(d, dict) or not isinstance(d.get("tokenizer_json"), str):
            raise CheckpointError(f"{where}: the tokenizer entry is malformed; rebuild the engine")
        try:
            d = dict(d)
            d["stop_token_ids"] = tuple(int(t) for t in d.get("stop_token_ids") or ())
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: the tokenizer entry is malformed ({e}); rebuild the engine") from None


class Tokenizer:
    def __init__(self, spec: TokenizerSpec, where: str = "tokenizer"):
        from tokenizers import Tokenizer as HFTokenizer

        self.spec = spec
        try:
            self.backend = HFTokenizer.from_str(spec.tokenizer_json)
        except Exception as e:  # tokenizers raises Exception subclasses of its own
            raise CheckpointError(f"{where}: the tokenizer cannot be read ({e})") from None
        self.bos_id = self.backend.token_to_id(spec.bos_token) if spec.bos_token else None
        self.eos_id = self.backend.token_to_id(spec.eos_token) if spec.eos_token else None
        stops = set(spec.stop_token_ids)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_token_ids = frozenset(stops)
        self._adds_bos = self._post_processor_adds_bos()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        ids = self.backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.spec.add_bos_token and not self._adds_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token as it decodes on its own (for logprobs)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def decode_stream(self, prompt_ids: "list[int] | None" = None) -> "IncrementalDecoder":
        return IncrementalDecoder(self, prompt_ids or [])

    # -- chat ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        template = self.spec.chat_template
        if not template:
            raise RequestError("this model has no chat template; use the completions API (a plain prompt)")
        check_messages(messages)
        try:
            return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token=self.spec.bos_token or "", eos_token=self.spec.eos_token or "",
                                              **kwargs)
        except RequestError:
            raise
        except Exception as e:  # jinja2's TemplateError, a sandbox SecurityError, or a template bug
            raise RequestError(f"the model's chat template failed on these messages: {type(e).__name__}: {e}") \
                from None

    def chat_prompt_ids(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


class IncrementalDecoder:
    """Text deltas of a growing list of generated tokens (special tokens skipped). A token that ends inside
    a multi-byte character yields nothing until the character is complete."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        # the tail of the prompt primes the stream, so a first token's leading space decodes as in context
        self._stream = DecodeStream(skip_special_tokens=True)
        for tid in prompt_ids[-4:]:
            self._stream.step(tokenizer.backend, tid)

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self.tokenizer.backend, token_id) or ""
        except Exception:  # an id the tokenizer does not know (cannot come from the model's own vocabulary)
            return ""


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise RequestError(f"messages[{i}].content must be a string or a list of content parts")


def _raise_exception(message: str) -> None:
    raise RequestError(f"the chat template refused the messages: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled in jinja2's immutable sandbox, with transformers' settings and helpers."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except Exception as e:
        raise CheckpointError(f"the chat template does not compile: {type(e).__name__}: {e}") from None
