"""TfIdfVectorizer over integer token ids (string pools are not run by ember).

n-gram counting is irregular host work on small inputs; it runs in Python on the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op


def _ngram_table(pool: list[int], ngram_counts: list[int], ngram_indexes: list[int],
                 lo: int, hi: int) -> dict[tuple[int, ...], int]:
    """n-gram (tuple of ids) -> output column, for n-grams of length lo..hi."""
    table: dict[tuple[int, ...], int] = {}
    k = 0  # position of the n-gram in the pool, which ngram_indexes is keyed by
    for i, start in enumerate(ngram_counts):
        end = ngram_counts[i + 1] if i + 1 < len(ngram_counts) else len(pool)
        n = i + 1
        for s in range(start, end, n):
            if lo <= n <= hi:
                table[tuple(pool[s:s + n])] = ngram_indexes[k]
            k += 1
    return table


@op("TfIdfVectorizer", kind="other")
def tfidf_vectorizer(X, *, mode: str, ngram_indexes: list[int], ngram_counts: list[int],
                     max_skip_count: int, min_gram_length: int, max_gram_length: int,
                     pool_int64s: Optional[list[int]] = None, pool_strings: Optional[list[str]] = None,
                     weights: Optional[list[float]] = None):
    if pool_int64s is None:
        raise ValueError("TfIdfVectorizer with pool_strings: string inputs are not run by ember")
    table = _ngram_table(pool_int64s, ngram_counts, ngram_indexes, min_gram_length, max_gram_length)
    width = max(ngram_indexes) + 1
    rows = X.reshape(1, -1).tolist() if X.dim() <= 1 else X.tolist()
    counts = torch.zeros((len(rows), width), dtype=torch.float32)
    for r, row in enumerate(rows):
        for n in range(min_gram_length, max_gram_length + 1):
            skips = range(1) if n == 1 else range(max_skip_count + 1)  # unigrams are counted once
            for skip in skips:
                step = skip + 1
                for s in range(len(row) - (n - 1) * step):
                    col = table.get(tuple(row[s:s + (n - 1) * step + 1:step]))
                    if col is not None:
                        counts[r, col] += 1
    w = torch.tensor(weights, dtype=torch.float32) if weights else torch.ones(width, dtype=torch.float32)
    if mode == "TF":
        out = counts
    elif mode == "IDF":
        out = (counts > 0).to(torch.float32) * w
    elif mode == "TFIDF":
        out = counts * w
    else:
        raise ValueError(f"TfIdfVectorizer mode '{mode}' is not one of TF, IDF, TFIDF")
    out = out.to(X.device)
    return out.reshape(width) if X.dim() <= 1 else out
