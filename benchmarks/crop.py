"""Core-product cropper IoU table against no-crop and centre-crop baselines.

    python benchmarks/crop.py [--n 300]     # ~20 s on 2 CPU cores; writes bench-out/crop.{json,md}
"""
import argparse
from pathlib import Path

from moonsearch.eval.crop_bench import evaluate, markdown
from moonsearch.utils.io import atomic_write_json, atomic_write_text

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    rows = evaluate(a.n)
    atomic_write_json(rows, a.out / "crop.json")
    atomic_write_text(markdown(rows), a.out / "crop.md")
    print(markdown(rows))
