"""Choose moon-mini's text block weight (MoonConfig.text_block) on the demo world's TRAIN-split queries.

    python benchmarks/text_block.py [--weights 0,0.4,0.55,0.7071,0.8,0.9] [--out bench-out]   # ~6 min, 2 cores

The text block puts the pretrained MiniLM sentence embedding of an input's text beside moon-mini's
vector: [(1-c^2)^.5 v, c MiniLM(text)]. For each weight c this runs the zero-shot tasks
(moonsearch.eval.zero_shot) with the behaviour log's train-split queries standing in for the test split
(a copy of the demo world whose behaviour file holds only train rows, relabelled), and picks the c with
the best mean over the rows (R@10 per retrieval task, accuracy per classification level and attribute).
The test split and the real-artwork eval split are never read here. moon-mini's own vectors and the
MiniLM vectors are computed once and recomposed per c.

Writes ``text-block-sweep.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moonsearch.eval import zero_shot
from moonsearch.models.base import Encoder, create_encoder, product_text
from moonsearch.models.moon.encoder import MoonEncoder, with_text_block
from moonsearch.models.towers import MiniLMTextTower
from moonsearch.utils.io import atomic_write_json, atomic_write_text


def train_queries_world(data: Path, out: Path) -> Path:
    """A copy of ``data`` whose behaviour file is the train split relabelled "test" (catalog and
    pictures linked, not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("catalog.parquet", "images", "queries"):
        if (data / name).exists() and not (out / name).exists():
            os.symlink((data / name).resolve(), out / name)
    t = pq.read_table(data / "behavior.parquet")
    t = t.filter(pc.equal(t["split"], "train"))
    t = t.set_column(t.schema.get_field_index("split"), "split", pa.array(["test"] * len(t)))
    pq.write_table(t, out / "behavior.parquet")
    return out


class Replay(Encoder):
    """An encoder whose k-th call returns the k-th entry of ``memo``, computed by the first instance that
    makes that call: the evaluations call in a fixed order, so vectors are computed once and every setting
    of a sweep recomposes them."""

    def __init__(self, memo: list):
        self.memo, self.k = memo, 0

    def replay(self, compute):
        if self.k == len(self.memo):
            self.memo.append(compute())
        self.k += 1
        return self.memo[self.k - 1]


class Recomposed(Replay):
    """moon-mini without the block, computed once per call, and MiniLM beside it with weight c, composed by
    the encoder's own with_text_block."""

    def __init__(self, base: MoonEncoder, text: MiniLMTextTower, c: float, memo: list):
        super().__init__(memo)
        self.base, self.text, self.c = base, text, c
        self.name, self.fingerprint, self.dim = f"text_block={c}", f"c{c}", base.dim + text.dim

    def _get(self, encode, items, texts, products: bool) -> np.ndarray:
        v, m, has = self.replay(lambda: (encode(items), *self.text.embed_present(texts)))
        return with_text_block(v, m, has, self.c, products)

    def encode_products(self, products, batch_size: int = 8):
        return self._get(self.base.encode_products, products, [product_text(p) for p in products], True)

    def encode_queries(self, queries, batch_size: int = 16):
        return self._get(self.base.encode_queries, queries, [q.text for q in queries], False)


def rows(r: dict, metrics: tuple[str, ...] = ("R@10",)) -> dict[str, float]:
    """One zero-shot result as flat rows: ``metrics`` per retrieval task, accuracy per level and attribute."""
    out = {f"{t} {m}": v[m] for t, v in r["retrieval"].items() for m in metrics}
    out.update({f"classification {t}": v for t, v in r["classification"].items()})
    out.update({f"attribute {t}": v for t, v in r["attributes"].items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="0,0.4,0.55,0.7071,0.8,0.9")
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    a = ap.parse_args()
    world = train_queries_world(a.data, a.out / "demo-train-queries")
    shipped = create_encoder("moon-mini")
    shipped.model.cfg = replace(shipped.model.cfg, text_block=0.0)  # only the encoder reads text_block
    base = MoonEncoder(shipped.model, "moon-mini without the text block", "base")
    text, memo, res = MiniLMTextTower(), [], {}
    for c in (float(x) for x in a.weights.split(",")):
        res[c] = rows(zero_shot.evaluate(Recomposed(base, text, c, memo), world, limit=a.limit))
        res[c]["mean"] = float(np.mean(list(res[c].values())))
        print(c, {k: round(v, 3) for k, v in res[c].items()}, flush=True)
    best = max(res, key=lambda c: res[c]["mean"])
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"queries": "train split", "chosen": best, "by": "mean of the rows",
                       "weights": {str(c): r for c, r in res.items()}}, a.out / "text-block-sweep.json")
    tasks = list(next(iter(res.values())))
    lines = ["| task (train-split queries) | " + " | ".join(f"c = {c:g}" for c in res) + " |",
             "|---|" + "---|" * len(res)]
    lines += [f"| {t} | " + " | ".join(f"{res[c][t]:.3f}" for c in res) + " |" for t in tasks]
    lines += ["", f"Chosen: c = {best:g} (best mean)."]
    atomic_write_text("\n".join(lines) + "\n", a.out / "text-block-sweep.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
