"""Training data: behaviour pairs (query -> purchased item), the products and queries they stand for
(photos decoded once), and seeded same-category hard negatives."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moonsearch.data.catalog import CatalogRecord, iter_catalog
from moonsearch.data.images import load_image, load_images
from moonsearch.errors import MissingFile, UserError
from moonsearch.models.base import Product, Query
from moonsearch.trainer.config import TrainConfig

MODALITIES = ("text", "image", "text+image")


@dataclass
class Pair:
    item_id: str
    group_id: str | None
    text: str | None
    image: str | None
    modality: str
    ts: int


def distill_texts(spec: str) -> list[str]:
    """The outside texts of ``TrainConfig.distill_texts``: 'wide-pool-names' or a file, one per line
    (blank lines skipped; repeats kept once)."""
    if spec == "wide-pool-names":
        from moonsearch.data.real import wide_names

        return wide_names()
    path = Path(spec)
    if not path.is_file():
        raise MissingFile(f"distill_texts: {path} not found (a UTF-8 file, one text per line, or 'wide-pool-names')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"distill_texts: {path} is not UTF-8 text (byte {e.start})") from None
    texts = list(dict.fromkeys(t.strip() for t in lines if t.strip()))
    if not texts:
        raise UserError(f"distill_texts: {path} holds no text")
    return texts


def load_pairs(data: Path, cfg: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Training pairs (resampled to the modality mix) and validation pairs (the latest by time)."""
    for f in ("catalog.parquet", "behavior.parquet"):
        if not (data / f).exists():
            raise MissingFile(f"{data / f} not found: training needs a catalog and a behaviour log "
                                    f"(the demo world: moonsearch demo-data --out {data})")
    rows = [b for b in pq.read_table(data / "behavior.parquet").to_pylist() if b["split"] == "train"]
    rows.sort(key=lambda b: b["timestamp"])
    groups = {r["item_id"]: r["group_id"] for r in pq.read_table(data / "catalog.parquet",
                                                                 columns=["item_id", "group_id"]).to_pylist()}
    pairs = [Pair(b["item_id"], groups.get(b["item_id"]), b["query_text"], b["query_image"], b["modality"],
                  int(b["timestamp"].timestamp())) for b in rows if b["item_id"] in groups]
    n_val = int(len(pairs) * cfg.val_fraction)
    train, val = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    target = np.array(cfg.modality_mix, float) / sum(cfg.modality_mix)
    have = np.array([sum(p.modality == m for p in train) for m in MODALITIES], float)
    weight = {m: (t / (h / len(train)) if h else 0.0) for m, t, h in zip(MODALITIES, target, have)}
    rng = np.random.default_rng([cfg.seed, 11])
    w = np.array([weight[p.modality] for p in train])
    picked = rng.choice(len(train), size=len(train), replace=True, p=w / w.sum())
    return [train[i] for i in sorted(picked)], val


class Batches:
    """Products and queries for pairs (decoded photos kept in memory: each file is read once), and
    per-step seeded hard negatives."""

    def __init__(self, data: Path, cfg: TrainConfig):
        self.data, self.cfg = data, cfg
        self.records: dict[str, CatalogRecord] = {r.item_id: r for r in iter_catalog(data / "catalog.parquet", print)}
        self.by_leaf: dict[tuple, list[str]] = {}
        for r in self.records.values():
            self.by_leaf.setdefault(tuple(r.category), []).append(r.item_id)
        self.all_ids = sorted(self.records)
        self.bad_images: set[tuple[str, int]] = set()
        self._images: dict[str, object] = {}
        self.neighbours: dict[str, list[str]] = {}
        if cfg.hard_negative_index:
            self.neighbours = index_neighbours(Path(cfg.hard_negative_index), cfg.hard_negative_k)

    def image(self, ref: str):
        if ref not in self._images:
            self._images[ref] = load_image(ref, self.data)
        return self._images[ref]

    def product(self, item_id: str, bare: bool = False) -> Product:
        """The catalog product; ``bare`` withholds its category and attributes (field dropout)."""
        r = self.records[item_id]
        imgs, bad = load_images(r.images[:4], load=self.image)
        for i, why in bad:  # reported once per image, the product trains on the photos that load
            if (item_id, i) not in self.bad_images:
                self.bad_images.add((item_id, i))
                print(f"row {r.row} (item {item_id}): images[{i}]: {why} (image skipped)")
        return Product(r.title, [] if bare else list(r.category), {} if bare else dict(r.attributes), imgs, item_id)

    def query(self, p: Pair) -> Query:
        return Query(p.text, self.image(p.image) if p.image else None)

    def hard_negative(self, p: Pair, rng: np.random.Generator, fallback: bool = False) -> str | None:
        """A same-category product that is not the positive nor its variant: one of its nearest
        neighbours in the given index, else any product of its leaf category; where the leaf holds
        only the positive's group, None, or with ``fallback`` a random product of another group."""
        def ok(i):
            return i in self.records and i != p.item_id and (p.group_id is None or self.records[i].group_id != p.group_id)

        pool = [i for i in self.neighbours.get(p.item_id, []) if ok(i)]
        if not pool:
            pool = [i for i in self.by_leaf[tuple(self.records[p.item_id].category)] if ok(i)]
        if pool:
            return str(rng.choice(pool))
        if not fallback:
            return None
        for _ in range(100):  # rejection sampling: other-group products are the vast majority
            i = self.all_ids[int(rng.integers(len(self.all_ids)))]
            if ok(i):
                return i
        others = [i for i in self.all_ids if ok(i)]
        if not others:
            raise UserError(f"{self.data}: every product shares the group of {p.item_id}; no negative exists")
        return str(rng.choice(others))


def index_neighbours(root: Path, k: int) -> dict[str, list[str]]:
    """item -> its k nearest products in the same category index (exact, from the stored vectors)."""
    from moonsearch.index.index_set import IndexSet

    out: dict[str, list[str]] = {}
    for cat in IndexSet.load(root).categories.values():
        v = np.asarray(cat.vectors, np.float32)
        ids = cat.meta.column("item_id").to_pylist()
        for s in range(0, len(v), 1024):
            sims = v[s:s + 1024] @ v.T
            for r, row in enumerate(sims):
                row[s + r] = -np.inf
                top = np.argsort(-row)[:k]
                out[ids[s + r]] = [ids[j] for j in top]
    return out
