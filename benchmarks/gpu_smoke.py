"""The CUDA paths on a GPU machine, with the tiny MOON (no downloads): the trainer with bf16 autocast,
and the encoder's CUDA vectors against its CPU vectors.

    python benchmarks/gpu_smoke.py --out bench-out/gpu    # a minute on one GPU; writes gpu-smoke.json
"""
import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from moonsearch.data.synthetic import generate_world
    from moonsearch.models.base import Product, Query, create_encoder
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dry-run", action="store_true", help="run on CPU (checks the script, not CUDA)")
    a = ap.parse_args()
    assert a.dry_run or torch.cuda.is_available(), "no CUDA device"
    gpu = "cpu" if a.dry_run else "cuda"
    report = {"device": torch.cuda.get_device_name(0) if gpu == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    world = a.out / "world"
    if not (world / "catalog.parquet").exists():
        generate_world(world, n=240, seed=5, workers=8)
    # 1. training on CUDA with bf16 autocast
    cfg = load_config("moon-tiny-test", data=str(world), out=str(a.out / "runs"), steps=a.steps, val_every=10,
                      ckpt_every=10, val_pool=80, batch_size=16)
    t0 = time.time()
    final = train(cfg)
    report["train_seconds"] = round(time.time() - t0, 1)
    rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    report["loss_first_last"] = [steps[0]["loss"], steps[-1]["loss"]]
    report["val_recall@10"] = [r["val_recall@10"] for r in rows if "val_recall@10" in r]
    report["samples_per_s_median"] = float(np.median([r["samples_per_s"] for r in steps[3:]]))
    report["all_losses_finite"] = bool(all(np.isfinite(r["loss"]) for r in steps))
    # 2. the trained checkpoint on CUDA vs CPU
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 40, 40))
    q = [Query("red sneakers"), Query(image=img), Query("blue", img)]
    p = [Product("red sneakers", ["shoes", "sneakers"], {"colour": "red"}, [img])]
    vecs = {}
    for dev in ("cpu", gpu):
        enc = create_encoder(f"moon:{final}", device=dev)
        vecs[dev] = np.concatenate([enc.encode_queries(q), enc.encode_products(p)])
    report["cuda_vs_cpu_min_cosine"] = float((vecs["cpu"] * vecs[gpu]).sum(1).min())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu-smoke.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
