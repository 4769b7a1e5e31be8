"""The seeded synthetic product world: catalog, listing photos, behaviour log, and a vectors-only mode.

``generate_world(out, n=2000, seed=0)`` writes::

    out/catalog.parquet   item_id, title, category, attributes, images, image_boxes, group_id, price
    out/images/*.jpg      1-4 listing photos per product (noisy: clutter, real-photo backgrounds,
                          distractors, promo text, several units); image_boxes holds the core box
    out/behavior.parquet  query_id, query_text, query_image, item_id, timestamp, user_id, split
    out/queries/*.jpg     query photos: fresh renders of the bought product, never a catalog photo

Each product and each query draws from its own generator seeded by ``(seed, kind, index)``, so the
files are byte-identical for one seed whatever the number of worker processes.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from moonsearch.data.world import BRANDS, COLOURS, LEAVES, MARKETING, MATERIALS, PATTERNS, SIZES, ProductSpec
from moonsearch.utils.io import atomic_write_parquet

QUERY_MIX = {"text": 12, "image": 3, "text+image": 2}
_PRODUCT, _QUERY, _VECTOR = 1, 2, 3
START_TS = 1767225600  # 2026-01-01T00:00:00Z
SPAN_S = 90 * 86400


POPULARITY_EXPONENT = 0.6


def sample_specs(n: int, seed: int) -> list[ProductSpec]:
    """``n`` products in groups (SPUs) of 1-4 variants that differ in exactly one attribute."""
    rng = np.random.default_rng([seed, 0])
    leaves = list(LEAVES)
    specs: list[ProductSpec] = []
    g = 0
    while len(specs) < n:
        leaf = leaves[int(rng.integers(len(leaves)))]
        top = LEAVES[leaf][0][0]
        base = dict(leaf=leaf, colour=str(rng.choice(list(COLOURS))), pattern=str(rng.choice(PATTERNS)),
                    material=str(rng.choice(MATERIALS[top])), style=int(rng.integers(2)),
                    brand=str(rng.choice(BRANDS)), size=str(rng.choice(SIZES[top])))
        n_var = int(rng.choice([1, 1, 2, 3, 4]))
        vary = str(rng.choice(["colour", "colour", "size", "pattern"]))
        used = {base[vary]}
        for v in range(n_var):
            attrs = dict(base)
            if v:
                pool = {"colour": list(COLOURS), "size": list(SIZES[top]), "pattern": list(PATTERNS)}[vary]
                choices = [c for c in pool if c not in used]
                if not choices:
                    break
                attrs[vary] = str(rng.choice(choices))
                used.add(attrs[vary])
            specs.append(ProductSpec(item_id=f"P{len(specs):07d}", group_id=f"G{g:06d}", **attrs))
            if len(specs) == n:
                break
        g += 1
    return specs


def _colour_word(rng, colour: str) -> str:
    syn = COLOURS[colour][1]
    return syn[0] if rng.random() < 0.7 else syn[int(rng.integers(len(syn)))]


def make_title(spec: ProductSpec, rng: np.random.Generator) -> str:
    """A listing title: attributes in shuffled order, synonyms, dropped words, marketing noise."""
    nouns = LEAVES[spec.leaf][1]
    noun = nouns[0] if rng.random() < 0.6 else nouns[int(rng.integers(len(nouns)))]
    style = LEAVES[spec.leaf][2][spec.style]
    words = {"brand": spec.brand.capitalize(), "colour": _colour_word(rng, spec.colour),
             "pattern": "" if spec.pattern == "solid" and rng.random() < 0.6 else spec.pattern,
             "material": spec.material, "style": style, "size": f"size {spec.size}"}
    for key in ("material", "style", "size", "pattern"):
        if rng.random() < 0.2:
            words[key] = ""  # sellers forget things
    order = ["brand", "colour", "pattern", "material", "style"]
    if rng.random() < 0.3:
        rng.shuffle(order)
    parts = [words[k] for k in order if words[k]] + [noun]
    if words["size"] and rng.random() < 0.6:
        parts.append(words["size"])
    if rng.random() < 0.5:
        parts.insert(0, str(rng.choice(MARKETING)))
    if rng.random() < 0.3:
        parts.append(str(rng.choice(MARKETING)))
    return " ".join(parts)


def make_query_text(spec: ProductSpec, rng: np.random.Generator, short: bool = False) -> str:
    """A shopper's partial description: a noun (often a synonym) plus 0-3 of the attributes."""
    nouns = LEAVES[spec.leaf][1]
    noun = nouns[int(rng.integers(len(nouns)))]
    pool = [_colour_word(rng, spec.colour), spec.brand, spec.material, LEAVES[spec.leaf][2][spec.style]]
    if spec.pattern != "solid":
        pool.append(spec.pattern)
    k = int(rng.integers(0, 2)) if short else int(rng.integers(1, 4))
    picked = [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]
    if short and rng.random() < 0.5:
        return " ".join(picked) if picked else _colour_word(rng, spec.colour)
    text = " ".join(picked + [noun])
    if rng.random() < 0.1 and len(text) > 6:  # a typo
        i = int(rng.integers(1, len(text) - 1))
        text = text[:i] + text[i + 1:]
    return text


