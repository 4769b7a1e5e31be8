"""Does embedding scale with Ray encoder actors? The same catalog indexed from scratch (no cache) by the
single-process indexer and by ``--ray auto`` with 1, 2, ... actors; products/s of the embedding phase.

    python benchmarks/ray_index.py --data demo --model clip-mini --limit 600 --actors 1 --actors 2

Writes bench-out/ray-index.{json,md}. On a 2-core machine two actors share the two cores with the
driver, so expect less than 2x; on a GPU cluster use one actor per GPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq


def main() -> None:
    from moonsearch.indexer import distributed
    from moonsearch.indexer.run import IndexJob, run_index

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--model", default="clip-mini")
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--actors", type=int, action="append", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    work = a.out / "ray-index"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cat = work / "catalog.parquet"
    pq.write_table(pq.read_table(a.data / "catalog.parquet").slice(0, a.limit), cat)
    if (a.data / "images").exists():
        (work / "images").symlink_to((a.data / "images").resolve())
    rows = []
    runs = [None] + (a.actors or [1, 2])
    for actors in runs:
        out = work / f"index-{actors or 'local'}"
        job = IndexJob(cat, out, model=a.model, batch_size=a.batch_size, ray="auto" if actors else None,
                       ray_actors=actors)
        if actors:
            distributed.connect("auto")  # started once, outside the timing
        t = time.time()
        rep = run_index(job)
        rows.append({"runner": f"ray, {actors} actor(s)" if actors else "single process", "items": rep.embedded,
                     "embed_s": round(rep.seconds["embed"], 2), "total_s": round(time.time() - t, 2),
                     "products_per_s": round(rep.embedded / rep.seconds["embed"], 2), "plan": rep.ray})
        print(rows[-1])
    base = rows[0]["products_per_s"]
    for r in rows:
        r["vs_single_process"] = round(r["products_per_s"] / base, 2)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ray-index.json").write_text(json.dumps(rows, indent=1))
    md = ["| runner | items | embed s | products/s | vs single process |", "|---|---|---|---|---|"]
    md += [f"| {r['runner']} | {r['items']} | {r['embed_s']} | {r['products_per_s']} | {r['vs_single_process']} |"
           for r in rows]
    (a.out / "ray-index.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
