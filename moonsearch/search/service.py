"""The query layer shared by the CLI, the benchmarks and any server: load once, answer many queries.

    svc = SearchService("index/")                 # encoder named in the index manifest
    svc.search_text("red sneakers", k=10)
    svc.search_image(Image.open("photo.jpg"), text="red")
    svc.search_product("P0000042", exclude_group=True)

Search covers every category index (or those named by ``categories``, matched as path prefixes),
each searched for k and merged by score into one top-k. ``route=R`` first ranks categories by
the query's similarity to each category centroid and searches only the best R.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from moonsearch.index.faiss_backend import IndexParams
from moonsearch.index.index_set import IndexSet
from moonsearch.index.multi import multi_search
from moonsearch.models.base import Encoder, Query, create_encoder
from moonsearch.errors import UnknownItem, UserError
from moonsearch.utils.io import parse_category


@dataclass
class Hit:
    item_id: str
    score: float
    title: str
    category: list[str]
    attributes: dict[str, str]
    group_id: str | None = None
    images: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k={k}: expected the number of hits (1 or more)")


class SearchService:
    def __init__(self, index_dir: str | Path, encoder: Encoder | str | None = None, device: str | None = None):
        self.index = IndexSet.load(index_dir)
        self._encoder = encoder if isinstance(encoder, Encoder) else None
        self._encoder_name = encoder if isinstance(encoder, str) else None
        self.device = device
        if self._encoder is not None:
            self.index.check_encoder(self._encoder.describe())
        self.slugs = sorted(self.index.categories)
        self.centroids = np.stack([self.index.categories[s].centroid for s in self.slugs])  # (C, d)
        self._item_loc: dict[str, tuple[str, int]] | None = None
        self._groups: dict[str, list[str]] = {}

    @property
    def encoder(self) -> Encoder:
        """Created on first use from the manifest's encoder name (or the one given)."""
        if self._encoder is None:
            self._encoder = create_encoder(self._encoder_name or self.index.encoder["name"], self.device)
            self.index.check_encoder(self._encoder.describe())
        return self._encoder

    # ---- queries -----------------------------------------------------------------------------
    def search_text(self, text: str, k: int = 10, **kw) -> list[Hit]:
        return self.search_queries([Query(text=text)], k, **kw)[0]

    def search_image(self, image: Image.Image, text: str | None = None, k: int = 10, **kw) -> list[Hit]:
        return self.search_queries([Query(text=text or None, image=image)], k, **kw)[0]

    def search_queries(self, queries: Sequence[Query], k: int = 10, **kw) -> list[list[Hit]]:
        xq = self.encoder.encode_queries(list(queries))  # (nq, d)
        return self.search_vectors(xq, k, **kw)

    def product_vector(self, item_id: str) -> np.ndarray:
        slug, row = self._locate(item_id)
        return np.asarray(self.index.categories[slug].vectors[row], np.float32)

    def search_product(self, item_id: str, k: int = 10, exclude_group: bool = True, **kw) -> list[Hit]:
        """Products like ``item_id`` (its own stored embedding); the item itself, and with
        ``exclude_group`` its variants (same group_id), are left out."""
        return self.search_products([item_id], k, exclude_group, **kw)

    def search_products(self, item_ids: Sequence[str], k: int = 10, exclude_group: bool = True, **kw) -> list[Hit]:
        """Products like all of ``item_ids`` (the normalised mean of their stored embeddings); the
        items themselves, and with ``exclude_group`` their variants, are left out."""
        if not item_ids:
            raise UserError("give at least one item id")
        exclude = set(item_ids)
        for item_id in item_ids:
            slug, row = self._locate(item_id)
            group = self.index.categories[slug].meta.column("group_id")[row].as_py()
            if exclude_group and group:
                exclude |= set(self._group_members(group))
        v = np.mean([self.product_vector(i) for i in dict.fromkeys(item_ids)], axis=0)
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        return self.search_vectors(v[None], k, exclude=exclude, **kw)[0]

    def item(self, item_id: str) -> Hit:
        """The stored record of ``item_id`` (score 0)."""
        return self._hit(*self._locate(item_id), 0.0)

    def search_vectors(self, xq: np.ndarray, k: int = 10, categories: Sequence[str] | None = None,
                       route: int | None = None, exclude: set[str] | None = None,
                       params: IndexParams | None = None,
                       where: Callable[[Hit], bool] | None = None) -> list[list[Hit]]:
        """(nq, d) L2-normalised float32 -> per query the top-k hits over the chosen categories.
        ``where`` keeps only the hits it accepts (e.g. an attribute filter): the search widens (x4 per
        round) until k hits pass or every candidate of the chosen categories was seen."""
        check_k(k)
        if route is not None and (isinstance(route, bool) or route < 0):
            raise UserError(f"route={route}: expected the number of categories to search (1 or more; 0 or none: all)")
        xq = np.ascontiguousarray(xq, np.float32)
        assert xq.ndim == 2 and xq.shape[1] == self.index.encoder["dim"], (xq.shape, self.index.encoder["dim"])
        slugs = self._select(categories)
        cats = [self.index.categories[s] for s in slugs]
        chosen = None
        if route:
            cents = self.centroids[[self.slugs.index(s) for s in slugs]]  # (C, d)
            chosen = [set(row) for row in np.argsort(-(xq @ cents.T), axis=1)[:, :route].tolist()]
        total = sum(c.index.ntotal for c in cats)
        kk = k + (len(exclude) if exclude else 0)
        if where is not None:
            kk *= 2
        out: list[list[Hit] | None] = [None] * len(xq)
        todo = list(range(len(xq)))
        while todo:
            found = multi_search(cats, xq[todo], kk, params, None if chosen is None else [chosen[q] for q in todo])
            still = []
            for q, per_q in zip(todo, found):
                hits = []
                for score, c, row in per_q:
                    hit = self._hit(slugs[c], row, score)
                    if (exclude and hit.item_id in exclude) or (where is not None and not where(hit)):
                        continue
                    hits.append(hit)
                    if len(hits) == k:
                        break
                out[q] = hits
                if where is not None and len(hits) < k and len(per_q) >= kk and kk < total:
                    still.append(q)
            todo, kk = still, min(kk * 4, total)
        return out

    # ---- helpers -----------------------------------------------------------------------------
    def _select(self, categories: Sequence[str] | None) -> list[str]:
        if not categories:
            return self.slugs
        wanted = [parse_category(c) for c in categories]
        chosen = [s for s in self.slugs
                  if any(self.index.categories[s].infos["category"][:len(w)] == w for w in wanted)]
        if not chosen:
            known = sorted(" > ".join(self.index.categories[s].infos["category"]) for s in self.slugs)
            raise UnknownItem(f"no indexed category matches {list(categories)}; known: {', '.join(known)}")
        return chosen

    def _hit(self, slug: str, row: int, score: float) -> Hit:
        m = self.index.categories[slug].meta.slice(row, 1).to_pylist()[0]
        return Hit(m["item_id"], score, m["title"], m["category"], json.loads(m["attributes"] or "{}"),
                   m["group_id"], m["images"] or [], json.loads(m["extra"] or "{}"))

    def _locate(self, item_id: str) -> tuple[str, int]:
        if self._item_loc is None:  # built once: item -> (category, row) and group -> items
            self._item_loc, self._groups = {}, {}
            for slug, cat in self.index.categories.items():
                ids = cat.meta.column("item_id").to_pylist()
                for row, (iid, g) in enumerate(zip(ids, cat.meta.column("group_id").to_pylist())):
                    self._item_loc[iid] = (slug, row)
                    if g:
                        self._groups.setdefault(g, []).append(iid)
        if item_id not in self._item_loc:
            raise UnknownItem(f"item {item_id!r} is not in the index {self.index.root}")
        return self._item_loc[item_id]

    def _group_members(self, group: str) -> list[str]:
        return self._groups.get(group, [])
