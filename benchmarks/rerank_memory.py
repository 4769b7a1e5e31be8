"""Serving memory and latency of the exact re-rank: rows read with pread (now) vs through the memory map.

    python benchmarks/index.py --size 10000000 --only-shared --work bench-out/idx10m   # builds the set once
    python benchmarks/rerank_memory.py --index bench-out/idx10m/shared-10000000 \
        --vectors bench-out/idx10m/vectors-10000000-256 [--rounds 3]

Each round opens the index set in two fresh processes, one per mode, alternating, and answers every query
of ``queries.npy`` unrouted with the set's own parameters (re-rank depth included), then routed to the 1
and to the 3 categories whose centroids are nearest. (``IndexSet.load`` itself picks the map below
``MAP_RERANK_BELOW`` bytes of stored vectors and pread above; here each mode is forced.) Reported per mode:
medians over rounds of p50 / p99 latency and of the process's memory after the queries: anonymous
(heap) and file-backed RSS (pages of index.faiss / vectors.npy / meta.arrow mapped into the process),
and recall@10 against ``exact-top10.npy``. Both modes read through the same warm page cache after the
first round. Writes ``<--name>.json`` / ``.md`` (default rerank-memory).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from moonsearch.utils.io import atomic_write_json, atomic_write_text

CHILD = r"""
import json, sys, time
import numpy as np
from moonsearch.eval.index_bench import _rss
from moonsearch.eval.metrics import ann_recall
import moonsearch.index.index_set as index_set
from moonsearch.index.index_set import IndexSet
from moonsearch.index.multi import multi_search

index, vectors, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "pread":
    index_set.MAP_RERANK_BELOW = 0  # whatever the set's size
iset = IndexSet.load(index)
cats = [iset.categories[s] for s in sorted(iset.categories)]
if mode == "map":
    for c in cats:
        c.rows_reader.close()  # without its file descriptor the reader indexes the memory map
ids_of = [np.array([int(x[1:]) for x in c.meta.column("item_id").to_pylist()]) for c in cats]
opened = _rss()
xq = np.load(f"{vectors}/queries.npy")
exact = np.load(f"{vectors}/exact-top10.npy")
ids = np.full((len(xq), 10), -1, np.int64)
ms = []
for i, q in enumerate(xq):
    t = time.perf_counter()
    hits = multi_search(cats, q[None], 10)[0]
    ms.append(1000 * (time.perf_counter() - t))
    for j, (_, c, r) in enumerate(hits):
        ids[i, j] = ids_of[c][r]
served = _rss()
cents = np.stack([c.centroid for c in cats])
routed = {}
for route in (1, 3):  # routed to the categories whose centroids are nearest, after the memory was read
    rms = []
    for q in xq:
        chosen = [set(np.argsort(-(q @ cents.T))[:route].tolist())]
        t = time.perf_counter()
        multi_search(cats, q[None], 10, chosen=chosen)
        rms.append(1000 * (time.perf_counter() - t))
    routed[route] = float(np.percentile(rms, 50))
print(json.dumps({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                  "recall10": ann_recall(ids, exact), "rerank": cats[0].params.rerank,
                  "routed1_p50_ms": routed[1], "routed3_p50_ms": routed[3], "opened": opened, "served": served}))
"""


def run(index: Path, vectors: Path, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(index), str(vectors), mode], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--vectors", type=Path, required=True, help="folder with queries.npy and exact-top10.npy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--name", default="rerank-memory", help="report file name stem")
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {"pread": [], "map": []}
    for r in range(a.rounds):
        for mode in runs:
            runs[mode].append(run(a.index, a.vectors, mode))
            x = runs[mode][-1]
            print(f"round {r} {mode}: p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms, recall {x['recall10']:.3f}, "
                  f"RssAnon {x['served']['RssAnon']:.0f} MiB, RssFile {x['served']['RssFile']:.0f} MiB", flush=True)

    def med(mode, f):
        return statistics.median(f(x) for x in runs[mode])

    summary = {m: {"p50_ms": med(m, lambda x: x["p50_ms"]), "p99_ms": med(m, lambda x: x["p99_ms"]),
                   "recall10": med(m, lambda x: x["recall10"]), "rerank": runs[m][0]["rerank"],
                   "routed1_p50_ms": med(m, lambda x: x["routed1_p50_ms"]),
                   "routed3_p50_ms": med(m, lambda x: x["routed3_p50_ms"]),
                   "rss_after_open_mib": med(m, lambda x: x["opened"]["VmRSS"]),
                   "anon_after_queries_mib": med(m, lambda x: x["served"]["RssAnon"]),
                   "file_after_queries_mib": med(m, lambda x: x["served"]["RssFile"]),
                   "rss_after_queries_mib": med(m, lambda x: x["served"]["VmRSS"])} for m in runs}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"index": str(a.index), "rounds": a.rounds, "summary": summary, "runs": runs},
                      a.out / f"{a.name}.json")
    lines = ["| re-rank rows read | p50 ms | p99 ms | recall@10 | routed to 1 / 3, p50 ms | RSS after open MiB | "
             "heap after queries MiB | file-backed after queries MiB | RSS after queries MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['recall10']:.3f} | {s['routed1_p50_ms']:.2f} / "
              f"{s['routed3_p50_ms']:.2f} | {s['rss_after_open_mib']:.0f} | {s['anon_after_queries_mib']:.0f} | "
              f"{s['file_after_queries_mib']:.0f} | {s['rss_after_queries_mib']:.0f} |" for m, s in summary.items()]
    atomic_write_text("\n".join(lines) + "\n", a.out / f"{a.name}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
