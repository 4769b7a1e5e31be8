"""ANN index benchmark on the vectors-only world (structured vectors, 27 leaf categories).

For each size: exact top-10 over all vectors is the oracle (batched brute force over the memory-mapped
vectors). Compared in one run:
- shared quantizer: the moonsearch layout for sets of at least ``shared_from`` items (index/shared.py),
  built by the streaming builder (``moonsearch index --vectors``) and opened memory-mapped from disk,
  all categories unrouted, routed to 1 and 3 categories, and filtered to one category;
- per-category indices each with their own quantizer (the layout before, and still that of small sets),
  nprobe x rerank sweep, routed;
- one global IVF-PQ index with the same ladder, same sweep;
- one global flat index (exact).
Reported: recall@10 of the ANN result set against exact, ms per query (p50/p99, one query at a time,
the index part only), build seconds, bytes per vector held in memory by the index. Sizes above
``BIG`` run the shared layout alone (the others would not fit this machine's time or RAM), with its
open time, peak RSS of the build, disk, and the RSS of a process after opening it and answering the queries.
"""
from __future__ import annotations

import json
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
BIG = 2_000_000


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


def exact_top_k(xb: np.ndarray, xq: np.ndarray, k: int, block: int = 262144, slack: int = 8) -> np.ndarray:
    """(nq, k) ids of the k largest inner products, by blocks of the (memory-mapped) base: float32 products
    keep each block's best k+slack, which are rescored in float64 (ties by id)."""
    cand_i = []
    q32 = np.ascontiguousarray(xq, np.float32)
    m = k + slack
    for s in range(0, len(xb), block):
        sc = q32 @ np.asarray(xb[s:s + block], np.float32).T  # (nq, b)
        top = np.argpartition(-sc, m - 1, axis=1)[:, :m] if sc.shape[1] > m else \
            np.broadcast_to(np.arange(sc.shape[1]), sc.shape)
        cand_i.append(top + s)
    cand = np.concatenate(cand_i, 1)  # (nq, blocks * m)
    best = np.empty((len(xq), k), np.int64)
    q64 = xq.astype(np.float64)
    for j in range(len(xq)):
        ids = np.unique(cand[j])
        sc = np.asarray(xb[ids], np.float64) @ q64[j]
        order = np.lexsort((ids, -sc))[:k]  # best score first, earlier (smaller) ids win ties
        best[j] = ids[order]
    return best


def _rss() -> dict:
    """This process's resident memory (MiB): anonymous (heap) and file-backed (memory maps)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


class _AnonPeak:
    """The largest anonymous (heap) RSS of this process while it runs: VmHWM would count the memory-mapped
    input file's pages too."""

    def __init__(self, every: float = 0.25):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while not self._stop.wait(every):
            self.peak = max(self.peak, _rss().get("RssAnon", 0.0))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return round(max(self.peak, _rss().get("RssAnon", 0.0)), 1)


