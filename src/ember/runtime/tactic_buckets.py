"""Tactics per shape bucket: a node's choice for each range of one dynamic dim.

The builder times anchor ops (GEMM, conv, attention) at the profile's ``opt`` shape, and since
bucket tuning also at a few smaller sizes of one dynamic dim (builder/bucket_tuning.py): a tile
picked for batch 64 is a poor one at batch 1 (BERT-base fp16 on the H200: 1.9 ms at batch 1 in an
engine tuned at 64, 0.57 ms in one built for batch 1). Where the winners differ, graph.json keeps
them next to ``meta.tactic`` (which stays the ``opt`` winner, what older embers run)::

    "meta": {"tactic": "triton.gemm[128x128x64,w8,s3]",
             "tactic_buckets": {"$dict": {"version": 1, "symbol": "batch",
                                          "buckets": [{"$dict": {"upto": 1, "tactic": "cublaslt.linear"}}, ...]}}}

Bucket ``i`` serves sizes in ``(upto[i-1], upto[i]]``: a size runs the choice of the nearest bucket
at or above it, and sizes above the last bucket run the last one's. The lookup happens once per
input signature, when the interpreter specializes it (``Interpreter.specialization``): each step
of the plan carries its bucket's bound choice (``Step.bound``), so ``Engine.run``, contexts, their
CUDA graphs and the server all run it without a lookup per run.

An engine written before this has no ``tactic_buckets`` and loads as it did. A record of a newer
version, or a malformed one, is an error naming the node; a choice this ember does not know is a
fallback (FallbackError at load), as ``meta.tactic`` is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import EngineFileError
from ..ir.graph import Graph, Node
from ..ir.shapes import as_symbol

KEY = "tactic_buckets"  # node.meta key
VERSION = 1
MAX_BUCKETS = 16


class _Reference:
    """A bucket whose choice is the op's reference function (distinct from 'no bucket choice')."""

    def __repr__(self) -> str:
        return "REFERENCE"


REFERENCE: Any = _Reference()


@dataclass(frozen=True)
class BucketChoices:
    """One node's choice per bucket of ``symbol``: ``tactics[i]`` for sizes up to ``sizes[i]``."""

    symbol: str
    sizes: tuple[int, ...]  # ascending
    tactics: tuple[str, ...]

    def index_for(self, n: int) -> int:
        """The bucket of size ``n``: the nearest one at or above it; the last above them all."""
        for i, s in enumerate(self.sizes):
            if n <= s:
                return i
        return len(self.sizes) - 1

    def choice_for(self, n: int) -> str:
        return self.tactics[self.index_for(n)]

    def to_meta(self) -> dict[str, Any]:
        return {"version": VERSION, "symbol": self.symbol,
                "buckets": [{"upto": s, "tactic": t} for s, t in zip(self.sizes, self.tactics)]}

    def describe(self) -> str:
        """``batch<=1: a; <=8: b; <=64+: c`` (the last bucket also serves larger sizes)."""
        parts = [f"<={s}{'+' if i == len(self.sizes) - 1 else ''}: {t}"
                 for i, (s, t) in enumerate(zip(self.sizes, self.tactics))]
        return f"{self.symbol}" + "; ".join(parts)

    @classmethod
    def of(cls, node: Node) -> Optional["BucketChoices"]:
        """The node's record (None when it has none); EngineFileError naming the node if malformed."""
        rec = node.meta.get(KEY)
        if rec is None:
            return None

        def bad(problem: str) -> EngineFileError:
            return EngineFileError(f"node '{node.name}' ({node.op}): meta '{KEY}' {problem}. The engine file is "
                                   "damaged or was not written by ember; rebuild it with `ember build`.")

        if not isinstance(rec, Mapping):
            raise bad("is not an object")
        version = rec.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise bad(f"has no integer 'version' ({version!r})")
        if version > VERSION:
            raise EngineFileError(
                f"node '{node.name}' ({node.op}): its per-bucket tactics are format version {version}; this ember "
                f"reads version {VERSION}. Upgrade ember, or rebuild the engine with this one (`ember build`).")
        symbol, buckets = rec.get("symbol"), rec.get("buckets")
        if not isinstance(symbol, str) or not symbol:
            raise bad("names no dim ('symbol')")
        if not isinstance(buckets, list) or not 1 <= len(buckets) <= MAX_BUCKETS:
            raise bad(f"needs 1 to {MAX_BUCKETS} buckets")
        sizes, tactics = [], []
        for b in buckets:
            upto, tactic = (b.get("upto"), b.get("tactic")) if isinstance(b, Mapping) else (None, None)
            if not isinstance(upto, int) or isinstance(upto, bool) or upto < 1 or not isinstance(tactic, str):
                raise bad(f"has a bucket {b!r} without a positive 'upto' and a 'tactic' name")
            if sizes and upto <= sizes[-1]:
                raise bad("has bucket sizes out of ascending order")
            sizes.append(upto)
            tactics.append(tactic)
        return cls(symbol, tuple(sizes), tuple(tactics))


def symbol_size(graph: Graph, feeds: Mapping[str, Any], symbol: str) -> Optional[int]:
    """The size of dim ``symbol`` in these inputs (tensors or anything with a ``shape``), or None."""
    for v in graph.inputs:
        x = feeds.get(v.name)
        shape = getattr(x, "shape", None)
        if shape is None or v.shape is None:
            continue
        for i, d in enumerate(v.shape):
            if as_symbol(d) == symbol and i < len(shape):
                return int(shape[i])
    return None


def tactic_names(node: Node) -> set[str]:
    """Every choice a node may run: its ``opt`` tactic and its buckets' (malformed records: none)."""
    names = {str(node.meta.get("tactic", "reference"))}
    try:
        rec = BucketChoices.of(node)
    except EngineFileError:
        return names
    return names | set(rec.tactics) if rec is not None else names


__all__ = ["BucketChoices", "KEY", "REFERENCE", "VERSION", "symbol_size", "tactic_names"]
