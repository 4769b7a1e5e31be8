"""One coarse quantizer and PQ codebook shared by every category of an index set (the layout of sets built
with at least ``IndexParams.shared_from`` items)::

    quantizer/template.faiss   a trained, empty IVF-PQ index: the coarse centroids and the PQ codebook
    quantizer/infos.json       factory, dimension, training points, id (a hash of template.faiss)

A category's ``index.faiss`` holds an empty stand-in instead of the centroids (``serialize``): on load the
shared quantizer is attached (``attach``), so the centroids are stored and held in RAM once.

Each category's ``index.faiss`` is a copy of the template holding only that category's items, with faiss ids
``(category code << 40) | seq``. Because every category quantises against the same centroids, list ``l`` of
the whole set is the concatenation of list ``l`` of each category: a search over any group of categories is
ONE IVF search whose inverted lists are faiss's ``HStackInvertedLists`` over theirs (no copy; the coarse
search runs once, and exactly the lists a single global index would visit are scanned). Per-category folders
stay what they were: filters, per-category rebuilds, appends and deletes work on one category at a time.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from moonsearch.index import faiss_backend as fb
from moonsearch.utils.io import atomic_write_json, swap_in_dir

FOLDER = "quantizer"
SELECTOR_CACHE_BYTES = 64 << 20  # centroids of shard groups' filled lists kept for probing (SharedQuantizer._selector)
FEW_LISTS = 1 / 8  # a shard's group filling at most this share of the lists probes a flat index of their centroids
OCCUPIED_CACHE_BYTES = 128 << 20  # per category, the centroids of the lists it fills (SharedQuantizer.occupied)
MAX_LISTS = 8192  # more lists: k-means and list assignment cost more than they save on 2 cores (shared_nlist)


def shared_nlist(n: int) -> int:
    """Coarse lists of a shared quantizer for n items: the power of two nearest 8 sqrt(n), at most
    ``MAX_LISTS`` and n / 39 (k-means wants 39 training points per list), twice the 4 sqrt(n) the size
    ladder gives one index: one category fills only the lists near it, and the finer those are,
    the smaller the residuals the one shared PQ codebook encodes. At 1M items (27 categories, 2 cores)
    8,192 lists instead of 2,048 searched all categories in 0.64 ms instead of 1.03-1.16 at recall@10
    0.998 instead of 0.995; the build took 125 s instead of 31 (benchmarks/README, "ANN index")."""
    target = 1 << int(round(np.log2(max(1.0, 8 * np.sqrt(n)))))
    return int(max(1, min(target, MAX_LISTS, n // 39)))


def occupancy(index: faiss.Index) -> np.ndarray:
    """Items per inverted list of an IVF index (reads the lists' sizes, not their codes)."""
    ivf = faiss.extract_index_ivf(index)
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)


