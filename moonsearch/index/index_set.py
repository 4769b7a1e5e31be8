"""A folder of per-category indices (the embedding cache beside them is the indexer's,
``moonsearch.indexer.cache``)::

    manifest.json            encoder (name, dim, fingerprint), level, params, categories, catalog, shared
    quantizer/               the coarse quantizer + PQ codebook all categories share (shared.py; sets
                             built with at least IndexParams.shared_from items)
    categories/<slug>/       one CategoryIndex per category (see category.py)
    embeddings/<fingerprint>/shard-*.npz   cached item embeddings keyed by content hash
    rejects.jsonl            rows and images that were reported and skipped

"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from moonsearch.index.category import CategoryIndex, IndexMismatch
from moonsearch.index.shared import SharedQuantizer
from moonsearch.utils.io import atomic_write_json
from moonsearch.errors import MissingFile

FORMAT = 1
# A process whose loaded categories store fewer bytes of vectors than this re-ranks through their memory
# maps (all of them may become resident: ~0.5 GB at 1M x 256 float16, and 0.25 ms faster per query
# there); above it, with pread (utils.io.RowReader), so that 10M vectors never count as its memory.
MAP_RERANK_BELOW = 1 << 30


def slugify(path: list[str]) -> str:
    text = "__".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") or "x" for p in path) or "uncategorised"
    return text[:120] + "-" + hashlib.sha1("\x1f".join(path).encode()).hexdigest()[:6]


def category_key(path: list[str], level: int | None) -> list[str]:
    """The category an item is indexed under: its path cut to ``level`` (None = leaf)."""
    return list(path[:level]) if level else list(path)


class IndexSet:
    def __init__(self, root: Path, manifest: dict, categories: dict[str, CategoryIndex],
                 shared: SharedQuantizer | None = None):
        self.root, self.manifest, self.categories, self.shared = root, manifest, categories, shared

    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    @classmethod
    def load(cls, root: str | Path, only: set[str] | None = None) -> "IndexSet":
        """The index folder; ``only``: load just these category slugs (a search shard's share)."""
        root = Path(root)
        mpath = root / "manifest.json"
        if not mpath.exists():
            raise MissingFile(f"{root}: not a moonsearch index (no manifest.json); build one with "
                                    "'moonsearch index catalog.parquet --out DIR'")
        manifest = json.loads(mpath.read_text())
        shared = SharedQuantizer.load(root) if manifest.get("shared") else None
        if manifest.get("shared") and (shared is None or shared.id != manifest["shared"]["id"]):
            raise IndexMismatch(f"{root}: the manifest names shared quantizer {manifest['shared']['id']}, but "
                                f"{root / 'quantizer'} is {'missing' if shared is None else shared.id}; rebuild the index")
        cats = {}
        for slug in manifest["categories"]:
            if only is not None and slug not in only:
                continue
            cats[slug] = CategoryIndex.load(root / "categories" / slug, shared=shared)
            if cats[slug].infos["encoder"]["fingerprint"] != manifest["encoder"]["fingerprint"]:
                raise IndexMismatch(f"{root / 'categories' / slug}: built by another encoder than the manifest's")
        if sum(c.vectors.nbytes for c in cats.values()) < MAP_RERANK_BELOW:
            for c in cats.values():
                c.rows_reader.close()  # without its file descriptor the reader indexes the map
        return cls(root, manifest, cats, shared)

    def check_encoder(self, encoder_info: dict) -> None:
        mine = self.encoder
        if (mine["name"], mine["fingerprint"], mine["dim"]) != (encoder_info["name"], encoder_info["fingerprint"],
                                                                encoder_info["dim"]):
            if mine["name"] == encoder_info["name"]:
                raise IndexMismatch(
                    f"{self.root} was built with {mine['name']} at fingerprint {mine['fingerprint']}, but that encoder "
                    f"now has fingerprint {encoder_info['fingerprint']} (its weights or config changed); "
                    f"rebuild the index with 'moonsearch index ... --model {mine['name']}'")
            raise IndexMismatch(
                f"{self.root} was built with encoder {mine['name']} (fingerprint {mine['fingerprint']}, "
                f"dim {mine['dim']}), not {encoder_info['name']} (fingerprint {encoder_info['fingerprint']}, "
                f"dim {encoder_info['dim']}); query with --model {mine['name']} or rebuild the index")

    def write_manifest(self) -> None:
        self.manifest["categories"] = {
            slug: {"path": c.infos["category"], "count": c.infos["count"], "factory": c.infos["factory"]}
            for slug, c in sorted(self.categories.items())}
        self.manifest["count"] = sum(c.infos["count"] for c in self.categories.values())
        if self.shared is not None:
            self.manifest["shared"] = self.shared.infos
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.manifest, self.root / "manifest.json")

    def next_code(self) -> int:
        """A category code no category of this set uses (faiss ids carry it; see faiss_backend.ID_BITS)."""
        return 1 + max((c.code for c in self.categories.values()), default=0)

    @property
    def count(self) -> int:
        return sum(c.index.ntotal for c in self.categories.values())

    def delete(self, item_ids: set[str]) -> int:
        removed = 0
        for slug in list(self.categories):
            new, n = self.categories[slug].delete(item_ids)
            removed += n
            if new is None:
                del self.categories[slug]
            else:
                self.categories[slug] = new
        self.write_manifest()
        return removed


def new_manifest(encoder_info: dict, level: int | None, params: dict, catalog: str) -> dict:
    return {"format": FORMAT, "encoder": encoder_info, "level": level, "params": params, "catalog": catalog,
            "categories": {}, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
