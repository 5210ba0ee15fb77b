"""Sampling: the parameters of a request, and the batched sampler.

The order is transformers' (so its logits processors are the reference the tests hold this against):
repetition penalty (over prompt and output), presence and frequency penalties (over the output, as
OpenAI defines them), temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy.

Each row is drawn by an exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly from p
without a host sync; a request with a ``seed`` draws its E from its own generator, so its tokens do not
depend on the other requests in the batch. Logprobs are those of the model's raw distribution (before
penalties, temperature and truncation), as vLLM reports them by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import RequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; n: the sampled token's logprob and the n most likely
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, why: str) -> RequestError:
            return RequestError(f"sampling parameter '{name}' {why} (got {getattr(self, name)!r})")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            return v

        if integer("max_tokens") < 1:
            raise bad("max_tokens", "must be at least 1")
        if not 0.0 <= number("temperature") <= 100.0:
            raise bad("temperature", "must be in [0, 100]")
        if not 0.0 < number("top_p") <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if integer("top_k") < 0:
            raise bad("top_k", "must be >= 0 (0 turns it off)")
        if not 0.0 <= number("min_p") <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not 0.0 < number("repetition_penalty") <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer")
        stops_ok = isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop)
        if not stops_ok or len(self.stop) > 16:
            raise bad("stop", "must be at most 16 non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be integers")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return g


@dataclass
class SampleRow:
    """What the sampler needs of one request: its parameters, its tokens so far, its generator."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: Optional[torch.Generator] = None


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: Optional[list[Optional[tuple[float, list[tuple[int, float]]]]]] = None  # per row: (lp, top-n)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition (divide positive logits, multiply negative ones, over prompt and output tokens), presence
    and frequency (subtracted, over output tokens) penalties; only rows that ask for them are touched."""
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            ids = torch.tensor(list(r.output_ids), dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, top-p and min-p (in that order) as -inf masks, per row ([R] parameters; 0 / 1 / 0 are off).
    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (transformers' rule:
    ascending sort, drop while the cumulative sum stays <= 1 - top_p, keep at least one)."""
    neg = float("-inf")
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, logits.shape[1]).clamp(max=logits.shape[1])
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None].long())
        logits = logits.masked_fill(logits < kth, neg)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), neg)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, neg)
    return logits


class Sampler:
    def __init__(self, device: torch.device, seed: Optional[int] = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> Sampled:
        """logits: [R, vocab] fp32, one row per request in ``rows``."""
        raw = logits
        want_lp = [r.params.logprobs for r in rows]
        logits = apply_penalties(logits.clone(), rows)
        greedy = [r.params.greedy for r in rows]
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        g_idx = [i for i, g in enumerate(greedy) if g]
        s_idx = [i for i, g in enumerate(greedy) if not g]
        if g_idx:
            gi = torch.tensor(g_idx, device=logits.device)
            tokens[gi] = logits[gi].argmax(dim=-1)
        if s_idx:
            si = torch.tensor(s_idx, device=logits.device)
            sub = [rows[i].params for i in s_idx]
            dev = logits.device
            temp = torch.tensor([p.temperature for p in sub], dtype=logits.dtype, device=dev)
            z = logits[si] / temp[:, None]
            z = truncate(z, torch.tensor([p.top_k for p in sub], device=dev),
                         torch.tensor([p.top_p for p in sub], dtype=logits.dtype, device=dev),
                         torch.tensor([p.min_p for p in sub], dtype=logits.dtype, device=dev))
            probs = z.softmax(dim=-1)
            tokens[si] = (probs / self._exponentials(probs.shape, [rows[i].generator for i in s_idx])).argmax(dim=-1)
        out = Sampled(tokens.tolist())
        if any(n is not None for n in want_lp):
            out.logprobs = _logprobs(raw, out.tokens, want_lp)
        return out

    def _exponentials(self, shape: torch.Size, generators: list[Optional[torch.Generator]]) -> torch.Tensor:
        e = torch.empty(shape, device=self.device)
        e.exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                e[i].exponential_(generator=g)
        return e.clamp_min_(1e-20)  # an exact 0 would turn a masked token's 0 / 0 into NaN


def _logprobs(raw: torch.Tensor, tokens: list[int], want: list[Optional[int]]) -> list:
    lp = torch.log_softmax(raw.float(), dim=-1)
    n = max(w or 0 for w in want)
    top_v, top_i = lp.topk(n, dim=-1) if n else (None, None)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    out: list = []
    for r, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        top = list(zip(top_i[r, :w].tolist(), top_v[r, :w].tolist())) if w else []
        out.append((chosen[r], top))
    return out
