"""The lexical side of hybrid search: BM25 over title, category path and attribute values.

Each category folder holds ``lexical.npz`` beside its FAISS index, written in the same atomic folder swap
(so ``--append`` and ``delete`` keep the two in step): the category's vocabulary and a sparse matrix of
term frequencies, one row per item in meta order. No pickles (plain numpy arrays).

Scores are Lucene's BM25 (k1 = 1.5, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term part
tf / (tf + k1 * (1 - b + b * len / avglen)), no (k1 + 1) factor, as Lucene 8+ and bm25s) with the
collection statistics (N, df, average length) summed over ALL loaded categories, so a score means the
same in every category and a search over several categories equals one search over their union; the
tests check this against ``bm25s`` (method "lucene") on the union corpus.

Text analysis: Unicode accent folding (NFKD, combining marks dropped), lower case, runs of letters and
digits as tokens, English stop words dropped, Snowball English stemming (PyStemmer).
"""
from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

K1, B = 1.5, 0.75
POSTINGS_CACHE_BYTES = 32 << 20  # weighed postings a LexicalSet keeps (see LexicalSet._postings)
_ENTRY_BYTES = 128  # what one cached entry costs beyond its arrays (a term absent from a category too)
FILE = "lexical.npz"
STOP_WORDS = frozenset("""a an and are as at be but by for from has have in into is it its of on or over
that the this to under was were with without""".split())
_TOKEN = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=1 << 16)  # pure, and called on the same attribute values for every candidate of a filter
def fold(text: str) -> str:
    """Accent- and case-folded text: 'Crème Brûlée' -> 'creme brulee'."""
    if text.isascii():
        return text.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def stem(tokens: Sequence[str]) -> list[str]:
    """Snowball English stems of already folded tokens."""
    return _stemmer().stemWords(list(tokens)) if tokens else []


def words(text: str) -> list[str]:
    """Folded tokens, stop words kept (what query understanding matches on)."""
    return _TOKEN.findall(fold(text or ""))


def analyse(text: str) -> list[str]:
    """The index terms of ``text``: folded, stop words dropped, stemmed."""
    return stem([t for t in words(text) if t not in STOP_WORDS])


def item_text(title: str, category: Sequence[str], attributes: dict, item_id: str = "") -> str:
    """What an item is found by: its id (product codes), title, category path and attribute values."""
    return " ".join([item_id or "", title or "", " ".join(category or []),
                     " ".join(str(v) for v in (attributes or {}).values())])


def meta_texts(meta) -> list[str]:
    titles = meta.column("title").to_pylist()
    cats = meta.column("category").to_pylist()
    attrs = meta.column("attributes").to_pylist()
    ids = meta.column("item_id").to_pylist()
    return [item_text(t, c, json.loads(a or "{}"), i) for t, c, a, i in zip(titles, cats, attrs, ids)]


class CategoryTerms:
    """One category's term-frequency matrix (items x local vocabulary)."""

    def __init__(self, terms: np.ndarray, tf: sp.csr_matrix):
        self.terms = terms
        self.tf = tf
        self.doc_len = np.asarray(tf.sum(axis=1)).ravel().astype(np.float32)
        self.csc = tf.tocsc()
        self.df = np.diff(self.csc.indptr).astype(np.int64)  # documents per term
        self.term_id = {t: i for i, t in enumerate(terms.tolist())}

    @classmethod
    def build(cls, texts: Sequence[str]) -> "CategoryTerms":
        docs = [analyse(t) for t in texts]
        vocab = sorted({t for d in docs for t in d})
        ids = {t: i for i, t in enumerate(vocab)}
        rows, cols = [], []
        for r, d in enumerate(docs):
            for t in d:
                rows.append(r)
                cols.append(ids[t])
        tf = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(docs), len(vocab)))
        tf.sum_duplicates()
        return cls(np.array(vocab, dtype=str) if vocab else np.zeros(0, dtype="<U1"), tf)

    def save(self, path: Path) -> None:
        t = self.tf
        with open(path, "wb") as f:
            np.savez(f, terms=self.terms, indptr=t.indptr, indices=t.indices, data=t.data,
                     shape=np.array(t.shape, np.int64))

    @classmethod
    def load(cls, path: Path) -> "CategoryTerms":
        with np.load(path, allow_pickle=False) as z:
            tf = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
            return cls(z["terms"], tf)

    @property
    def n(self) -> int:
        return self.tf.shape[0]