class SharedQuantizer:
    def __init__(self, template: faiss.Index, infos: dict, path: Path | None = None):
        self.template, self.infos, self.path = template, infos, path
        self.ivf = faiss.extract_index_ivf(template)
        self._views: OrderedDict[tuple, tuple] = OrderedDict()
        self._sizes: OrderedDict[int, tuple] = OrderedDict()
        self._selectors: OrderedDict[int, tuple] = OrderedDict()
        self._selector_bytes = 0
        self._occupied: OrderedDict[int, tuple] = OrderedDict()
        self._occupied_bytes = 0
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.infos["id"]

    @property
    def factory(self) -> str:
        return self.infos["factory"]

    @staticmethod
    def plan(n_total: int, d: int, params: fb.IndexParams) -> tuple[str, int]:
        """(factory, training points) for a set of ``n_total`` items: the IVF-PQ rung of the size ladder, with
        ``shared_nlist`` lists unless ``params.nlist`` names a number."""
        p = replace(params, flat_below=0, ivfpq_from=0, nlist=params.nlist or shared_nlist(n_total))
        factory = fb.choose_factory(n_total, d, p)
        return factory, fb.train_points(factory, n_total, params)

    @classmethod
    def train(cls, sample: np.ndarray, n_total: int, params: fb.IndexParams, seed: int = 0,
              log=None) -> "SharedQuantizer":
        """Train the template on ``sample`` (rows drawn from the whole set, ``plan``'s size) for ``n_total``
        items (on the GPU where there is one: ``faiss_backend.train_on_device``, which reports to ``log``)."""
        sample = np.ascontiguousarray(sample, np.float32)
        d = sample.shape[1]
        factory, _ = cls.plan(n_total, d, params)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        index = fb.train_on_device(index, sample, log)
        blob = fb.serialize(index)
        infos = {"factory": factory, "dim": d, "metric": "inner_product", "trained_on": int(len(sample)),
                 "for_items": int(n_total), "id": hashlib.sha1(blob).hexdigest()[:16],
                 "faiss_version": faiss.__version__}
        return cls(fb.deserialize(blob), infos)

    def save(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{FOLDER}-", dir=root))
        faiss.write_index(self.template, str(tmp / "template.faiss"))
        atomic_write_json(self.infos, tmp / "infos.json")
        swap_in_dir(tmp, root / FOLDER)
        self.path = root / FOLDER

    @classmethod
    def load(cls, root: Path) -> "SharedQuantizer | None":
        folder = Path(root) / FOLDER
        if not (folder / "infos.json").exists():
            return None
        return cls(faiss.read_index(str(folder / "template.faiss")), json.loads((folder / "infos.json").read_text()),
                   folder)

    def attach(self, index: faiss.Index) -> faiss.Index:
        """Point a category index read from disk at the shared coarse quantizer (its file holds an empty
        stand-in, see ``serialize``)."""
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer = self.ivf.quantizer
        ivf.own_fields = False
        return index

    def serialize(self, index: faiss.Index) -> bytes:
        """A category index's bytes without the coarse centroids (every category shares them): an empty
        flat quantizer stands in, and ``attach`` restores the shared one on load."""
        ivf = faiss.extract_index_ivf(index)
        real, stand_in = ivf.quantizer, faiss.IndexFlatIP(ivf.d)
        ivf.quantizer = stand_in
        try:
            return fb.serialize(index)
        finally:
            ivf.quantizer = real

    def empty(self) -> faiss.Index:
        """A fresh trained, empty copy of the template (a new category's index)."""
        return faiss.clone_index(self.template)

    # ---- searching several categories as one index --------------------------------------------------
    def view(self, indices: Sequence[faiss.Index]):
        """(IVF-PQ index over the concatenated inverted lists of ``indices``, their items per list summed,
        how many lists hold some of them, the sum over ``indices`` of the lists each fills), cached per
        group: a search reads the counts to choose how it finds the group's lists."""
        key = tuple(id(ix) for ix in indices)
        with self._lock:
            hit = self._views.get(key)
            if hit is not None:
                self._views.move_to_end(key)
                return hit[0], hit[1], hit[2], hit[3]
        t = faiss.downcast_index(self.ivf)
        view = faiss.IndexIVFPQ(t.quantizer, t.d, t.nlist, t.pq.M, t.pq.nbits, t.metric_type)
        view.pq = t.pq
        view.by_residual = t.by_residual
        view.is_trained = True
        lists = faiss.InvertedListsPtrVector()
        ivfs = [faiss.extract_index_ivf(ix) for ix in indices]
        for ivf in ivfs:
            lists.push_back(ivf.invlists)
        stacked = faiss.HStackInvertedLists(lists.size(), lists.data())
        view.replace_invlists(stacked, False)
        view.ntotal = sum(ix.ntotal for ix in indices)
        sizes = sum(self.list_sizes(ix) for ix in indices)
        held = int(np.count_nonzero(sizes))
        filled = sum(int(np.count_nonzero(self.list_sizes(ix))) for ix in indices)
        with self._lock:  # the entry keeps the category indices (and so their lists) alive with the view
            self._views[key] = (view, sizes, held, filled, stacked, lists, list(indices), ivfs)
            while len(self._views) > 256:
                self._views.popitem(last=False)
        return view, sizes, held, filled

    def list_sizes(self, index: faiss.Index) -> np.ndarray:
        """Items per inverted list of one category index (cached per index object)."""
        key = id(index)
        with self._lock:
            hit = self._sizes.get(key)
        if hit is not None and hit[0] is index:
            return hit[1]
        sizes = occupancy(index)
        sizes.flags.writeable = False
        with self._lock:
            self._sizes[key] = (index, sizes)
            while len(self._sizes) > 4096:
                self._sizes.popitem(last=False)
        return sizes

    def occupied(self, index: faiss.Index) -> tuple[np.ndarray, faiss.Index]:
        """(ids of the lists that one category index fills, a flat index of just their centroids), cached per
        index object, at most ``OCCUPIED_CACHE_BYTES`` of centroids. A category fills a few hundred of the
        thousands of shared lists: searching its own centroids is what its own quantizer used to cost."""
        key = id(index)
        with self._lock:
            hit = self._occupied.get(key)
            if hit is not None and hit[0] is index:
                self._occupied.move_to_end(key)
                return hit[1], hit[2]
        lists = np.flatnonzero(self.list_sizes(index) > 0).astype(np.int64)
        sub = faiss.IndexFlat(self.ivf.d, self.ivf.quantizer.metric_type)
        if len(lists):
            sub.add(self.ivf.quantizer.reconstruct_batch(lists))
        nbytes = len(lists) * self.ivf.d * 4
        with self._lock:  # the entry holds the index, so its id is not reused while cached
            old = self._occupied.pop(key, None)
            self._occupied_bytes -= old[3] if old is not None else 0
            self._occupied[key] = (index, lists, sub, nbytes)
            self._occupied_bytes += nbytes
            while self._occupied_bytes > OCCUPIED_CACHE_BYTES and len(self._occupied) > 1:
                self._occupied_bytes -= self._occupied.popitem(last=False)[1][3]
        return lists, sub

    def probe_lists(self, indices: Sequence[faiss.Index], xq: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, list ids) of the ``probes`` nearest lists that ``indices`` fill, per query (-1 where they
        fill fewer): each category's filled lists searched apart, then merged. A list filled by several
        categories scores the same in each (one centroid), so it is kept once. The same lists as the whole
        quantizer searched behind a selector of the group's lists, without building anything per group (a
        route to 3 of 27 categories has 2,925 possible groups)."""
        Ds, Ls = [], []
        for ix in indices:
            lists, sub = self.occupied(ix)
            if not len(lists):
                continue
            D, I = sub.search(xq, min(probes, len(lists)))
            Ds.append(D)
            Ls.append(np.where(I >= 0, lists[np.maximum(I, 0)], -1))
        if not Ds:
            return np.full((len(xq), probes), -np.inf, np.float32), np.full((len(xq), probes), -1, np.int64)
        D, L = np.concatenate(Ds, 1), np.concatenate(Ls, 1)
        if len(Ds) > 1:  # best first, a repeated list right after its first copy; repeats (and -1s) moved last
            order = np.lexsort((L, -D), axis=1)
            D, L = np.take_along_axis(D, order, 1), np.take_along_axis(L, order, 1)
            repeat = np.zeros(L.shape, bool)
            repeat[:, 1:] = L[:, 1:] == L[:, :-1]
            repeat |= L < 0
            keep = np.argsort(repeat, axis=1, kind="stable")
            D, L, repeat = (np.take_along_axis(a, keep, 1) for a in (D, L, repeat))
            D, L = np.where(repeat, -np.inf, D), np.where(repeat, -1, L)
        D, L = D[:, :probes], L[:, :probes]
        if L.shape[1] < probes:
            pad = probes - L.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            L = np.pad(L, ((0, 0), (0, pad)), constant_values=-1)
        return np.ascontiguousarray(D, np.float32), np.ascontiguousarray(L, np.int64)

    def _selector(self, sizes: np.ndarray):
        """For a group's items per list (a search shard's, or a group filling most lists): None when every
        list holds some, else (ids of the lists holding items, a faiss selector of them, and, when they are
        at most ``FEW_LISTS`` of all lists, a flat index of just their centroids). Cached per array (a
        shard's arrays live long), at most ``SELECTOR_CACHE_BYTES`` of centroids."""
        key = id(sizes)
        with self._lock:
            hit = self._selectors.get(key)
            if hit is not None and hit[0] is sizes:
                self._selectors.move_to_end(key)
                return hit[1]
        held = sizes > 0
        found, nbytes = None, 0
        if not held.all():
            nonempty = np.flatnonzero(held).astype(np.int64)
            sub = None
            if len(nonempty) <= FEW_LISTS * len(sizes):
                sub = faiss.IndexFlat(self.ivf.d, self.ivf.quantizer.metric_type)
                sub.add(self.ivf.quantizer.reconstruct_batch(nonempty))
                nbytes = len(nonempty) * self.ivf.d * 4
            found = (nonempty, faiss.IDSelectorBatch(nonempty), sub)
        with self._lock:  # the entry holds the array, so its id is not reused while cached
            old = self._selectors.pop(key, None)
            self._selector_bytes -= old[2] if old is not None else 0
            self._selectors[key] = (sizes, found, nbytes)
            self._selector_bytes += nbytes
            while len(self._selectors) > 4096 or (self._selector_bytes > SELECTOR_CACHE_BYTES and len(self._selectors) > 1):
                self._selector_bytes -= self._selectors.popitem(last=False)[1][2]
        return found

    def search(self, indices: Sequence[faiss.Index], xq: np.ndarray, n: int, nprobe: int, share: float = 1.0,
               sizes: np.ndarray | None = None):
        """-> (scores (nq, n) approximate, faiss ids (nq, n), -1 = none).

        ``share`` is the group's fraction of the set's items. A group probes ``nprobe * sqrt(share)`` lists
        (at least 2): a category's own IVF of ~4 sqrt(n_c) lists probed ``nprobe`` times scans that fraction
        of it, so a routed search costs what the per-category layout's did. And a group probes only lists
        that hold its items: a filter to a category far from the query still finds that category's
        nearest items.

        ``sizes``: the group's items per list on ALL search shards (a shard holds only some of the group's
        categories, ``indices``). The lists probed are then the ones a single process would probe, and each
        shard scans its part of them: the merged shortlist is the single process's."""
        view, local, held, filled = self.view(indices)
        n = min(n, max(1, view.ntotal))
        probes = min(view.nlist, max(2, int(np.ceil(nprobe * np.sqrt(min(1.0, share))))))
        xq = np.ascontiguousarray(xq, np.float32)
        if sizes is None and held == view.nlist:
            return view.search(xq, n, params=faiss.SearchParametersIVF(nprobe=probes))
        # the group's nearest filled lists: in one process, through each category's own filled centroids;
        # on a search shard (``sizes`` of the whole group) or for a group filling most lists, through the
        # quantizer behind a selector of the filled lists (or a flat index of them, when few)
        if sizes is None and filled <= view.nlist:
            Dq, Iq = self.probe_lists(indices, xq, probes)
        else:
            chosen = self._selector(local if sizes is None else sizes)
            if chosen is None:
                return view.search(xq, n, params=faiss.SearchParametersIVF(nprobe=probes))
            nonempty, sel, sub = chosen
            probes = min(probes, len(nonempty))
            if sub is not None:
                Dq, Iq = sub.search(xq, probes)
                Iq = np.where(Iq >= 0, nonempty[np.maximum(Iq, 0)], -1)
            else:
                Dq, Iq = self.ivf.quantizer.search(xq, probes, params=faiss.SearchParameters(sel=sel))
        if len(indices) == 1:  # one category: its own index, no stacked view
            view = faiss.extract_index_ivf(indices[0])
        D = np.empty((len(xq), n), np.float32)
        I = np.empty((len(xq), n), np.int64)
        params = faiss.SearchParametersIVF(nprobe=probes)  # per call: the view is shared between threads
        view.search_preassigned_c(len(xq), faiss.swig_ptr(xq), n, faiss.swig_ptr(np.ascontiguousarray(Iq)),
                                  faiss.swig_ptr(np.ascontiguousarray(Dq)), faiss.swig_ptr(D), faiss.swig_ptr(I),
                                  False, params)
        return D, I