def _serving_memory(index: Path, queries: Path) -> dict:
    """Open the index in a fresh process and answer every query (unrouted): open time and RSS."""
    import subprocess
    import sys

    code = (
        "import json, sys, time, numpy as np\n"
        "from moonsearch.eval.index_bench import _rss\n"
        "before = _rss(); t = time.perf_counter()\n"
        "from moonsearch.index.index_set import IndexSet\n"
        "from moonsearch.index.multi import multi_search\n"
        "iset = IndexSet.load(sys.argv[1]); open_s = time.perf_counter() - t; opened = _rss()\n"
        "cats = [iset.categories[s] for s in sorted(iset.categories)]\n"
        "for q in np.load(sys.argv[2]): multi_search(cats, q[None], 10)\n"
        "print(json.dumps({'before': before, 'open': opened, 'open_s': open_s, 'served': _rss()}))\n")
    p = subprocess.run([sys.executable, "-c", code, str(index), str(queries)], capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_shared(n: int, folder: Path, xq: np.ndarray, exact: np.ndarray, work: Path, log=print) -> list[dict]:
    """The shared-quantizer layout, built by the streaming builder and opened memory-mapped."""
    from moonsearch.index.index_set import IndexSet
    from moonsearch.index.stream import build_from_vectors

    out = work / f"shared-{n}"
    t = time.perf_counter()
    if not (out / "manifest.json").exists():
        rss0 = _rss()
        peak = _AnonPeak()
        rep = build_from_vectors(folder / "catalog.parquet", folder / "vectors.npy", out, log=log)
        build = time.perf_counter() - t
        atomic_write_json({"build_s": build, "report": rep, "rss_before": rss0, "rss_after": _rss(),
                           "anon_peak_mib": peak.stop()}, out / "build.json")
    info = json.loads((out / "build.json").read_text())
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    index_disk = sum(f.stat().st_size for f in out.rglob("index.faiss"))
    fresh = _serving_memory(out, folder / "queries.npy")  # a new process: open, then answer the queries
    iset = IndexSet.load(out)
    open_s = fresh["open_s"]
    slugs = sorted(iset.categories)
    cats = [iset.categories[s] for s in slugs]
    ids_of = [np.array([int(x[1:]) for x in c.meta.column("item_id").to_pylist()]) for c in cats]
    log(f"shared layout {cats[0].infos['factory']}: {n:,} items opened in {open_s:.2f}s")
    centroids = np.stack([c.centroid for c in cats])
    common = dict(n=n, factory=cats[0].infos["factory"], build_s=info["build_s"],
                  bytes_per_vector=index_disk / n, disk_gb=disk / 1e9, open_s=open_s)

    def search(p, route=None, only=None):
        def run(q):
            chosen = None
            if route:
                chosen = [set(r) for r in np.argsort(-(q @ centroids.T), axis=1)[:, :route].tolist()]
            if only is not None:
                chosen = [{only}] * len(q)
            found = multi_search(cats, q, K, p, chosen)
            ids = np.full((len(q), K), -1, np.int64)
            for i, hits in enumerate(found):
                for j, (_, c, r) in enumerate(hits):
                    ids[i, j] = ids_of[c][r]
            return ids
        return run

    rows = []
    base = cats[0].params
    for nprobe in NPROBES:
        for rerank in (0, 8, 16, 32):
            p = replace(base, nprobe=nprobe, rerank=rerank)
            ids, p50, p99 = _timed_search(search(p), xq)
            rows.append(dict(common, layout="shared quantizer", nprobe=nprobe, rerank=rerank,
                             recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99))
        log(f"shared nprobe {nprobe}: " + ", ".join(f"rr{r['rerank']} {r['recall10']:.3f}/{r['p50_ms']:.2f}ms"
                                                   for r in rows[-4:]))
    for route in (1, 3):  # the set's own re-rank depth, and the per-category layout's (8) for equal footing
        for rerank in sorted({base.rerank, 8}):
            p = replace(base, rerank=rerank)
            ids, p50, p99 = _timed_search(search(p, route), xq)
            rows.append(dict(common, layout=f"shared quantizer, routed to {route}", nprobe=p.nprobe, rerank=p.rerank,
                             recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99))
    p = base
    # filtered to the first query's nearest category: recall against exact within that category
    c0 = int(np.argmax(xq[:1] @ centroids.T))
    inside = ids_of[c0]
    sub = exact_top_k(np.asarray(cats[c0].vectors), xq, K)  # rows of category c0
    ids, p50, p99 = _timed_search(search(p, only=c0), xq)
    rows.append(dict(common, layout="shared quantizer, filtered to 1 category", nprobe=p.nprobe, rerank=p.rerank,
                     recall10=ann_recall(ids, inside[sub]), p50_ms=p50, p99_ms=p99))
    mem = dict(build_anon_peak_mib=info.get("anon_peak_mib"), build_vmhwm_mib=info["rss_after"].get("VmHWM"),
               rss_python_mib=fresh["before"]["VmRSS"], rss_after_open_mib=fresh["open"]["VmRSS"],
               anon_after_open_mib=fresh["open"]["RssAnon"], rss_after_queries_mib=fresh["served"]["VmRSS"],
               anon_after_queries_mib=fresh["served"]["RssAnon"], file_after_queries_mib=fresh["served"]["RssFile"],
               pq_codes_mib=n * (cats[0].index.code_size + 8) / 2 ** 20)
    for r in rows:
        r.update(mem)
    return rows


def bench_size(n: int, dim: int, work: Path, log=print, only_shared: bool = False) -> list[dict]:
    folder = work / f"vectors-{n}-{dim}"
    if not (folder / "catalog.parquet").exists():
        log(f"generating {n:,} vectors")
        generate_vectors(folder, n, dim=dim, n_queries=1000)
    xb = load_npy(folder / "vectors.npy", mmap=True)
    xq = load_npy(folder / "queries.npy")
    rows = []

    t = time.perf_counter()
    exact_path = folder / "exact-top10.npy"
    if exact_path.exists():
        exact = np.load(exact_path)
    else:
        exact = exact_top_k(xb, xq, K)  # the oracle: numpy brute force, batched, independent of faiss
        np.save(exact_path, exact)
    log(f"exact oracle in {time.perf_counter() - t:.1f}s")
    rows.extend(bench_shared(n, folder, xq, exact, work, log))
    if n > BIG or only_shared:
        return rows
    xb = load_npy(folder / "vectors.npy")
    cats = pq.read_table(folder / "catalog.parquet", columns=["category"]).column("category").to_pylist()
    leaf = np.array([c[-1] for c in cats])
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
            rows.append(dict(n=n, layout="per-category, own quantizers", factory="/".join(factories), nprobe=nprobe,
                             rerank=rerank,
                             recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99, build_s=build,
                             bytes_per_vector=mem))
        log(f"per-category nprobe {nprobe}: " + ", ".join(f"rr{r['rerank']} {r['recall10']:.3f}/{r['p50_ms']:.2f}ms"
                                                        for r in rows[-len(RERANKS):]))
    for route in (1, 3):  # its default re-rank depth (8), and 16 (the 1M shared set's) for equal recall
        for rerank in (8, 16):
            p = replace(fb.IndexParams(), rerank=rerank)
            ids, p50, p99 = _timed_search(per_category(p, route), xq)
            rows.append(dict(n=n, layout=f"per-category own quantizers, routed to {route}",
                             factory="/".join(factories), nprobe=p.nprobe, rerank=p.rerank,
                             recall10=ann_recall(ids, exact), p50_ms=p50, p99_ms=p99, build_s=build,
                             bytes_per_vector=mem))

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
    mem = {r["n"]: r for r in rows if "open_s" in r}
    if mem:
        keys = ["open_s", "disk_gb", "build_anon_peak_mib", "build_vmhwm_mib", "rss_python_mib",
                "rss_after_open_mib", "anon_after_open_mib", "rss_after_queries_mib", "anon_after_queries_mib",
                "file_after_queries_mib", "pq_codes_mib"]
        out += ["", "Shared layout, memory-mapped: build peaks of the building process (anonymous = heap; "
                "VmHWM also counts mapped file pages); a fresh process opening the index and answering "
                "the queries (RSS = anonymous + file-backed pages of the maps):", "",
                "| n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for n, r in sorted(mem.items()):
            out.append(f"| {n} | " + " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k))
                                              for k in keys) + " |")
    return "\n".join(out) + "\n"


def main(sizes, dim: int, out: Path, log=print, only_shared: bool = False) -> list[dict]:
    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    rows = []
    for n in sizes:
        rows.extend(bench_size(n, dim, out, log, only_shared))
        atomic_write_json(rows, out / "index.json")
        atomic_write_text(markdown(rows), out / "index.md")
    log(markdown(rows))
    return rows
