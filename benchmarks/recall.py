"""Recall@k per query modality and top-level category on a behaviour log's test split.

    python benchmarks/recall.py --data demo --index demo/index --route 0 --route 3   # = moonsearch bench recall

CPU recipe (2 cores, ~4 min): `moonsearch demo` (builds demo/ and demo/index with clip-mini), then the line above.
Writes bench-out/recall.{json,md,png}.
"""
from moonsearch.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "recall", *sys.argv[1:]])
