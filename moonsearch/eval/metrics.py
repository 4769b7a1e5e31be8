"""Retrieval metrics on plain lists: ranked ids per query and the relevant ids per query."""
from __future__ import annotations

from typing import Sequence

import numpy as np


MISS = 10**9  # rank of a query whose relevant item was not returned at all


def first_hit_ranks(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]]) -> np.ndarray:
    """0-based rank of the first relevant id per query; ``MISS`` if none. A miss must never depend on
    the list's length: a short list (a small category under routing) would otherwise turn a miss
    into a 'hit' at rank len(list) < k."""
    out = np.empty(len(ranked), np.int64)
    for i, (r, rel) in enumerate(zip(ranked, relevant)):
        out[i] = next((j for j, x in enumerate(r) if x in rel), MISS)
    return out


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose first relevant item is in the top k (one relevant item per query)."""
    return float((ranks < k).mean()) if len(ranks) else float("nan")


def mrr_at(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return float("nan")
    rr = np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)
    return float(rr.mean())


def summarize(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50), mrr_k: int = 10) -> dict:
    row = {f"R@{k}": recall_at(ranks, k) for k in ks}
    row[f"MRR@{mrr_k}"] = mrr_at(ranks, mrr_k)
    row["n"] = int(len(ranks))
    return row


def ann_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """recall@k of an approximate result set against the exact one: |A ∩ E| / |E| averaged."""
    assert approx_ids.shape[0] == exact_ids.shape[0]
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum())
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))