def _render_product(args):
    spec, seed, out, size = args
    from moonsearch.data.render import render

    rng = np.random.default_rng([seed, _PRODUCT, int(spec.item_id[1:])])
    title = make_title(spec, rng)
    n_img = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
    paths, boxes = [], []
    for j in range(n_img):
        img, box = render(spec, rng, size, "listing")
        rel = f"images/{spec.item_id}_{j}.jpg"
        img.save(out / rel, quality=88)
        paths.append(rel)
        boxes.append([round(b / size, 4) for b in box])
    price = round(float(rng.uniform(5, 300)), 2)
    return title, paths, boxes, price


def _render_query(args):
    qi, spec, modality, seed, out, size = args
    from moonsearch.data.render import render

    rng = np.random.default_rng([seed, _QUERY, qi])
    text = image = None
    if modality in ("text", "text+image"):
        text = make_query_text(spec, rng, short=modality == "text+image")
    if modality in ("image", "text+image"):
        img, _ = render(spec, rng, size, "query")
        image = f"queries/q{qi:07d}.jpg"
        img.save(out / image, quality=88)
    return text, image


def _pool_map(fn, jobs, workers: int, progress=None):
    if workers <= 1:
        for job in jobs:
            yield fn(job)
            if progress:
                progress()
        return
    with ProcessPoolExecutor(workers) as ex:
        for res in ex.map(fn, jobs, chunksize=16):
            yield res
            if progress:
                progress()


