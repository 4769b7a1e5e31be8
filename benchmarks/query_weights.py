"""Query-side weights of the served moon-mini vector, chosen on data nothing is judged on.

    python benchmarks/query_weights.py [--data demo] [--out bench-out]   # ~8 min, 2 cores

Two questions, both answered by recomposing vectors that are computed once (moon-mini's served query
vectors are concatenations of unit blocks, so a weight change is a rescaling of blocks):

1. **Should a text query meet the product's photos?** moon-mini is trained with split pooling (a text
   query scores 0.9 x text mean + 0.44 x image mean of the product) and served with blocks (a text query
   scores the product's text block alone, so photos can never reorder products for a text query). The
   sweep gives a text-only query the vector [b t, (1-b^2)^.5 t] in the two trained blocks: b = 1 is
   what is served, b = 0.7071 restores the trained cross term. Judged on the demo world's TRAIN-split
   queries (all zero-shot rows) and on the real-artwork FIT split, including how many products rank
   worse for their own name with photos than without (the issue's "photos never hurt text").
2. **How much weight do photo queries give the visual block and the trained blocks?**
   ``image_to_text_weight`` a (an image-only query's trained image mean goes a to the text block and
   (1-a^2)^.5 to the image block), ``visual_image_query`` v and ``visual_text_image_query`` vt (the visual
   block's share of a photo and a text+photo query). Text-only queries and products do not change.

The demo world's test split and the real-artwork eval split are never read. The recomposition is checked
against the encoder itself: a few queries encoded with a changed config must equal the recomposed rows.
Writes ``query-weights.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from text_block import Replay, rows, train_queries_world  # noqa: E402

from moonsearch.data import real  # noqa: E402
from moonsearch.eval import real_bench, zero_shot  # noqa: E402
from moonsearch.models.base import Query, create_encoder  # noqa: E402
from moonsearch.models.moon.encoder import MoonEncoder  # noqa: E402
from moonsearch.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


class Recomposed(Replay):
    """The shipped encoder's vectors, computed once per call, with the query-side weights changed: ``b``
    for text-only queries (question 1), ``a``, ``v``, ``vt`` for photo queries (question 2). Products are
    returned as encoded."""

    def __init__(self, enc: MoonEncoder, memo: list, b: float = 1.0, a: float | None = None,
                 v: float | None = None, vt: float | None = None):
        super().__init__(memo)
        cfg = enc.cfg
        self.enc = enc
        self.b = b
        self.a = cfg.image_to_text_weight if a is None else a
        self.v = cfg.visual_image_query if v is None else v
        self.vt = cfg.visual_text_image_query if vt is None else vt
        self.h = enc.model.dim // 2  # the trained text block, then the trained image block
        self.dv = enc.visual.dim
        self.name = f"b={b:g} a={self.a:g} v={self.v:g} vt={self.vt:g}"
        self.fingerprint, self.dim = self.name, enc.dim

    def encode_products(self, products, batch_size: int = 8) -> np.ndarray:
        return self.replay(lambda: self.enc.encode_products(products))

    def encode_queries(self, queries, batch_size: int = 16) -> np.ndarray:
        return self.recompose(self.replay(lambda: self.enc.encode_queries(queries)).copy(), queries)

    def recompose(self, x: np.ndarray, queries) -> np.ndarray:
        cfg, h, dv = self.enc.cfg, self.h, self.dv
        a0, v0, vt0, c = cfg.image_to_text_weight, cfg.visual_image_query, cfg.visual_text_image_query, cfg.text_block
        text = np.array([bool(q.text) and q.image is None for q in queries], bool)
        image = np.array([q.image is not None and not q.text for q in queries], bool)
        both = np.array([q.image is not None and bool(q.text) for q in queries], bool)
        if text.any():  # [f t, 0, 0, MiniLM]: t moves to [b t, (1-b^2)^.5 t]
            t = x[text, :h].copy()
            x[text, :h] = self.b * t
            x[text, h:2 * h] = np.sqrt(1 - self.b ** 2) * t
        if image.any():  # [(1-v^2)^.5 [a i, (1-a^2)^.5 i], v vis, 0]
            y = x[image]
            i = y[:, h:2 * h] / (np.sqrt(1 - v0 ** 2) * np.sqrt(1 - a0 ** 2))
            vis = y[:, 2 * h:2 * h + dv] / v0
            s = np.sqrt(1 - self.v ** 2)
            y[:, :h], y[:, h:2 * h] = s * self.a * i, s * np.sqrt(1 - self.a ** 2) * i
            y[:, 2 * h:2 * h + dv] = self.v * vis
            x[image] = y
        if both.any():  # [(1-c^2)^.5 [(1-vt^2)^.5 sem, vt vis], c MiniLM]
            y = x[both]
            f = np.sqrt(1 - c ** 2)
            sem = y[:, :2 * h] / (f * np.sqrt(1 - vt0 ** 2))
            vis = y[:, 2 * h:2 * h + dv] / (f * vt0)
            y[:, :2 * h] = f * np.sqrt(1 - self.vt ** 2) * sem
            y[:, 2 * h:2 * h + dv] = f * self.vt * vis
            x[both] = y
        return x


def check_recomposition(enc: MoonEncoder, queries: list[Query], a: float, v: float, vt: float) -> float:
    """Largest difference between recomposed rows and the same queries encoded with a, v, vt in the config."""
    model = enc.model
    shipped = model.cfg
    try:
        model.cfg = replace(shipped, image_to_text_weight=a, visual_image_query=v, visual_text_image_query=vt)
        other = MoonEncoder(model, "changed", "changed")
        want = other.encode_queries(queries)
    finally:
        model.cfg = shipped
    got = Recomposed(enc, [], a=a, v=v, vt=vt).recompose(enc.encode_queries(queries), queries)
    return float(np.abs(got - want).max())


def real_rows(r: dict) -> dict[str, float]:
    out = {f"real {var} {mod} {m}": s[m] for var, row in r["rows"].items() if var != "no photos"
           for mod, s in row.items() for m in ("R@1", "R@10")}
    out.update({f"real {var}: worse for own name": c["worse"] for var, c in r.get("text_rank_change", {}).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    world = train_queries_world(args.data, args.out / "demo-train-queries")
    fit = real.build("fit")
    enc = create_encoder("moon-mini")
    photo_queries = [Query(None, q["image"]) for q in fit.queries if q["modality"] == "image"][:6] + \
                    [Query(q["text"], q["image"]) for q in fit.queries if q["modality"] == "text+image"][:6]
    err = check_recomposition(enc, photo_queries, 0.85, 0.95, 0.7)
    print(f"recomposition vs the encoder with a changed config: max |diff| {err:.2e}", flush=True)
    assert err < 1e-4, err
    demo_memo: list = []
    real_memo: list = []

    def judge(**kw) -> dict[str, float]:
        demo = zero_shot.evaluate(Recomposed(enc, demo_memo, **kw), world, limit=args.limit)
        row = rows(demo, ("R@1", "R@10", "MRR@10"))
        row.update(real_rows(real_bench.evaluate(Recomposed(enc, real_memo, **kw), fit)))
        print(kw, {k: round(v, 3) for k, v in row.items()}, flush=True)
        return row

    cfg = enc.cfg
    text_sweep = {b: judge(b=b) for b in (1.0, 0.9, 0.8, 0.7071, 0.5)}
    grid = list(itertools.product((0.5, 0.7071, 0.85), (0.8, 0.9, 0.95)))
    photo_sweep = {(a, v, cfg.visual_text_image_query): judge(a=a, v=v) for a, v in grid}
    photo_sweep.update({(cfg.image_to_text_weight, cfg.visual_image_query, vt): judge(vt=vt) for vt in (0.3, 0.7)})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"queries": "demo train split; real-artwork fit split", "recomposition_max_diff": err,
                       "shipped": {"b": 1.0, "a": cfg.image_to_text_weight, "v": cfg.visual_image_query,
                                   "vt": cfg.visual_text_image_query},
                       "text_meets_photos": {str(b): r for b, r in text_sweep.items()},
                       "photo_queries": {f"a={a:g} v={v:g} vt={vt:g}": r for (a, v, vt), r in photo_sweep.items()}},
                      args.out / "query-weights.json")
    atomic_write_text(markdown(text_sweep, photo_sweep), args.out / "query-weights.md")
    print(markdown(text_sweep, photo_sweep))


def markdown(text_sweep: dict, photo_sweep: dict) -> str:
    def table(cols: dict, head: str, rows: list[str]) -> list[str]:
        out = [f"| {head} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        return out + [f"| {r} | " + " | ".join(fmt(c[r]) for c in cols.values()) + " |" for r in rows]

    first = next(iter(text_sweep.values()))
    lines = ["Text-only queries meeting the product's trained image block ([b t, (1-b^2)^.5 t]; b = 1 is served).", ""]
    lines += table({f"b = {b:g}": r for b, r in text_sweep.items()}, "row (demo train split; real fit split)",
                   [k for k in first if k.startswith(("text ->", "classification", "attribute"))
                    or "text R@" in k or "worse" in k])
    lines += ["", "Photo queries: a = image_to_text_weight, v = visual_image_query, vt = visual_text_image_query.", ""]
    lines += table({f"a={a:g} v={v:g} vt={vt:g}": r for (a, v, vt), r in photo_sweep.items()}, "row",
                   [k for k in first if k.startswith(("image ->", "text+image ->")) or " image R@" in k
                    or "text+image R@" in k])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
