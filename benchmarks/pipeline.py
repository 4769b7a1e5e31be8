"""Indexing overhead: the indexer's embed phase (read, decode in threads, encode, cache writes) against
pure encoder time on the same products, decoded beforehand.

    python benchmarks/pipeline.py --n 400 [--model clip-mini]   # writes bench-out/pipeline.{json,md}
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from moonsearch.data.images import load_image
from moonsearch.indexer.run import IndexJob, run_index
from moonsearch.models.base import Product, create_encoder
from moonsearch.utils.io import atomic_write_json, atomic_write_text

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--model", default="clip-mini")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    enc = create_encoder(a.model)
    table = pq.read_table(a.data / "catalog.parquet").slice(0, a.n)
    work = Path(tempfile.mkdtemp())
    pq.write_table(table, work / "catalog.parquet")
    (work / "images").symlink_to((a.data / "images").resolve())
    rows = table.to_pylist()
    products = [Product(r["title"], r["category"], dict(r["attributes"]), [load_image(p, a.data) for p in r["images"]])
                for r in rows]
    enc.encode_products(products[:8])  # warm-up
    t = time.perf_counter()
    for s in range(0, len(products), 32):
        enc.encode_products(products[s:s + 32], batch_size=32)
    pure = time.perf_counter() - t
    rep = run_index(IndexJob(work / "catalog.parquet", work / "idx", model=a.model), encoder=enc)
    shutil.rmtree(work)
    res = {"model": a.model, "items": a.n, "pure_encode_s": pure, "indexer_embed_s": rep.seconds["embed"],
           "indexer_total_s": rep.seconds["total"], "embed_overhead": rep.seconds["embed"] / pure - 1,
           "total_overhead": rep.seconds["total"] / pure - 1}
    md = ("| model | items | pure encode s | indexer embed s | indexer total s | embed overhead | total overhead |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {a.model} | {a.n} | {pure:.1f} | {res['indexer_embed_s']:.1f} | {res['indexer_total_s']:.1f} | "
          f"{100 * res['embed_overhead']:+.1f}% | {100 * res['total_overhead']:+.1f}% |\n")
    atomic_write_json(res, a.out / "pipeline.json")
    atomic_write_text(md, a.out / "pipeline.md")
    print(md)
