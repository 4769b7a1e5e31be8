"""End-to-end query latency in a warm process (encode + search + metadata), one query at a time.

    python benchmarks/latency.py --index demo/index [--n 200]    # writes bench-out/latency.{json,md}

Text queries are titles' first words from the behaviour log; p50/p99 over n queries after 10 warm-up ones.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moonsearch.search.service import SearchService
from moonsearch.utils.io import atomic_write_json, atomic_write_text

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=Path("demo/index"))
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    svc = SearchService(a.index)
    texts = [b["query_text"] for b in pq.read_table(a.data / "behavior.parquet").to_pylist() if b["query_text"]]
    for t in texts[:10]:
        svc.search_text(t, k=10)
    rows = []
    for route in (None, 3):
        total, enc = [], []
        for t in texts[10:10 + a.n]:
            t0 = time.perf_counter()
            from moonsearch.models.base import Query

            xq = svc.encoder.encode_queries([Query(t)])
            t1 = time.perf_counter()
            svc.search_vectors(xq, k=10, route=route)
            t2 = time.perf_counter()
            total.append(1000 * (t2 - t0))
            enc.append(1000 * (t1 - t0))
        search = np.array(total) - np.array(enc)
        rows.append({"encoder": svc.index.encoder["name"], "items": svc.index.count, "route": route,
                     "total_p50_ms": float(np.median(total)), "total_p99_ms": float(np.percentile(total, 99)),
                     "encode_p50_ms": float(np.median(enc)), "search_p50_ms": float(np.median(search)),
                     "search_p99_ms": float(np.percentile(search, 99))})
    md = "| encoder | items | route | total p50 ms | total p99 ms | encode p50 ms | search+metadata p50 ms | p99 |\n"
    md += "|---|---|---|---|---|---|---|---|\n"
    md += "".join(f"| {r['encoder']} | {r['items']} | {r['route']} | {r['total_p50_ms']:.1f} | {r['total_p99_ms']:.1f} "
                  f"| {r['encode_p50_ms']:.1f} | {r['search_p50_ms']:.2f} | {r['search_p99_ms']:.2f} |\n" for r in rows)
    atomic_write_json(rows, a.out / "latency.json")
    atomic_write_text(md, a.out / "latency.md")
    print(md)
