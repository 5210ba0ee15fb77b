"""Tactics per shape bucket: the tuner's timing run again at a few smaller sizes of a dynamic dim.

Tactics are timed at the profile's ``opt`` shapes; a dim that varies within the profile (the batch,
1..64) then runs every size with tiles chosen for ``opt``, which costs the small sizes most (BERT-base
fp16 on the H200, tuned at batch 64: 1.9 ms at batch 1 against 0.57 ms for an engine built for 1).
So the builder also times at

- the profile's ``min`` of that dim,
- one middle size: the runtime's bucket size (runtime/buckets.py) nearest the geometric mean of min
  and opt (1..64: 8),
- and ``opt`` (already timed),

at most three sizes, so a build costs at most two more timing runs. Each is the tuner's own run
(select_tactics) with the other dims at ``opt``: the timing cache serves every node whose shapes do
not depend on the dim (weights' preparation, a per-sample op) and every node seen in an earlier
build, so only the GEMMs, convolutions and attention whose shapes change are timed again. Sizes
above ``opt`` keep the ``opt`` winner, as before.

Where a node's winners differ between sizes, graph.json records them (runtime/tactic_buckets.py)
and the runtime gives each specialized input signature the choice of the nearest bucket at or above
its size. The dim is the runtime's bucketed one (the first input's first dim) if it varies in the
first profile, else the first dim that does.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ir.graph import Graph
from ..ir.shapes import as_symbol
from ..kernels import candidates
from ..runtime.buckets import batch_symbol, bucket_size
from ..runtime.tactic_buckets import KEY, BucketChoices
from .profiles import Profile, opt_feeds
from .progress import ProgressFn
from .tuner import TimingCache, select_tactics

log = logging.getLogger(__name__)


@dataclass
class BucketTuning:
    """What bucket tuning did: the dim, the sizes timed, and the nodes whose choice differs."""

    symbol: str
    sizes: list[int]
    nodes: dict[str, BucketChoices] = field(default_factory=dict)
    timed: int = 0  # nodes timed at the extra sizes (not served by the timing cache)
    cached: int = 0

    def manifest(self) -> dict:
        return {"symbol": self.symbol, "sizes": list(self.sizes), "nodes": len(self.nodes)}


def varying_symbol(graph: Graph, profile: Profile) -> Optional[tuple[str, int, int]]:
    """(symbol, min, opt) of the dim tactics are bucketed on, or None when no dim varies below opt."""
    ranges: dict[str, tuple[int, int]] = {}
    for v in graph.inputs:
        if v.name not in profile or v.shape is None:
            continue
        lo, opt, _ = profile[v.name]
        for i, d in enumerate(v.shape):
            s = as_symbol(d)
            if s is not None and i < len(lo) and lo[i] < opt[i]:
                ranges.setdefault(s, (int(lo[i]), int(opt[i])))
    if not ranges:
        return None
    first = batch_symbol(graph)
    s = first if first in ranges else next(iter(ranges))
    return s, ranges[s][0], ranges[s][1]


def bucket_sizes(lo: int, opt: int) -> list[int]:
    """The sizes to time at: min, the runtime bucket nearest their geometric mean, and opt."""
    if lo >= opt:
        return [opt]
    mid = min(max(bucket_size(round(math.sqrt(lo * opt))), lo), opt)
    return sorted({lo, mid, opt})


def profile_at(graph: Graph, profile: Profile, symbol: str, size: int) -> Profile:
    """``profile`` with ``symbol`` set to ``size`` in its opt shapes (min and max kept)."""
    out: Profile = {}
    inputs = {v.name: v for v in graph.inputs}
    for name, (lo, opt, hi) in profile.items():
        v = inputs.get(name)
        dims = list(opt)
        for i, d in enumerate((v.shape or ()) if v is not None else ()):
            if as_symbol(d) == symbol and i < len(dims):
                dims[i] = size
        out[name] = (lo, tuple(dims), hi)
    return out


def tune_buckets(graph: Graph, device: torch.device, profiles: list[Profile], level: int, cache: TimingCache,
                 progress: ProgressFn = None, *, allow_tf32: bool = False) -> Optional[BucketTuning]:
    """Time the tunable nodes of ``graph`` (already tuned at opt: meta.tactic) at the bucket sizes of
    the first profile's varying dim and record per node the winners where they differ. ``profiles``:
    the tuning profiles (every input covered). None when no dim varies or nothing is tunable."""
    if not profiles or level == 0:
        return None
    found = varying_symbol(graph, profiles[0])
    if found is None:
        return None
    symbol, lo, opt = found
    sizes = bucket_sizes(lo, opt)
    tunable = [n for n in graph.nodes if candidates(n, device)]
    if len(sizes) < 2 or not tunable:
        return None
    before = {n.name: n.meta.get("tactic") for n in tunable}  # None: the node had none (inside a fusion group)
    at_opt = {name: t or "reference" for name, t in before.items()}
    for n in tunable:
        n.meta.pop(KEY, None)
    chosen: dict[str, dict[int, str]] = {n.name: {opt: at_opt[n.name]} for n in tunable}
    result = BucketTuning(symbol, sizes)
    try:
        for size in sizes:
            if size == opt:
                continue
            feeds = opt_feeds(graph, [profile_at(graph, profiles[0], symbol, size)], device)
            report = select_tactics(graph, device, feeds, level, cache, progress, allow_tf32=allow_tf32)
            result.timed += report.timed
            result.cached += report.cached
            for n in tunable:
                # a node this size does not reach (a branch) keeps the opt winner
                chosen[n.name][size] = n.meta.get("tactic", at_opt[n.name])
    finally:
        for n in tunable:
            if before[n.name] is None:
                n.meta.pop("tactic", None)
            else:
                n.meta["tactic"] = before[n.name]
    for n in tunable:
        picks = chosen[n.name]
        if len(set(picks.values())) > 1:
            rec = BucketChoices(symbol, tuple(sizes), tuple(picks[s] for s in sizes))
            n.meta[KEY] = rec.to_meta()
            result.nodes[n.name] = rec
    log.info("tactics per %s bucket %s: %d node(s) choose differently by size (%d timed, %d from the cache)",
             symbol, sizes, len(result.nodes), result.timed, result.cached)
    return result


__all__ = ["BucketTuning", "bucket_sizes", "profile_at", "tune_buckets", "varying_symbol"]
