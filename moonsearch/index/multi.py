"""Search over several category indices with ONE global exact re-rank.

Each category returns its shortlist (rerank*k candidates for PQ indices, k otherwise); candidates are
merged by their index scores, the best rerank*k overall are rescored exactly from the stored vectors
(only PQ candidates need it: Flat and HNSW scores are already exact), and the top k are returned.
Re-ranking the global shortlist instead of every category's costs 1/C of the exact work for C
categories, at the same recall.

Categories that share one coarse quantizer (index/shared.py) are not searched one by one: the queries
that want the same group of them run ONE IVF search over the group's stacked inverted lists, so an
all-category search costs what one global index costs; a smaller group probes fewer lists, and only
lists holding its items (SharedQuantizer.search). A group holding fewer than
``exact_scan_below`` items in all (a filter or a route to small categories) is scanned exactly from the
stored vectors instead: its few items are spread thin over the shared lists.
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
    found, rerank = shortlists(cats, xq, k, params, chosen)
    return [finish(c, k) for c in found]


def shortlists(cats: Sequence[CategoryIndex], xq: np.ndarray, k: int, params: fb.IndexParams | None = None,
               chosen: Sequence[Sequence[int]] | None = None, rerank: int = 0, everything: int | None = None,
               totals: Sequence[int] | None = None,
               group_lists: Sequence[np.ndarray] | None = None) -> tuple[list[Candidates], int]:
    """Per query the global shortlist: the best ``k * max(1, rerank)`` candidates by index score, each
    with its final score (exact for PQ candidates that are re-ranked), and the re-rank factor used.

    A search shard holding some of the categories runs this over its own and passes ``rerank`` (the
    whole set's factor), ``everything`` (the item count of all searched categories), ``totals`` (per
    query, the item count of the categories it searches on all shards) and, for shared-quantizer sets,
    ``group_lists`` (per query, those categories' items per inverted list; queries searching the same
    categories share one array), so its shortlist holds every
    candidate of its categories that the whole set's shortlist would hold; the router then ``merge``s
    the shards' shortlists and ``finish``es exactly as one process would."""
    nq = len(xq)
    chosen = chosen if chosen is not None else [range(len(cats))] * nq
    per_q: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in range(nq)]
    shared = [c for c, ci in enumerate(cats) if ci.shared is not None]
    if shared:
        rerank = max(rerank, _search_shared(cats, shared, xq, k, params, chosen, per_q, everything, totals,
                                            group_lists))
    for c, ci in enumerate(cats):
        if ci.shared is not None:
            continue
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
            out.append(Candidates.empty())
            continue
        D = np.concatenate([d for d, _, _ in per_q[q]])
        R = np.concatenate([r for _, r, _ in per_q[q]])
        C = np.concatenate([np.broadcast_to(c, len(r)) for _, r, c in per_q[q]])
        m = min(len(D), k * max(1, rerank))
        top = np.argpartition(-D, m - 1)[:m] if m < len(D) else np.arange(len(D))
        D, R, C = D[top].astype(np.float32), R[top], C[top].astype(np.int64)
        final = D.copy()
        for c in np.unique(C):
            sel = np.flatnonzero(C == c)
            if cats[c].is_pq and (params or cats[c].params).rerank > 0:
                final[sel] = cats[c].exact(xq[q], R[sel])
        out.append(Candidates(D, final, C, R))
    return out, rerank


class Candidates:
    """One query's shortlist: index scores, final scores, category positions, rows (parallel arrays)."""

    __slots__ = ("approx", "final", "cat", "row")

    def __init__(self, approx: np.ndarray, final: np.ndarray, cat: np.ndarray, row: np.ndarray):
        self.approx, self.final, self.cat, self.row = approx, final, cat, row

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.row)


def merge(parts: Sequence[Candidates], k: int, rerank: int) -> tuple[Candidates, np.ndarray]:
    """Several shards' shortlists for one query (category positions already global) -> the shortlist one
    process holding every category would have built (the best ``k * max(1, rerank)`` by index score),
    and the positions of its candidates in the concatenation of ``parts``."""
    if not any(len(p) for p in parts):
        return Candidates.empty(), np.zeros(0, np.int64)
    D, F, C, R = (np.concatenate([getattr(p, a) for p in parts]) for a in ("approx", "final", "cat", "row"))
    m = min(len(D), k * max(1, rerank))
    top = np.argpartition(-D, m - 1)[:m] if m < len(D) else np.arange(len(D))
    return Candidates(D[top], F[top], C[top], R[top]), top


def finish(c: Candidates, k: int) -> list[tuple[float, int, int]]:
    """A shortlist -> up to k ``(final score, category position, row)``, best first."""
    order = np.argsort(-c.final, kind="stable")[:k]
    return [(float(c.final[i]), int(c.cat[i]), int(c.row[i])) for i in order]


def _search_shared(cats, shared: list[int], xq: np.ndarray, k: int, params, chosen, per_q,
                   everything: int | None = None, totals: Sequence[int] | None = None,
                   group_lists: Sequence[np.ndarray] | None = None) -> int:
    """The shared-quantizer categories: one stacked IVF search per group of categories that queries want
    (or an exact scan of a small group); appends (scores, rows, category position) to ``per_q``; returns
    the re-rank factor used. A shard passes the whole set's ``everything`` and, per query, the item count
    of every category the query searches on all shards (``totals``) and their items per list
    (``group_lists``): the exact-scan choice and the lists probed are then those of one process searching
    everything."""
    groups: dict[tuple, tuple[list[int], np.ndarray | None]] = {}
    for q in range(len(xq)):
        want = set(chosen[q].tolist() if isinstance(chosen[q], np.ndarray) else chosen[q])
        key = tuple(c for c in shared if c in want)
        if key:
            lists = None if group_lists is None else group_lists[q]
            groups.setdefault((key, None if totals is None else totals[q], id(lists)), ([], lists))[0].append(q)
    rerank = 0
    if everything is None:
        everything = sum(cats[c].infos["count"] for c in shared)
    for (key, group_total, _), (qs, lists) in groups.items():
        members = [cats[c] for c in key]
        p = params or members[0].params
        n = k * p.rerank if p.rerank > 0 else k
        total = sum(m.infos["count"] for m in members) if group_total is None else group_total
        if total < p.exact_scan_below:
            for c, m in zip(key, members):
                if m.index.ntotal == 0:
                    continue
                D, R = m.scan(xq[qs], k)  # exact
                for j, q in enumerate(qs):
                    ok = R[j] >= 0
                    per_q[q].append((D[j][ok], R[j][ok], c))
            continue
        rerank = max(rerank, p.rerank)
        share = total / max(1, everything)
        D, I = members[0].shared.search([m.index for m in members], xq[qs], n, p.nprobe, share, lists)
        if len(members) == 1:  # a route or filter to one category: every id is its own
            rows, cpos = members[0].rows_of(I), np.full(I.shape, key[0], np.int64)
        else:
            by_code = {m.code: (c, m) for c, m in zip(key, members)}
            codes = np.where(I >= 0, I >> fb.ID_BITS, -1)
            rows = np.full(I.shape, -1, np.int64)
            cpos = np.full(I.shape, -1, np.int64)
            for code in np.unique(codes[codes >= 0]):
                c, m = by_code[int(code)]
                hit = codes == code
                rows[hit] = m.rows_of(I[hit])
                cpos[hit] = c
        for j, q in enumerate(qs):
            ok = rows[j] >= 0
            per_q[q].append((D[j][ok], rows[j][ok], cpos[j][ok]))
    return rerank
