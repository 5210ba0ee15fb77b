"""From sampled tokens to what a caller sees: text deltas (stop strings cut, text that may begin a stop
string held back until it cannot), finish reasons, logprobs and usage counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Request
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One request's news from one engine step (or, from ``generate``, its whole result)."""

    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new tokens since the last output
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    scheduled_at: Optional[float] = None  # when the request first ran (monotonic clock)


class OutputState:
    """Per request: the incremental decoder and the stop-string window."""

    def __init__(self, tokenizer: Tokenizer, req: Request):
        self.tokenizer = tokenizer
        self.decoder: IncrementalDecoder = tokenizer.decode_stream(req.prompt_ids)
        self.stops = list(req.params.stop)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of ``text`` handed out
        self.stopped_at: Optional[int] = None  # where a stop string cut the text

    def add(self, token_id: int, include_stop: bool) -> bool:
        """Decode one token; True when a stop string ended the text."""
        delta = self.decoder.step(token_id)
        if not delta:
            return False
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        for s in self.stops:
            at = self.text.find(s, start)
            if at >= 0 and (self.stopped_at is None or at < self.stopped_at):
                self.stopped_at = at + (len(s) if include_stop else 0)
        if self.stopped_at is not None:
            self.text = self.text[:self.stopped_at]
            return True
        return False

    def take(self, final: bool) -> str:
        """Text ready to hand out: all of it when final, else all but a tail that may begin a stop string."""
        end = len(self.text)
        if not final and self.stops:
            end -= _partial_stop(self.text, self.stops, self.longest)
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


def _partial_stop(text: str, stops: list[str], longest: int) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0
