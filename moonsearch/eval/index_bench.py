"""ANN index benchmark on the vectors-only world (structured vectors, 27 leaf categories).

For each size: exact top-10 over all vectors is the oracle. Compared in one run:
- per-category indices (the moonsearch layout, factory from the size ladder), nprobe x rerank sweep;
- one global IVF-PQ index with the same ladder, same sweep;
- one global flat index (exact).
Reported: recall@10 of the ANN result set against exact, ms per query (p50/p99, one query at a time,
the index part only), build seconds, bytes per vector held in memory by the index.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moonsearch.data.synthetic import generate_vectors
from moonsearch.eval.metrics import ann_recall
from moonsearch.index import faiss_backend as fb
from moonsearch.index.category import CategoryIndex
from moonsearch.index.multi import multi_search
from moonsearch.utils.io import atomic_write_json, atomic_write_text, load_npy

K = 10
NPROBES = (8, 16, 32, 64)
RERANKS = (0, 4, 8, 16)


def _meta(n: int) -> pa.Table:
    return pa.table({"seq": pa.array(np.arange(n), pa.int64()), "item_id": [str(i) for i in range(n)]})


def _timed_search(search, xq: np.ndarray, n_timed: int = 200) -> tuple[np.ndarray, float, float]:
    ids = search(xq)  # batch for recall
    lat = []
    for q in xq[:n_timed]:
        t = time.perf_counter()
        search(q[None])
        lat.append(1000 * (time.perf_counter() - t))
    return ids, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def exact_top_k(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """(nq, k) ids of the k largest inner products, by blocks of the base (float64 scores, ties by id)."""
    best_s = np.full((len(xq), k), -np.inf)
    best_i = np.full((len(xq), k), -1, np.int64)
    q = xq.astype(np.float64)
    for s in range(0, len(xb), block):
        sc = q @ xb[s:s + block].astype(np.float64).T  # (nq, b)
        ids = np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)
        all_s, all_i = np.concatenate([best_s, sc], 1), np.concatenate([best_i, ids], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]  # earlier (smaller) ids win ties
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_i


def bench_size(n: int, dim: int, work: Path, log=print) -> list[dict]:
    folder = work / f"vectors-{n}-{dim}"
    if not (folder / "catalog.parquet").exists():
        log(f"generating {n:,} vectors")
        generate_vectors(folder, n, dim=dim, n_queries=1000)
    xb = load_npy(folder / "vectors.npy")
    xq = load_npy(folder / "queries.npy")
    cats = pq.read_table(folder / "catalog.parquet", columns=["category"]).column("category").to_pylist()
    leaf = np.array([c[-1] for c in cats])
    rows = []

    t = time.perf_counter()
    exact = exact_top_k(xb, xq, K)  # the oracle: numpy brute force, batched, independent of faiss
    log(f"exact oracle in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    fbuild = time.perf_counter() - t
    ids, p50, p99 = _timed_search(lambda q: flat.search(q, K)[1], xq)
    rows.append(dict(n=n, layout="single flat", factory="Flat", nprobe=None, rerank=None,
                     recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99, build_s=fbuild,
                     bytes_per_vector=len(fb.serialize(flat)) / n))

    # per-category layout
    t = time.perf_counter()
    parts = []
    for name in sorted(set(leaf)):
        pos = np.flatnonzero(leaf == name)
        ci = CategoryIndex.build(xb[pos], _meta(len(pos)), fb.IndexParams(), {}, [name])
        parts.append((ci, pos))
    build = time.perf_counter() - t
    mem = sum(len(fb.serialize(ci.index)) for ci, _ in parts) / n
    factories = sorted({ci.infos["factory"] for ci, _ in parts})

    centroids = np.stack([ci.centroid for ci, _ in parts])  # (C, d)

    def per_category(p, route=None):
        cats = [ci for ci, _ in parts]

        def search(q):
            chosen = None
            if route:
                chosen = [set(r) for r in np.argsort(-(q @ centroids.T), axis=1)[:, :route].tolist()]
            found = multi_search(cats, q, K, p, chosen)
            ids = np.full((len(q), K), -1, np.int64)
            for i, hits in enumerate(found):
                for j, (_, c, r) in enumerate(hits):
                    ids[i, j] = parts[c][1][r]
            return ids
        return search

    for nprobe in NPROBES:
        for rerank in RERANKS:
            p = replace(fb.IndexParams(), nprobe=nprobe, rerank=rerank)
            ids, p50, p99 = _timed_search(per_category(p), xq)
            rows.append(dict(n=n, layout="per-category", factory="/".join(factories), nprobe=nprobe, rerank=rerank,
                             recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99, build_s=build,
                             bytes_per_vector=mem))
        log(f"per-category nprobe {nprobe}: " + ", ".join(f"rr{r['rerank']} {r['recall10']:.3f}/{r['p50_ms']:.2f}ms"
                                                        for r in rows[-len(RERANKS):]))
    for route in (1, 3):
        p = fb.IndexParams()
        ids, p50, p99 = _timed_search(per_category(p, route), xq)
        rows.append(dict(n=n, layout=f"per-category, routed to {route}", factory="/".join(factories),
                         nprobe=p.nprobe, rerank=p.rerank, recall10=ann_recall(ids, exact), p50_ms=p50,
                         p99_ms=p99, build_s=build, bytes_per_vector=mem))

    # one global IVF-PQ index
    params = replace(fb.IndexParams(), flat_below=0, ivfpq_from=0)
    t = time.perf_counter()
    glob = CategoryIndex.build(xb, _meta(n), params, {}, ["all"])
    gbuild = time.perf_counter() - t
    gmem = len(fb.serialize(glob.index)) / n
    for nprobe in NPROBES:
        for rerank in RERANKS:
            p = replace(params, nprobe=nprobe, rerank=rerank)
            ids, p50, p99 = _timed_search(lambda q: glob.search(q, K, p)[1], xq)
            rows.append(dict(n=n, layout="single IVF-PQ", factory=glob.infos["factory"], nprobe=nprobe,
                             rerank=rerank, recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99,
                             build_s=gbuild, bytes_per_vector=gmem))
    log(f"global {glob.infos['factory']}: built in {gbuild:.1f}s")
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["n", "layout", "factory", "nprobe", "rerank", "recall10", "p50_ms", "p99_ms", "build_s", "bytes_per_vector"]
    out = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def main(sizes, dim: int, out: Path, log=print) -> list[dict]:
    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    rows = []
    for n in sizes:
        rows.extend(bench_size(n, dim, out, log))
        atomic_write_json(rows, out / "index.json")
        atomic_write_text(markdown(rows), out / "index.md")
    log(markdown(rows))
    return rows
