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


MODES = ("vector", "lexical", "hybrid")
DEFAULT_MODE = "hybrid"  # measured best on the demo world (benchmarks/README.md, hybrid search)
RRF_K = 60  # reciprocal rank fusion constant
DEFAULT_FUSION, DEFAULT_ALPHA = "convex", 0.6
CANDIDATES = 100  # candidates taken from each side before fusion


@dataclass
class SearchResult:
    hits: list[Hit]
    understood: dict = field(default_factory=dict)
    mode: str = "vector"


def remembered(where: Callable[[Hit], bool] | None) -> Callable[[Hit], bool] | None:
    """``where`` asked once per item: the widening rounds of a filtered search see their first
    candidates again, and the filter (query understanding's, an attribute filter) is the costly part."""
    if where is None:
        return None
    seen: dict[str, bool] = {}

    def ask(hit: Hit) -> bool:
        v = seen.get(hit.item_id)
        if v is None:
            v = seen[hit.item_id] = bool(where(hit))
        return v
    return ask


def candidates(k: int) -> int:
    """How many hits each side of a hybrid search contributes before fusion."""
    return max(k, CANDIDATES)


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: item -> sum over rankings of 1 / (k + rank), rank from 1."""
    out: dict[str, float] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, 1):
            out[item] = out.get(item, 0.0) + 1.0 / (k + r)
    return out


def convex(vector: Sequence[tuple[str, float]], lexical: Sequence[tuple[str, float]], alpha: float) -> dict[str, float]:
    """alpha * min-max-normalised vector score + (1 - alpha) * min-max-normalised BM25 (0 where absent)."""
    def norm(pairs):
        if not pairs:
            return {}
        v = np.array([s for _, s in pairs], np.float64)
        lo, hi = v.min(), v.max()
        return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for (i, _), s in zip(pairs, v)}

    a, b = norm(vector), norm(lexical)
    return {i: alpha * a.get(i, 0.0) + (1 - alpha) * b.get(i, 0.0) for i in dict.fromkeys([*a, *b])}


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k={k}: expected the number of hits (1 or more)")


class SearchService:
    def __init__(self, index_dir: str | Path | IndexSet, encoder: Encoder | str | None = None, device: str | None = None):
        """``index_dir``: an index folder, or an IndexSet already loaded (e.g. a shard's categories)."""
        self.index = index_dir if isinstance(index_dir, IndexSet) else IndexSet.load(index_dir)
        if isinstance(encoder, Encoder):
            self.index.check_encoder(encoder.describe())
        self._start({s: c.centroid for s, c in self.index.categories.items()}, encoder, device)

    def _start(self, centroids: dict[str, np.ndarray], encoder: Encoder | str | None, device: str | None) -> None:
        """What every service holds beside its index: the categories in order with their centroids
        (routing), the encoder (or its name: loaded on first use), the lookups built on first use, and
        the fusion."""
        self._encoder = None if encoder is None or isinstance(encoder, str) else encoder  # or one that behaves so
        self._encoder_name = encoder if isinstance(encoder, str) else None
        self.device = device
        self.slugs = sorted(centroids)
        self.centroids = np.stack([centroids[s] for s in self.slugs])  # (C, d)
        self._item_loc: dict[str, tuple[str, int]] | None = None
        self._groups: dict[str, list[str]] = {}
        self._lexical = None
        self._gazetteer = None
        self._readings: dict | None = None
        self._value_holders: dict[tuple[str, str], set[str]] | None = None
        self._columns: dict[str, list[list]] = {}
        # convex fusion, alpha 0.6: fitted on the behaviour log's validation slice, where it beat RRF for
        # both clip-mini and moon-mini (benchmarks/hybrid.py); fusion = "rrf" gives reciprocal rank fusion
        self.fusion = DEFAULT_FUSION
        self.alpha = DEFAULT_ALPHA

    @property
    def lexical(self):
        """BM25 over every category (collection statistics shared), built on first use."""
        if self._lexical is None:
            from moonsearch.index.lexical import LexicalSet

            self._lexical = LexicalSet({s: c.lexical for s, c in self.index.categories.items()})
        return self._lexical

    @property
    def gazetteer(self):
        if self._gazetteer is None:
            from moonsearch.search.understand import Gazetteer

            readings = self._category_readings()
            self._gazetteer = Gazetteer.from_parts(readings[s] for s in self.index.categories)
        return self._gazetteer

    def _category_readings(self) -> dict:
        """slug -> the category's readings (query understanding's vocabulary), read once."""
        if self._readings is None:
            from moonsearch.search.understand import readings_of

            self._readings = {s: readings_of(c) for s, c in self.index.categories.items()}
        return self._readings

    def _holding(self, filters: dict[str, str], categories: Sequence[str] | None) -> list[str]:
        """The categories (full paths) that can hold an item carrying every filter value: under the
        filter's category, and holding each attribute value somewhere. Empty: no item can."""
        from moonsearch.index.lexical import fold

        if self._value_holders is None:
            self._value_holders = {}
            for slug, readings in self._category_readings().items():
                for r in readings:
                    if r.key != "category":
                        self._value_holders.setdefault((r.key, fold(r.value)), set()).add(slug)
        chosen = set(self._select(categories))
        if "category" in filters:
            chosen &= set(self._select([filters["category"]]))
        for key, value in filters.items():
            if key != "category":
                chosen &= self._value_holders.get((key, fold(str(value))), set())
        return [" > ".join(self._path(s)) for s in self.slugs if s in chosen]

    @property
    def encoder(self) -> Encoder:
        """Created on first use from the manifest's encoder name (or the one given)."""
        if self._encoder is None:
            self._encoder = create_encoder(self._encoder_name or self.index.encoder["name"], self.device)
            self.index.check_encoder(self._encoder.describe())
        return self._encoder

    # ---- queries -----------------------------------------------------------------------------
    def search_text(self, text: str, k: int = 10, mode: str = "vector", understand: bool = False, **kw) -> list[Hit]:
        """Text -> products. ``mode``/``understand``: see ``search`` (the defaults keep the plain vector search)."""
        if mode == "vector" and not understand:
            return self.search_queries([Query(text=text)], k, **kw)[0]
        return self.search(text, k=k, mode=mode, understand=understand, **kw).hits

    def search(self, text: str | None = None, image: Image.Image | None = None, k: int = 10,
               mode: str | None = None, understand: bool = True, vector: np.ndarray | None = None,
               categories: Sequence[str] | None = None, route: int | None = None,
               where: Callable[[Hit], bool] | None = None, exclude: set[str] | None = None,
               vector_hits: list[Hit] | None = None) -> SearchResult:
        """Hybrid search. ``mode``: vector (embeddings), lexical (BM25 over id, title, category path and
        attribute values), hybrid (both, fused by ``self.fusion``: "convex" = alpha * min-max-normalised
        vector score + (1 - alpha) * normalised BM25, alpha = ``self.alpha``; or "rrf").
        ``understand``: catalog values found in the text (see search/understand.py) become filters
        (hits carrying them first) or boosts; product codes make the lexical side lead.
        A photo (``image``) always goes through the vector side, and in hybrid mode the words that come
        with a photo are not searched lexically (unless they hold a product code); ``vector`` replaces the
        encoder call (give ``image`` too when the vector came from a photo); ``vector_hits`` (the top
        ``candidates(k)`` of that vector with the same categories / route / where / exclude, e.g. from a
        batched search) replaces the unfiltered vector search."""
        check_k(k)
        mode = mode or DEFAULT_MODE
        if mode not in MODES:
            raise UserError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        text = (text or "").strip() or None
        if text is None and image is None and vector is None:
            raise UserError("empty query: give text or a photo")
        from moonsearch.index.lexical import analyse

        if mode == "lexical" and image is not None:
            mode = "hybrid"  # a photo has no words: its vector joins
        und = self.gazetteer.parse(text) if (understand and text) else None
        lexical_ok = text is not None and bool(analyse(text))
        if mode == "lexical" and not lexical_ok:
            if image is None and vector is None:
                return SearchResult([], und.to_dict() if und else {}, mode)
            mode = "vector"  # a photo alone has no words
        n = candidates(k)
        filt, fcats = None, categories
        if und and und.filters:
            filt = lambda h: und.carries_filters(h.category, h.attributes)  # noqa: E731
            # the filtered side searches only the categories that can hold such an item
            fcats = self._holding(und.filters, categories)

        def both(pred):
            if where is None:
                return pred
            if pred is None:
                return where
            return lambda h: where(h) and pred(h)

        vec_lists, lex_lists = [], []
        if mode != "lexical" or image is not None:
            if vector is None:
                vector = self.encoder.encode_queries([Query(text=text, image=image)])[0]
            xq = np.asarray(vector, np.float32)[None]
            vec_lists.append(vector_hits if vector_hits is not None else
                             self.search_vectors(xq, n, categories, route, exclude, where=where)[0])
        # a photo's words refine the photo ("red" + a picture of shoes): BM25 on such fragments finds
        # other products, so with a photo the lexical side joins only for product codes
        if mode != "vector" and lexical_ok and (image is None or (und is not None and und.codes)):
            lex_lists.append(self._lexical_hits(text, n, categories, exclude, where))
        if filt is not None:
            # hits carrying every filter value rank first; when the candidates hold fewer than k of them,
            # the filtered rankings (widened until they have n hits or run out) add the missing ones
            have = {h.item_id for lst in (*vec_lists, *lex_lists) for h in lst if filt(h)}
            if len(have) < k and fcats:
                if vec_lists:
                    vec_lists.append(self.search_vectors(xq, n, fcats, route, exclude, where=both(filt))[0])
                if lex_lists:
                    lex_lists.append(self._lexical_hits(text, n, fcats, exclude, both(filt)))
        hits = self._fuse(vec_lists, lex_lists, mode, und)
        return SearchResult(hits[:k], und.to_dict() if und else {}, mode)

    def _lexical_hits(self, text, n, categories, exclude, where) -> list[Hit]:
        slugs = self._select(categories)
        total = self._total(slugs)
        kk = n + (len(exclude) if exclude else 0)
        where = remembered(where)
        while True:
            found = self._lexical_top(text, kk if where is None else min(total, kk * 4), slugs)
            hits = [h for *_, h in found if not (exclude and h.item_id in exclude) and (where is None or where(h))]
            if len(hits) >= n or len(found) < kk or kk >= total or where is None:
                return hits[:n]
            kk = min(total, kk * 4)

    def _lexical_top(self, text: str, k: int, slugs: list[str]) -> list[tuple[float, str, int, Hit]]:
        """BM25 top-k over ``slugs``: (score, slug, row, hit), best first (ties by slug, row)."""
        return [(score, slug, row, self._hit(slug, row, score))
                for score, slug, row in self.lexical.search(text, k, slugs)]

    def _fuse(self, vec_lists, lex_lists, mode, und) -> list[Hit]:
        by_id: dict[str, Hit] = {}
        for lst in [*vec_lists, *lex_lists]:
            for h in lst:
                by_id.setdefault(h.item_id, h)
        vec = vec_lists[0] if vec_lists else []
        lex = lex_lists[0] if lex_lists else []
        if mode == "hybrid" and vec and lex:
            if self.fusion == "convex":
                score = convex([(h.item_id, h.score) for h in vec], [(h.item_id, h.score) for h in lex], self.alpha)
            else:
                score = rrf([[h.item_id for h in vec], [h.item_id for h in lex]])
            if und and und.codes:  # a product code: the lexical ranking leads
                lead = rrf([[h.item_id for h in lex]], k=0)
                score = {i: s + lead.get(i, 0.0) for i, s in score.items()}
        else:
            score = {h.item_id: h.score for h in (vec or lex)}
        # the filtered lists only add candidates: with one side they keep that side's own score, fused
        # they rank after every fused candidate (the filter order puts them where they belong)
        floor = min(score.values(), default=0.0) - 1e-6
        for lst in [*vec_lists[1:], *lex_lists[1:]]:
            for h in lst:
                score.setdefault(h.item_id, floor if mode == "hybrid" and vec and lex else h.score)
        ranked = sorted(score, key=lambda i: -score[i])
        if und and (und.filters or und.boosts):
            def key(pair):
                r, i = pair
                h = by_id[i]
                nf, nb = und.matches(h.category, h.attributes)
                return (-nf, -nb, r)

            ranked = [i for _, i in sorted(enumerate(ranked), key=key)]
        out = []
        for i in ranked:
            h = by_id[i]
            out.append(Hit(h.item_id, float(score[i]), h.title, h.category, h.attributes, h.group_id, h.images,
                           h.extra))
        return out

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
        chosen = self.route(xq, slugs, route) if route else None
        total = self._total(slugs)
        kk = k + (len(exclude) if exclude else 0)
        if where is not None:
            kk *= 2
            where = remembered(where)
        out: list[list[Hit] | None] = [None] * len(xq)
        todo = list(range(len(xq)))
        while todo:
            found = self._shortlist_hits(xq[todo], kk, slugs, None if chosen is None else [chosen[q] for q in todo],
                                         params)
            still = []
            for q, per_q in zip(todo, found):
                hits = []
                for hit in per_q:
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

    def route(self, xq: np.ndarray, slugs: list[str], route: int) -> list[set[int]]:
        """Per query the positions (in ``slugs``) of the ``route`` categories whose centroids are nearest."""
        cents = self.centroids[[self.slugs.index(s) for s in slugs]]  # (C, d)
        return [set(row) for row in np.argsort(-(xq @ cents.T), axis=1)[:, :route].tolist()]

    def _shortlist_hits(self, xq: np.ndarray, k: int, slugs: list[str], chosen: list[set[int]] | None,
                        params: IndexParams | None) -> list[list[Hit]]:
        """Per query up to k hits over ``slugs`` (``chosen[q]``: positions in ``slugs``), best first."""
        cats = [self.index.categories[s] for s in slugs]
        return [[self._hit(slugs[c], row, score) for score, c, row in per_q]
                for per_q in multi_search(cats, xq, k, params, chosen)]

    def _total(self, slugs: Sequence[str]) -> int:
        return sum(self.index.categories[s].index.ntotal for s in slugs)

    # ---- helpers -----------------------------------------------------------------------------
    def _select(self, categories: Sequence[str] | None) -> list[str]:
        if not categories:
            return self.slugs
        wanted = [parse_category(c) for c in categories]
        chosen = [s for s in self.slugs if any(self._path(s)[:len(w)] == w for w in wanted)]
        if not chosen:
            known = sorted(" > ".join(self._path(s)) for s in self.slugs)
            raise UnknownItem(f"no indexed category matches {list(categories)}; known: {', '.join(known)}")
        return chosen

    def _path(self, slug: str) -> list[str]:
        return list(self.index.categories[slug].infos["category"])

    def _hit(self, slug: str, row: int, score: float) -> Hit:
        cols = self._columns.get(slug)
        if cols is None:  # the metadata as Python lists, parsed once per category (hits are built by the hundred)
            meta = self.index.categories[slug].meta
            cols = [meta.column(c).to_pylist() for c in
                    ("item_id", "title", "category", "attributes", "group_id", "images", "extra")]
            cols[3] = [json.loads(a or "{}") for a in cols[3]]
            cols[6] = [json.loads(e or "{}") for e in cols[6]]
            self._columns[slug] = cols
        images = cols[5][row]
        return Hit(cols[0][row], score, cols[1][row], cols[2][row], dict(cols[3][row]), cols[4][row],
                   list(images) if images else [], dict(cols[6][row]))

    def _items(self) -> dict[str, tuple[str, int]]:
        """item -> (category, row), and group -> items in ``self._groups``: built once."""
        if self._item_loc is None:
            self._item_loc, self._groups = {}, {}
            for slug, cat in self.index.categories.items():
                ids = cat.meta.column("item_id").to_pylist()
                for row, (iid, g) in enumerate(zip(ids, cat.meta.column("group_id").to_pylist())):
                    self._item_loc[iid] = (slug, row)
                    if g:
                        self._groups.setdefault(g, []).append(iid)
        return self._item_loc

    def _locate(self, item_id: str) -> tuple[str, int]:
        loc = self._items().get(item_id)
        if loc is None:
            raise UnknownItem(f"item {item_id!r} is not in the index {self.index.root}")
        return loc

    def _group_members(self, group: str) -> list[str]:
        self._items()
        return self._groups.get(group, [])
