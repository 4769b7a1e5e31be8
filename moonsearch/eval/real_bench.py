"""The held-out real-artwork check (``moonsearch bench real``): recall@k of text, image and text+image
queries over a catalog of real drawings, for several ways of giving the products their photos.

Product variants: ``clean+listing`` (clean picture + listing photo, the default), ``listing`` (the
listing photo only), ``clean`` and ``no photos`` (title only). Search is exact (inner product over
every product), so the numbers are the encoder's and not an index's. ``text_rank_change`` compares each
product's rank for its own name with and without its photos: photos must never make a product harder
to find by text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moonsearch.data.real import RealSet
from moonsearch.eval.metrics import first_hit_ranks, summarize
from moonsearch.models.base import Encoder, Product, Query

VARIANTS = ("clean+listing", "listing", "clean", "no photos")
MODALITIES = ("text", "image", "text+image")


def product_vectors(encoder: Encoder, data: RealSet, variant: str) -> np.ndarray:
    """(n_products, dim) for one variant."""
    def images(i):
        return {"clean+listing": [data.clean[i], data.listing[i]], "listing": [data.listing[i]],
                "clean": [data.clean[i]], "no photos": []}[variant]

    return encoder.encode_products([Product(title=t, images=images(i), item_id=data.item_ids[i])
                                    for i, t in enumerate(data.titles)])


def query_vectors(encoder: Encoder, data: RealSet) -> np.ndarray:
    return encoder.encode_queries([Query(q["text"], q["image"]) for q in data.queries])


def ranks(xq: np.ndarray, xb: np.ndarray, item_ids: Sequence[str], targets: Sequence[str], k: int = 50) -> np.ndarray:
    """0-based rank of each query's target among all products (exact inner-product search)."""
    assert xq.shape[1] == xb.shape[1], (xq.shape, xb.shape)
    top = np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]  # (nq, k)
    ids = np.asarray(item_ids)
    return first_hit_ranks([ids[row].tolist() for row in top], [{t} for t in targets])


def evaluate(encoder: Encoder, data: RealSet, variants: Sequence[str] = VARIANTS) -> dict:
    """{"model", "split", "rows": {variant: {modality: summary}}, "text_rank_change": {...}, "image by
    product vendor (<first variant>)": {vendor: summary}}."""
    xq = query_vectors(encoder, data)
    targets = [q["item_id"] for q in data.queries]
    mods = np.array([q["modality"] for q in data.queries])
    rows, text_ranks = {}, {}
    for v in variants:
        xb = product_vectors(encoder, data, v)
        r = ranks(xq, xb, data.item_ids, targets, k=len(data.item_ids))
        rows[v] = {m: summarize(r[mods == m], (1, 5, 10)) for m in MODALITIES if (mods == m).any()}
        text_ranks[v] = r[mods == "text"]
        if v == variants[0]:  # image queries by the vendor of the product they look for
            source = dict(zip(data.item_ids, data.sources))
            vendor = np.array([source[t] for t in targets])
            by_vendor = {s: summarize(r[(mods == "image") & (vendor == s)], (1, 10))
                         for s in sorted(set(data.sources)) if ((mods == "image") & (vendor == s)).any()}
    out = {"model": encoder.name, "fingerprint": encoder.fingerprint, "split": data.split,
           "products": len(data.item_ids), "rows": rows, f"image by product vendor ({variants[0]})": by_vendor}
    if "no photos" in text_ranks:
        base = text_ranks["no photos"]
        out["text_rank_change"] = {v: {"worse": int((r > base).sum()), "better": int((r < base).sum()),
                                       "n": int(len(r))} for v, r in text_ranks.items() if v != "no photos"}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| model | products | text R@10 | image R@10 | text+image R@10 | text MRR@10 | image MRR@10 |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for v, row in res["rows"].items():
            def cell(m, key="R@10"):
                return f"{row[m][key]:.3f}" if m in row else "-"
            lines.append(f"| {res['model']} | {v} | {cell('text')} | {cell('image')} | {cell('text+image')} | "
                         f"{cell('text', 'MRR@10')} | {cell('image', 'MRR@10')} |")
    return "\n".join(lines)


def write(results: list[dict], out: Path, name: str = "real") -> list[Path]:
    """``<name>.json``, ``<name>.md`` and a bar chart ``<name>.png`` (R@10 per model, variant, modality)."""
    from moonsearch.utils.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    atomic_write_json(results, paths[0])
    atomic_write_text(markdown(results) + "\n", paths[1])
    _plot(results, paths[2])
    return paths


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moonsearch.utils.io import atomic_path

    variants = [v for v in VARIANTS if v in results[0]["rows"]]
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(4.2 * len(MODALITIES), 3.6), sharey=True)
    width = 0.8 / max(1, len(results))
    for ax, m in zip(axes, MODALITIES):
        for j, res in enumerate(results):
            vals = [res["rows"][v].get(m, {}).get("R@10", np.nan) for v in variants]
            ax.bar(np.arange(len(variants)) + j * width, vals, width, label=res["model"])
        ax.set_xticks(np.arange(len(variants)) + width * (len(results) - 1) / 2, variants, rotation=20, fontsize=8)
        ax.set_title(f"{m} -> product, R@10")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"held-out real artwork ({results[0]['split']} split, {results[0]['products']} products)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)



