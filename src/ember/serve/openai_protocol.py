"""The OpenAI API's request fields -> ember's sampling parameters, and ember's outputs -> the API's JSON
(completions, chat completions, their streamed chunks, logprobs, usage). Protocol only; openai_app.py
serves it."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ..llm.errors import RequestError
from ..llm.outputs import RequestOutput, TokenLogprob
from ..llm.sampling import SamplingParams

MAX_N = 8
# fields the API defines that ember accepts only in their default form
_DEFAULT_ONLY = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
                 "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                 "parallel_tool_calls": (None, True, False)}


@dataclass
class Parsed:
    model: str
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _check_type(body: dict, key: str, types: tuple, what: str) -> Any:
    v = body.get(key)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
        raise RequestError(f"'{key}' must be {what}")
    return v


def parse_common(body: Any, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, allowed in _DEFAULT_ONLY.items():
        if key in body and body[key] not in allowed:
            raise RequestError(f"'{key}' is not supported by ember serve; leave it out")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("'response_format' other than {\"type\": \"text\"} is not supported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: the name of a served model (GET /v1/models lists them)")
    n = _check_type(body, "n", (int,), "an integer") or 1
    if not 1 <= n <= MAX_N:
        raise RequestError(f"'n' must be in 1..{MAX_N}")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings")
    if chat:
        max_tokens = _check_type(body, "max_completion_tokens", (int,), "an integer")
        if max_tokens is None:
            max_tokens = _check_type(body, "max_tokens", (int,), "an integer")
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise RequestError("'logprobs' must be true or false")
        top = _check_type(body, "top_logprobs", (int,), "an integer")
        if top is not None and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        logprobs = (top or 0) if lp else None
    else:
        max_tokens = _check_type(body, "max_tokens", (int,), "an integer")
        logprobs = _check_type(body, "logprobs", (int,), "an integer")
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise RequestError("'logprobs' must be in 0..5")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    kw: dict[str, Any] = {}
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        v = _check_type(body, key, (int, float), "a number")
        if v is not None:
            kw[key] = float(v)
    for key in ("top_k", "seed"):
        v = _check_type(body, key, (int,), "an integer")
        if v is not None:
            kw[key] = 0 if key == "top_k" and v == -1 else v  # top_k -1 is vLLM's "off"
    for key in ("ignore_eos", "include_stop_str_in_output"):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, bool):
                raise RequestError(f"'{key}' must be true or false")
            kw[key] = v
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("'stop_token_ids' must be a list of integers")
        kw["stop_token_ids"] = ids
    params = SamplingParams(max_tokens=max_tokens or (1 << 30 if chat else 16), stop=list(stop or []),
                            logprobs=logprobs, **kw)
    return Parsed(model, params, n, stream, bool((opts or {}).get("include_usage")), max_tokens is not None)


def parse_prompts(body: dict) -> list[Any]:
    """The completions API's prompt: a string, a list of strings, a list of token ids, or a list of those."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return [p]
        if all(isinstance(s, str) for s in p):
            return list(p)
        if all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in p):
            return list(p)
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists")


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """Messages for the chat template; content parts of type text are joined into one string."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**m, "content": content or ""})
    return out


# -- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(lps: list[TokenLogprob]) -> Optional[dict[str, Any]]:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": s, "logprob": v, "bytes": _bytes(s)} for _, s, v in t.top]}
                        for t in lps]}


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for t in lps:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: v for _, s, v in t.top} for t in lps], "text_offset": offsets}


class Choice:
    """One choice's accumulated result."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.logprobs += out.logprobs
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.finished:
            self.finish_reason = _reason(out.finish_reason)


def _reason(r: Optional[str]) -> Optional[str]:
    return None if r is None else ("length" if r == "length" else "stop")


def completion_body(rid: str, model: str, choices: list[Choice], want_lp: bool, prompts: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": "".join(c.text),
                         "logprobs": completion_logprobs(c.logprobs, 0) if want_lp else None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": _total_usage(choices, prompts)}


def chat_body(rid: str, model: str, choices: list[Choice], want_lp: bool) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                         "logprobs": chat_logprobs(c.logprobs) if want_lp else None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": _total_usage(choices, 1)}


def _total_usage(choices: list[Choice], prompts: int) -> dict[str, Any]:
    """Each distinct prompt counts once (n choices of one prompt share it), every completion counts."""
    per_prompt: dict[int, Choice] = {}
    n = max(len(choices) // max(prompts, 1), 1)
    for c in choices:
        per_prompt.setdefault(c.index // n, c)
    return usage(sum(c.prompt_tokens for c in per_prompt.values()), sum(c.completion_tokens for c in choices),
                 sum(c.cached_tokens for c in per_prompt.values()))


def completion_chunk(rid: str, model: str, created: int, index: int, out: RequestOutput, want_lp: bool,
                     offset: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": out.text,
                         "logprobs": completion_logprobs(out.logprobs, offset) if want_lp else None,
                         "finish_reason": _reason(out.finish_reason) if out.finished else None}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any], finish: Optional[str],
               logprobs: Optional[list[TokenLogprob]] = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta,
                         "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                         "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, choices: list[Choice], prompts: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": _total_usage(choices, prompts)}