def generate_world(out: str | Path, n: int = 2000, seed: int = 0, image_size: int = 160,
                   queries_per_item: float = 1.5, test_fraction: float = 0.2,
                   workers: int | None = None, progress=None) -> dict:
    """Write the catalog, photos and behaviour log under ``out``; returns a summary dict.

    ``progress(total)`` may return a callable that is called once per rendered product or query.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    specs = sample_specs(n, seed)
    n_q = int(round(n * queries_per_item))
    tick = progress(n + n_q) if progress else None

    rows = list(_pool_map(_render_product, [(s, seed, out, image_size) for s in specs], workers, tick))
    catalog = pa.table({
        "item_id": [s.item_id for s in specs],
        "title": [r[0] for r in rows],
        "category": pa.array([s.path for s in specs], pa.list_(pa.string())),
        "attributes": pa.array([list(s.attributes().items()) for s in specs], pa.map_(pa.string(), pa.string())),
        "images": pa.array([r[1] for r in rows], pa.list_(pa.string())),
        "image_boxes": pa.array([r[2] for r in rows], pa.list_(pa.list_(pa.float32()))),
        "group_id": [s.group_id for s in specs],
        "price": pa.array([r[3] for r in rows], pa.float64()),
    })
    atomic_write_parquet(catalog, out / "catalog.parquet")

    rng = np.random.default_rng([seed, _QUERY])
    # a long tail by sales rank (Zipf-like, s = 0.6): the best seller takes ~2% of the purchases of a
    # 2,000-product world. (Unbounded zipf draws gave one product a third of all purchases, so the
    # training split covered under 200 products.)
    rank = rng.permutation(n) + 1
    popularity = 1.0 / rank.astype(np.float64) ** POPULARITY_EXPONENT
    popularity /= popularity.sum()
    bought = rng.choice(n, size=n_q, p=popularity)
    mods = list(QUERY_MIX)
    mix = np.array(list(QUERY_MIX.values()), np.float64)
    modality = rng.choice(mods, size=n_q, p=mix / mix.sum())
    ts = np.sort(rng.integers(START_TS, START_TS + SPAN_S, size=n_q))
    users = rng.integers(0, max(1, n // 4), size=n_q)
    jobs = [(i, specs[int(bought[i])], str(modality[i]), seed, out, image_size) for i in range(n_q)]
    qs = list(_pool_map(_render_query, jobs, workers, tick))
    cut = ts[int(n_q * (1 - test_fraction))] if n_q else 0
    behavior = pa.table({
        "query_id": [f"Q{i:07d}" for i in range(n_q)],
        "query_text": pa.array([q[0] for q in qs], pa.string()),
        "query_image": pa.array([q[1] for q in qs], pa.string()),
        "modality": [str(m) for m in modality],
        "item_id": [specs[int(b)].item_id for b in bought],
        "timestamp": pa.array(ts * 1_000_000, pa.timestamp("us", tz="UTC")),
        "user_id": [f"U{u:06d}" for u in users],
        "split": ["test" if t >= cut else "train" for t in ts],
    })
    atomic_write_parquet(behavior, out / "behavior.parquet")
    return {"items": n, "groups": len({s.group_id for s in specs}), "queries": n_q,
            "images": sum(len(r[1]) for r in rows), "categories": len({s.leaf for s in specs})}


def generate_vectors(out: str | Path, n: int, dim: int = 256, n_queries: int = 1000, seed: int = 0,
                     chunk: int = 100_000) -> dict:
    """Vectors-only world for index benchmarks: ``catalog.parquet`` (no images), ``vectors.npy``
    (n, dim) float32 L2-normalised, ``queries.npy`` (n_queries, dim).

    Vectors are structured like real embeddings: a leaf-category centre, plus colour, material and
    group offsets, plus noise, so IVF-PQ has clusters to find (uniform vectors defeat it).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _VECTOR])
    leaves, colours = list(LEAVES), list(COLOURS)
    mats = sorted({m for v in MATERIALS.values() for m in v})
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    c_leaf = unit(rng.normal(size=(len(leaves), dim))) * 1.0
    c_col = unit(rng.normal(size=(len(colours), dim))) * 0.6
    c_mat = unit(rng.normal(size=(len(mats), dim))) * 0.4
    vec_path = out / "vectors.npy"
    tmp = vec_path.with_suffix(".npy.tmp")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    leaf_idx = rng.integers(len(leaves), size=n)
    col_idx = rng.integers(len(colours), size=n)
    mat_idx = rng.integers(len(mats), size=n)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        group = unit(rng.normal(size=(e - s, dim))) * 0.45
        v = c_leaf[leaf_idx[s:e]] + c_col[col_idx[s:e]] + c_mat[mat_idx[s:e]] + group
        mm[s:e] = unit(v).astype(np.float32)
    mm.flush()
    del mm
    os.replace(tmp, vec_path)
    base = np.load(vec_path, mmap_mode="r")
    qi = rng.choice(n, size=n_queries, replace=False)
    queries = unit(base[qi] + rng.normal(size=(n_queries, dim)) * 0.02).astype(np.float32)
    np.save(out / "queries.npy", queries)
    catalog = pa.table({
        "item_id": [f"V{i:08d}" for i in range(n)],
        "title": [f"{colours[c]} {mats[m]} {leaves[l]}" for l, c, m in zip(leaf_idx, col_idx, mat_idx)],
        "category": pa.array([list(LEAVES[leaves[l]][0]) for l in leaf_idx], pa.list_(pa.string())),
    })
    atomic_write_parquet(catalog, out / "catalog.parquet")
    return {"items": n, "dim": dim, "queries": n_queries}
