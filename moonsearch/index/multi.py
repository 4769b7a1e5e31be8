"""Search over several category indices with ONE global exact re-rank.

Each category returns its shortlist (rerank*k candidates for PQ indices, k otherwise); candidates are
merged by their index scores, the best rerank*k overall are rescored exactly from the stored vectors
(only PQ candidates need it: Flat and HNSW scores are already exact), and the top k are returned.
Re-ranking the global shortlist instead of every category's costs 1/C of the exact work for C
categories, at the same recall.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moonsearch.index import faiss_backend as fb
from moonsearch.index.category import CategoryIndex


def multi_search(cats: Sequence[CategoryIndex], xq: np.ndarray, k: int, params: fb.IndexParams | None = None,
                 chosen: Sequence[Sequence[int]] | None = None) -> list[list[tuple[float, int, int]]]:
    """(nq, d) queries -> per query up to k ``(score, category position, row)``, best first.

    ``chosen[q]`` limits query q to those category positions (routing); default: all.
    """
    nq = len(xq)
    chosen = chosen if chosen is not None else [range(len(cats))] * nq
    per_q: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in range(nq)]
    rerank = 0
    for c, ci in enumerate(cats):
        qi = [q for q in range(nq) if c in chosen[q]]
        if not qi:
            continue
        p = params or ci.params
        n = ci.shortlist_size(k, p)
        if ci.is_pq and p.rerank > 0:
            rerank = max(rerank, p.rerank)
        D, R = ci.approx(xq[qi], n, p)
        for j, q in enumerate(qi):
            ok = R[j] >= 0
            per_q[q].append((D[j][ok], R[j][ok], c))
    out = []
    for q in range(nq):
        if not per_q[q]:
            out.append([])
            continue
        D = np.concatenate([d for d, _, _ in per_q[q]])
        R = np.concatenate([r for _, r, _ in per_q[q]])
        C = np.concatenate([np.full(len(r), c) for _, r, c in per_q[q]])
        m = min(len(D), k * max(1, rerank))
        top = np.argpartition(-D, m - 1)[:m] if m < len(D) else np.arange(len(D))
        D, R, C = D[top].astype(np.float32), R[top], C[top]
        for c in np.unique(C):
            sel = np.flatnonzero(C == c)
            if cats[c].is_pq and (params or cats[c].params).rerank > 0:
                D[sel] = cats[c].exact(xq[q], R[sel])
        order = np.argsort(-D, kind="stable")[:k]
        out.append([(float(D[i]), int(C[i]), int(R[i])) for i in order])
    return out
