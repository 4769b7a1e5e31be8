"""Zero-shot evaluation on the paper's three tasks, from embeddings only.

- retrieval: text -> product, image -> product (the behaviour log's test split), product -> product
  (a product's photos + title against the catalog; relevant = its variants, same group_id);
  Recall@1/5/10 and MRR@10 within the evaluated catalog.
- product classification: products (photos + title only: category and attributes are the labels, so
  they are withheld) against the embedded category paths at each level; accuracy per level.
- attribute prediction: per attribute key, products against "key: value" for every value seen;
  accuracy per key.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moonsearch.data.images import load_image, load_images
from moonsearch.eval.metrics import first_hit_ranks, summarize
from moonsearch.models.base import Encoder, Product, Query
from moonsearch.utils.io import atomic_path, atomic_write_json, atomic_write_text


def _images(refs, base, skipped: list, n=4):
    imgs, bad = load_images(refs[:n], base)
    skipped.extend(f"{refs[i]}: {why}" for i, why in bad)
    return imgs


def evaluate(enc: Encoder, data: Path, limit: int | None = 400, max_queries: int = 300, seed: int = 0) -> dict:
    cat = pq.read_table(data / "catalog.parquet").to_pylist()
    beh_path = data / "behavior.parquet"
    beh = [b for b in pq.read_table(beh_path).to_pylist() if b["split"] == "test"] if beh_path.exists() else []
    rng = np.random.default_rng(seed)
    if limit and len(cat) > limit:  # keep every product the test queries bought, fill up at random
        bought = {b["item_id"] for b in beh}
        keep = [r for r in cat if r["item_id"] in bought][:limit]
        rest = [r for r in cat if r["item_id"] not in bought]
        extra = rng.choice(len(rest), size=max(0, limit - len(keep)), replace=False) if rest else []
        cat = keep + [rest[i] for i in sorted(extra)]
    ids = [r["item_id"] for r in cat]
    pos = {i: k for k, i in enumerate(ids)}
    skipped: list[str] = []
    imgs = [_images(r["images"] or [], data, skipped) for r in cat]
    full = enc.encode_products([Product(r["title"], r["category"], dict(r["attributes"] or {}), im)
                                for r, im in zip(cat, imgs)])  # (N, d) the indexed form
    bare = enc.encode_products([Product(r["title"], [], {}, im) for r, im in zip(cat, imgs)])  # labels withheld
    res: dict = {"encoder": enc.name, "products": len(cat), "images_skipped": skipped, "retrieval": {},
                 "classification": {}, "attributes": {}}

    queries = [b for b in beh if b["item_id"] in pos][:max_queries]
    for mod in ("text", "image", "text+image"):
        qs = [b for b in queries if b["modality"] == mod]
        if not qs:
            continue
        Q = enc.encode_queries([Query(b["query_text"], load_image(b["query_image"], data) if b["query_image"] else None)
                                for b in qs])
        ranked = [[ids[j] for j in np.argsort(-s)[:50]] for s in Q @ full.T]
        res["retrieval"][f"{mod} -> product"] = summarize(first_hit_ranks(ranked, [{b["item_id"]} for b in qs]),
                                                          (1, 5, 10))
    groups: dict[str, list[str]] = {}
    for r in cat:
        if r.get("group_id"):
            groups.setdefault(r["group_id"], []).append(r["item_id"])
    src = [k for k, r in enumerate(cat) if len(groups.get(r.get("group_id"), [])) > 1][:max_queries]
    if src:
        S = bare[src] @ full.T
        for row, k in enumerate(src):
            S[row, k] = -np.inf  # not itself
        ranked = [[ids[j] for j in np.argsort(-s)[:50]] for s in S]
        rel = [set(groups[cat[k]["group_id"]]) - {ids[k]} for k in src]
        res["retrieval"]["product -> product"] = summarize(first_hit_ranks(ranked, rel), (1, 5, 10))

    depth = max((len(r["category"] or []) for r in cat), default=0)
    for level in range(1, depth + 1):
        labels = sorted({" > ".join(r["category"][:level]) for r in cat if len(r["category"] or []) >= level})
        L = enc.encode_texts(labels)
        rows = [k for k, r in enumerate(cat) if len(r["category"] or []) >= level]
        pred = (bare[rows] @ L.T).argmax(1)
        truth = [labels.index(" > ".join(cat[k]["category"][:level])) for k in rows]
        res["classification"][f"level {level}"] = float((pred == np.array(truth)).mean())
    keys = sorted({k for r in cat for k in dict(r["attributes"] or {})})
    for key in keys:
        rows = [k for k, r in enumerate(cat) if key in dict(r["attributes"] or {})]
        values = sorted({dict(cat[k]["attributes"])[key] for k in rows})
        if len(values) < 2:
            continue
        V = enc.encode_texts([f"{key}: {v}" for v in values])
        pred = (bare[rows] @ V.T).argmax(1)
        truth = np.array([values.index(dict(cat[k]["attributes"])[key]) for k in rows])
        res["attributes"][key] = float((pred == truth).mean())
    return res


def table(results: list[dict]) -> str:
    names = [r["encoder"] for r in results]
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    tasks = []
    for r in results:
        for t, v in r["retrieval"].items():
            for m in ("R@1", "R@10", "MRR@10"):
                tasks.append(("retrieval", t, m))
        tasks += [("classification", t, None) for t in r["classification"]]
        tasks += [("attributes", t, None) for t in r["attributes"]]
    seen = []
    for t in tasks:
        if t not in seen:
            seen.append(t)
    for group, t, m in seen:
        label = f"{t} {m}" if m else (f"classification {t}" if group == "classification" else f"attribute {t}")
        vals = []
        for r in results:
            v = r[group].get(t)
            vals.append("-" if v is None else f"{(v[m] if m else v):.3f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write(results: list[dict], out: Path, name: str = "zero-shot") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results, out / f"{name}.json")
    atomic_write_text(table(results), out / f"{name}.md")
    labels = [f"{t} R@10" for t in results[0]["retrieval"]] + [f"cls {t}" for t in results[0]["classification"]] + \
        [f"attr {t}" for t in results[0]["attributes"]]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 3.5))
    w = 0.8 / len(results)
    for i, r in enumerate(results):
        vals = [v["R@10"] for v in r["retrieval"].values()] + list(r["classification"].values()) + \
            list(r["attributes"].values())
        ax.bar(np.arange(len(vals)) + i * w, vals, w, label=r["encoder"])
    ax.set_xticks(np.arange(len(labels)) + w * (len(results) - 1) / 2, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=min(3, len(results)), frameon=False)
    fig.tight_layout()
    with atomic_path(out / f"{name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
