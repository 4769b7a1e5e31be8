"""ANN quality and speed of the per-category IVF-PQ layout against exact search and single indices.

    python benchmarks/index.py --size 10000 --size 100000 --size 1000000   # = moonsearch bench index

CPU recipe (2 cores): 10k + 100k take ~2 minutes; 1M adds ~15 minutes and ~3 GB of disk for vectors.
Writes bench-out/index.{json,md}.
"""
from moonsearch.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", "index", *sys.argv[1:]])
