"""Indexing real-sized photos: what reading pictures at most READ_MAX_SIDE pixels on their longer side
(moonsearch.data.images) saves against reading them as stored, and how much the vectors and hits move.

The demo world's pictures are 160 px; shops upload phone photos of 12 megapixels. This writes the first
N demo products with every picture enlarged to SIDE x (3/4 SIDE) as a JPEG (quality 90, with sensor-like
noise, so the files have a phone photo's size), then indexes them once per reading, each in its own
process (peak RSS per run), and compares the two indices' top 10 on the same queries.

    python benchmarks/photo_size.py --n 120 --model clip-mini [--model moon-mini]   # bench-out/photo-size.{json,md}
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_photos(data: Path, n: int, side: int, work: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = pq.read_table(data / "catalog.parquet").slice(0, n).to_pylist()
    (work / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        refs = []
        for j, ref in enumerate(r["images"] or []):
            im = Image.open(data / ref).convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC)
            a = np.asarray(im, np.int16) + rng.integers(-6, 7, (side * 3 // 4, side, 1), dtype=np.int16)
            name = f"images/{r['item_id']}-{j}.jpg"
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(work / name, "JPEG", quality=90)
            refs.append(name)
        r["images"] = refs
    pq.write_table(pa.Table.from_pylist(rows), work / "catalog.parquet")
    return work / "catalog.parquet"


def worker(catalog: Path, out: Path, model: str, cap: int) -> dict:
    from moonsearch.data import images
    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.models.base import create_encoder

    images.READ_MAX_SIDE = cap
    enc = create_encoder(model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    rep = run_index(IndexJob(catalog, out, model=model), encoder=enc)
    wall = time.perf_counter() - t
    return {"model": model, "cap": cap, "items": rep.indexed, "embed_s": rep.seconds["embed"], "total_s": wall,
            "items_per_s": rep.indexed / rep.seconds["embed"], "peak_rss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": rss0 / 1024}


def agreement(a: Path, b: Path, data: Path, catalog: Path, n_queries: int = 60) -> dict:
    """Top-10 overlap of the two indices on the demo's text queries and on the products themselves."""
    import pyarrow.parquet as pq

    from moonsearch.search.service import SearchService

    sa, sb = SearchService(a), SearchService(b)
    beh = [r for r in pq.read_table(data / "behavior.parquet").to_pylist() if r["modality"] == "text"][:n_queries]
    text = [len({h.item_id for h in sa.search_text(r["query_text"], k=10)} &
                {h.item_id for h in sb.search_text(r["query_text"], k=10)}) / 10 for r in beh]
    ids = sorted(pq.read_table(catalog, columns=["item_id"]).column(0).to_pylist())[:n_queries]
    prod = [len({h.item_id for h in sa.search_product(i, k=10)} & {h.item_id for h in sb.search_product(i, k=10)}) / 10
            for i in ids]
    same = [float(np.dot(sa.product_vector(i), sb.product_vector(i)) /
                  (np.linalg.norm(sa.product_vector(i)) * np.linalg.norm(sb.product_vector(i)))) for i in ids]
    return {"text_top10_overlap": float(np.mean(text)),
            "product_top10_overlap": float(np.mean(prod)) if prod else None,
            "product_vector_cosine_min": min(same) if same else None,
            "product_vector_cosine_median": float(np.median(same)) if same else None}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--side", type=int, default=4000)
    ap.add_argument("--model", action="append")
    ap.add_argument("--cap", type=int, action="append", help="READ_MAX_SIDE values (0: as stored)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--worker", nargs=3, metavar=("CATALOG", "OUT", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(Path(a.worker[0]), Path(a.worker[1]), a.worker[2], a.cap[0])))
        sys.exit(0)
    from moonsearch.utils.io import atomic_write_json, atomic_write_text

    models, caps = a.model or ["clip-mini"], a.cap or [0, 1536]
    work = Path(tempfile.mkdtemp(prefix="photo-size-"))
    catalog = write_photos(a.data, a.n, a.side, work)
    size = sum(f.stat().st_size for f in (work / "images").iterdir()) / len(list((work / "images").iterdir()))
    rows = []
    for model in models:
        runs = {}
        for cap in caps:
            out = work / f"idx-{model}-{cap}"
            res = subprocess.run([sys.executable, __file__, "--worker", str(catalog), str(out), model, "--cap", str(cap)],
                                 capture_output=True, text=True, check=True)
            runs[cap] = json.loads(res.stdout.strip().splitlines()[-1])
            runs[cap]["index"] = str(out)
        base = runs[caps[0]]
        for cap in caps:
            r = dict(runs[cap])
            if cap != caps[0]:
                r.update(agreement(Path(base["index"]), Path(r["index"]), a.data, catalog))
                r["speedup"] = base["embed_s"] / r["embed_s"]
            rows.append(r)
    res = {"side": a.side, "photo_mean_bytes": size, "rows": rows}
    md = [f"{a.n} products, photos {a.side} x {a.side * 3 // 4} JPEG (mean {size / 1e6:.1f} MB)", "",
          "| model | read at most (px) | embed s | items/s | speed-up | peak RSS MiB | text top-10 overlap | "
          "product top-10 overlap | vector cosine min / median |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = (f"{r['product_vector_cosine_min']:.4f} / {r['product_vector_cosine_median']:.4f}"
               if r.get("product_vector_cosine_min") is not None else "-")
        md.append(f"| {r['model']} | {r['cap'] or 'as stored'} | {r['embed_s']:.1f} | {r['items_per_s']:.2f} | "
                  f"{r.get('speedup', 1.0):.2f}x | {r['peak_rss_mib']:.0f} | {r.get('text_top10_overlap', 1.0):.3f} | "
                  f"{r.get('product_top10_overlap') or 1.0:.3f} | {cos} |")
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, a.out / "photo-size.json")
    atomic_write_text("\n".join(md) + "\n", a.out / "photo-size.md")
    print("\n".join(md))