class LexicalSet:
    """BM25 over several categories with shared collection statistics."""

    def __init__(self, parts: dict[str, CategoryTerms], stats: Iterable[CategoryTerms] | None = None):
        """``stats``: the categories whose collection statistics (document count, mean length, document
        frequencies) BM25 uses; default ``parts``. A search shard searches its own categories with
        every category's statistics, so its scores are those of the whole set."""
        self.parts = parts
        self.n_docs, total_len, df = 0, 0.0, {}
        for p in (parts.values() if stats is None else stats):
            self.n_docs += p.n
            total_len += float(p.doc_len.sum())
            for t, d in zip(p.terms.tolist(), p.df.tolist()):
                df[t] = df.get(t, 0) + d
        self.avgdl = total_len / max(1, self.n_docs)
        self.df = df
        # (slug, term) -> (rows, BM25 weights): a term's weights in a category never change, and a
        # server scores the same few hundred query terms over and over. Least recently used first out,
        # bounded in bytes (a common term of a big category has hundreds of thousands of rows)
        self._cache: OrderedDict[tuple[str, str], tuple | None] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def idf(self, term: str) -> float:
        d = self.df.get(term, 0)
        return float(np.log(1.0 + (self.n_docs - d + 0.5) / (d + 0.5)))

    def _postings(self, slug: str, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        key = (slug, term)
        with self._lock:  # a server's search threads share the set
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        got = self._weights(slug, term)
        size = _ENTRY_BYTES + (0 if got is None else got[0].nbytes + got[1].nbytes)
        if size <= POSTINGS_CACHE_BYTES // 8:  # one posting list never takes more than an eighth
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = got
                    self._cache_bytes += size
                while self._cache_bytes > POSTINGS_CACHE_BYTES:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= _ENTRY_BYTES + (0 if old is None else old[0].nbytes + old[1].nbytes)
        return got

    def _weights(self, slug: str, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        p = self.parts[slug]
        j = p.term_id.get(term)
        if j is None:
            return None
        lo, hi = p.csc.indptr[j], p.csc.indptr[j + 1]
        rows, tf = p.csc.indices[lo:hi], p.csc.data[lo:hi]
        norm = K1 * (1 - B + B * p.doc_len[rows] / max(self.avgdl, 1e-9))
        out = rows.copy(), (self.idf(term) * tf / (tf + norm)).astype(np.float32)
        for a in out:
            a.flags.writeable = False  # shared through the cache
        return out

    def scores(self, slug: str, terms: Sequence[str]) -> np.ndarray:
        """BM25 of every item of category ``slug`` for the analysed query ``terms`` (a term repeated in
        the query counts once per repetition, as in bm25s and Lucene)."""
        out = np.zeros(self.parts[slug].n, np.float32)
        for t in terms:
            got = self._postings(slug, t)
            if got is not None:
                out[got[0]] += got[1]
        return out

    def search(self, query: str, k: int, slugs: Sequence[str] | None = None) -> list[tuple[float, str, int]]:
        """Top-k ``(score, slug, row)`` over the chosen categories (only items that share a term)."""
        terms = analyse(query)
        if not terms or k < 1:
            return []
        found = []
        for slug in slugs if slugs is not None else list(self.parts):
            posts = [got for t in terms if (got := self._postings(slug, t)) is not None]
            if not posts:  # no query term in this category
                continue
            if len(posts) == 1:
                hit, s = posts[0]
            else:
                s = self.scores(slug, terms)
                hit = np.flatnonzero(s > 0)
                s = s[hit]
            if len(hit) > k:
                top = np.argpartition(-s, k - 1)[:k]
                hit, s = hit[top], s[top]
            found += [(float(v), slug, int(r)) for v, r in zip(s.tolist(), hit.tolist())]
        found.sort(key=lambda x: (-x[0], x[1], x[2]))
        return found[:k]
