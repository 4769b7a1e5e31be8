"""Encoding throughput: products/s and queries/s by batch size for each encoder.

    python benchmarks/encode.py --model clip-mini --model moon-mini --model moon-tiny --batch 1 --batch 8 --batch 32

CPU recipe (2 cores, ~3 min): the defaults below. Products come from the demo world (built if
missing, 2,000 products); each setting is timed 3 times and the median reported.
For MOON encoders the time per product is split into cropping, vision + input embedding, the LLM
forward and pooling. Writes bench-out/encode.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from moonsearch.data.images import load_image
from moonsearch.data.synthetic import generate_world
from moonsearch.models.base import Product, Query, create_encoder
from moonsearch.utils.io import atomic_write_json, atomic_write_text


@torch.inference_mode()
def moon_split(enc, products, b: int) -> dict:
    """Seconds per product in cropping, vision + embedding (prepare), the LLM forward, and pooling."""
    t = {"crop_s": 0.0, "vision_s": 0.0, "llm_s": 0.0, "pool_s": 0.0}
    enc.boxes.clear()
    for s in range(0, len(products), b):
        t0 = time.perf_counter()
        batch = enc.product_batch(products[s:s + b])
        t1 = time.perf_counter()
        inputs = enc.model.adapter.prepare(batch)
        for m in enc.model.moe_layers:
            m.token_types = inputs["token_types"]
        t2 = time.perf_counter()
        hidden = enc.model.adapter.run(inputs)
        t3 = time.perf_counter()
        mask = (inputs["token_types"] > 1).unsqueeze(-1).float()
        _ = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        t4 = time.perf_counter()
        t["crop_s"] += t1 - t0
        t["vision_s"] += t2 - t1
        t["llm_s"] += t3 - t2
        t["pool_s"] += t4 - t3
    return {k.replace("_s", "_ms"): 1000 * v / len(products) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="encoder names (repeatable)")
    ap.add_argument("--batch", action="append", type=int, help="batch sizes (repeatable)")
    ap.add_argument("--items", type=int, default=64, help="products (and queries) per timing")
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    models = args.model or ["clip-mini", "moon-mini", "moon-tiny"]
    batches = args.batch or [1, 8, 32]
    if not (args.data / "catalog.parquet").exists():
        generate_world(args.data, n=2000, seed=0)
    cat = pq.read_table(args.data / "catalog.parquet").slice(0, args.items).to_pylist()
    products = [Product(r["title"], r["category"], dict(r["attributes"]), [load_image(p, args.data) for p in r["images"]])
                for r in cat]
    n_images = sum(len(p.images) for p in products)
    queries = [Query(r["title"][:30]) for r in cat]
    rows = []
    for name in models:
        enc = create_encoder(name)
        enc.encode_products(products[:2])  # warm-up
        for b in batches:
            def timed(fn):
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return statistics.median(times)

            tp = timed(lambda: enc.encode_products(products, batch_size=b))
            tq = timed(lambda: enc.encode_queries(queries, batch_size=b))
            rows.append({"model": name, "batch": b, "products_per_s": len(products) / tp,
                         "images_per_s": n_images / tp, "text_queries_per_s": len(queries) / tq,
                         "threads": torch.get_num_threads(), "images_per_product": n_images / len(products)})
            if hasattr(enc, "model") and hasattr(enc.model, "adapter"):
                rows[-1].update(moon_split(enc, products, b))
            print(f"{name} batch {b}: {rows[-1]['products_per_s']:.1f} products/s, "
                  f"{rows[-1]['text_queries_per_s']:.1f} text queries/s")
    cols = ["model", "batch", "products_per_s", "images_per_s", "text_queries_per_s", "threads"]
    if any("llm_ms" in r for r in rows):  # MOON: milliseconds per product in each stage
        cols += ["crop_ms", "vision_ms", "llm_ms", "pool_ms"]
        for r in rows:
            for c in ("crop_ms", "vision_ms", "llm_ms", "pool_ms"):
                r.setdefault(c, float("nan"))
    md = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    md += ["| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
    atomic_write_json(rows, args.out / "encode.json")
    atomic_write_text("\n".join(md) + "\n", args.out / "encode.md")
    print("\n".join(md))


if __name__ == "__main__":
    main()
