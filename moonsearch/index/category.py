"""One category's index folder, self-describing::

    index.faiss        the FAISS index (ids = ``(code << 40) | seq``; code 0 before the shared layout)
    vectors.npy        (n, d) float16 embeddings, row i <-> meta row i (rebuilds and exact re-rank)
    meta.arrow         seq, item_id, title, category, attributes (JSON), group_id, images, extra (JSON), an
                       uncompressed Arrow IPC file, memory-mapped on load (folders written before it have
                       meta.parquet, which still loads)
    index_infos.json   factory string, params, metric, count, dim, encoder name and fingerprint, category code,
                       shared quantizer id (index/shared.py) when the set shares one
    lexical.npz        BM25 term frequencies of title, category path and attribute values (index/lexical.py)

A folder is written under a temporary name and swapped in whole, so a crash never leaves a
half-written index that loads. Loaded indices are memory-mapped (IVF lists, vectors, metadata): opening
is instant and RAM holds what queries touch. Appends and deletes work on a private copy read from disk.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moonsearch.index import faiss_backend as fb
from moonsearch.index import lexical as lexmod
from moonsearch.utils.io import RowReader, atomic_write_json, load_npy, swap_in_dir
from moonsearch.errors import UserError

META_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("item_id", pa.string()), ("title", pa.string()), ("category", pa.list_(pa.string())),
    ("attributes", pa.string()), ("group_id", pa.string()), ("images", pa.list_(pa.string())), ("extra", pa.string()),
])


class IndexMismatch(UserError):
    """The index was built by another encoder, or its files disagree."""


class CategoryIndex:
    def __init__(self, path: Path, infos: dict, index: faiss.Index, vectors: np.ndarray, meta: pa.Table,
                 lexical=None, mapped: bool = False):
        self.path, self.infos, self.index, self.vectors, self.meta = path, infos, index, vectors, meta
        self._lexical = lexical
        self._mapped = mapped  # the faiss index is a read-only memory map of index.faiss
        self.shared = None  # the set's SharedQuantizer, when this category's index is a copy of its template
        self._scanner: faiss.Index | None = None  # the stored rows for exact scans (scan())
        self.rows_reader = RowReader(vectors)  # re-rank reads by pread, not through the map (RowReader)
        self.seq = meta.column("seq").to_numpy()
        # seq is sorted and unique; with no deletes yet it is 0..n-1 and an id's low bits are its row (a
        # binary search per candidate over 27 categories' seq arrays missed the cache: 0.05 ms per route)
        self._seq_is_row = len(self.seq) == 0 or (int(self.seq[0]) == 0 and int(self.seq[-1]) == len(self.seq) - 1)
        self.code = int(infos.get("code", 0))
        self.params = fb.IndexParams(**infos["params"])
        self._active = self.params  # the knobs the faiss index is configured with now
        fb.configure(self.index, self.params)

    # ---- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, meta: pa.Table, params: fb.IndexParams, encoder: dict,
              cat_path: list[str], path: Path | None = None, shared=None, code: int = 0) -> "CategoryIndex":
        """Build the index over ``vectors`` (n, d) in memory (``save`` writes it); with ``shared`` (a
        SharedQuantizer) the index is a copy of its template holding these items, ids tagged with ``code``."""
        assert vectors.ndim == 2 and len(vectors) == meta.num_rows, (vectors.shape, meta.num_rows)
        vec16 = np.ascontiguousarray(vectors, dtype=np.float16)
        seq = meta.column("seq").to_numpy()
        t0 = time.time()
        if shared is not None:
            factory = shared.factory
            index = shared.empty()
            index.add_with_ids(vec16.astype(np.float32), fb.faiss_ids(code, seq))
        else:
            factory = fb.choose_factory(len(vec16), vec16.shape[1], params)
            index = fb.build(vec16.astype(np.float32), fb.faiss_ids(code, seq), factory, params)
        infos = {
            "factory": factory, "metric": "inner_product", "count": int(len(vec16)), "dim": int(vec16.shape[1]),
            "params": params.to_dict(), "encoder": encoder, "category": cat_path,
            "build_seconds": round(time.time() - t0, 3),
            "next_seq": int(meta.column("seq").to_numpy().max(initial=-1)) + 1,
            "faiss_version": faiss.__version__, "code": int(code),
        }
        if shared is not None:
            infos["shared"] = shared.id
        built = cls(path, infos, index, vec16, meta)
        built.shared = shared
        return built

    @classmethod
    def write(cls, path: Path, vectors: np.ndarray, meta: pa.Table, params: fb.IndexParams, encoder: dict,
              cat_path: list[str], shared=None, code: int = 0) -> "CategoryIndex":
        """Build and write the folder atomically; returns the loaded (memory-mapped) index."""
        built = cls.build(vectors, meta, params, encoder, cat_path, path, shared, code)
        built.path = path
        return built._rewrite(built.vectors, built.meta)

    @classmethod
    def load(cls, path: Path, mmap: bool = True, shared=None) -> "CategoryIndex":
        infos_path = path / "index_infos.json"
        if not infos_path.exists():
            raise IndexMismatch(f"{path}: no index_infos.json (incomplete or not an index folder)")
        infos = json.loads(infos_path.read_text())
        index = fb.read(path / "index.faiss", mmap=mmap)
        vectors = load_npy(path / "vectors.npy", mmap=mmap)
        meta = read_meta(path, mmap)
        if not (index.ntotal == len(vectors) == meta.num_rows == infos["count"]):
            raise IndexMismatch(f"{path}: index ({index.ntotal}), vectors ({len(vectors)}), metadata "
                                f"({meta.num_rows}) and index_infos.json ({infos['count']}) disagree")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexMismatch(f"{path}: index metric is not inner product")
        lexical = None
        if (path / lexmod.FILE).exists():
            lexical = lexmod.CategoryTerms.load(path / lexmod.FILE)
            if lexical.n != meta.num_rows:
                raise IndexMismatch(f"{path}: {lexmod.FILE} has {lexical.n} rows, the metadata {meta.num_rows}")
        if infos.get("shared"):
            if shared is None or shared.id != infos["shared"]:
                raise IndexMismatch(f"{path}: built on the shared quantizer {infos['shared']}, which the index "
                                    f"set does not have (found {shared.id if shared else 'none'}); rebuild the index")
            shared.attach(index)
        loaded = cls(path, infos, index, vectors, meta, lexical, mapped=mmap)
        loaded.shared = shared if infos.get("shared") else None
        return loaded

    @property
    def lexical(self):
        """The category's BM25 term statistics (built from the metadata for folders older than lexical.npz)."""
        if self._lexical is None:
            self._lexical = lexmod.CategoryTerms.build(lexmod.meta_texts(self.meta))
        return self._lexical

    # ---- changing ----------------------------------------------------------------------------
    def _writable(self) -> faiss.Index:
        """The faiss index, as a private in-memory copy if it is memory-mapped (faiss aborts the process
        on a change to a mapped index)."""
        if self._mapped:
            self.index = fb.read(self.path / "index.faiss", mmap=False)
            if self.shared is not None:
                self.shared.attach(self.index)
            fb.configure(self.index, self._active)
            self._mapped = False
        return self.index

    def append(self, vectors: np.ndarray, meta: pa.Table) -> "CategoryIndex":
        """Add rows without retraining (IVF keeps its quantisers; small indices are rebuilt)."""
        start = self.infos["next_seq"]
        meta = meta.set_column(0, "seq", pa.array(np.arange(start, start + meta.num_rows), pa.int64()))
        all_vec = np.concatenate([np.asarray(self.vectors, np.float16), vectors.astype(np.float16)])
        all_meta = pa.concat_tables([self.meta.cast(META_SCHEMA), meta.cast(META_SCHEMA)])
        if self.infos["factory"].startswith("IVF"):
            self._writable().add_with_ids(np.ascontiguousarray(vectors, np.float32),
                                          fb.faiss_ids(self.code, meta.column("seq").to_numpy()))
            return self._rewrite(all_vec, all_meta)
        return CategoryIndex.write(self.path, all_vec, all_meta, self.params, self.infos["encoder"],
                                   self.infos["category"], code=self.code)

    def delete(self, item_ids: set[str]) -> tuple["CategoryIndex | None", int]:
        """Remove rows whose item_id is in ``item_ids``; returns (new index or None if empty, removed)."""
        ids = self.meta.column("item_id").to_pylist()
        keep = np.array([i not in item_ids for i in ids], bool)
        removed = int((~keep).sum())
        if not removed:
            return self, 0
        if not keep.any():
            shutil.rmtree(self.path)
            return None, removed
        vec = np.asarray(self.vectors, np.float16)[keep]
        meta = self.meta.filter(pa.array(keep))
        if fb.supports_remove(self.index):
            self._writable().remove_ids(np.ascontiguousarray(fb.faiss_ids(self.code, self.seq[~keep])))
            return self._rewrite(vec, meta), removed
        return CategoryIndex.write(self.path, vec, meta, self.params, self.infos["encoder"],
                                   self.infos["category"], code=self.code), removed

    def _rewrite(self, vec16: np.ndarray, meta: pa.Table) -> "CategoryIndex":
        """Write index, vectors, metadata and infos to a new folder and swap it in."""
        blob = self.shared.serialize(self.index) if self.shared is not None else fb.serialize(self.index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        infos = dict(self.infos, count=int(len(vec16)), index_bytes=len(blob),
                     bytes_per_vector=len(blob) / max(1, len(vec16)),
                     next_seq=max(self.infos["next_seq"], int(meta.column("seq").to_numpy().max(initial=-1)) + 1),
                     centroid=_centroid(vec16).round(6).tolist())
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.path.name}-", dir=self.path.parent))
        (tmp / "index.faiss").write_bytes(blob)
        with open(tmp / "vectors.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(vec16, np.float16), allow_pickle=False)
        write_meta(meta, tmp)
        lexmod.CategoryTerms.build(lexmod.meta_texts(meta)).save(tmp / lexmod.FILE)
        atomic_write_json(infos, tmp / "index_infos.json")
        os.chmod(tmp, 0o755)
        self.vectors = None  # release the memory maps before the folder is swapped
        self.rows_reader.close()
        self.meta = None
        swap_in_dir(tmp, self.path)
        loaded = CategoryIndex.load(self.path, shared=self.shared)
        return loaded

    # ---- searching ---------------------------------------------------------------------------
    @property
    def is_pq(self) -> bool:
        return "PQ" in self.infos["factory"]

    def shortlist_size(self, k: int, p: fb.IndexParams) -> int:
        """Candidates to fetch for a final top-k: rerank*k for PQ (its scores are approximate), else k."""
        return k * p.rerank if (self.is_pq and p.rerank > 0) else k

    def approx(self, xq: np.ndarray, n: int, params: fb.IndexParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-n: (scores (nq, n), rows (nq, n)); PQ scores are approximate; rows -1 = none."""
        assert xq.ndim == 2 and xq.shape[1] == self.infos["dim"], (xq.shape, self.infos["dim"])
        p = params or self.params
        if (p.nprobe, p.ef_search) != (self._active.nprobe, self._active.ef_search):
            fb.configure(self.index, p)
            self._active = p
        n = min(n, self.index.ntotal)
        if n == 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        D, I = self.index.search(np.ascontiguousarray(xq, np.float32), n)
        return D, self.rows_of(I)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """faiss ids -> rows of ``meta`` (-1 stays -1)."""
        low = np.maximum(ids, 0) & fb.ID_MASK
        return np.where(ids >= 0, low if self._seq_is_row else np.searchsorted(self.seq, low), -1)

    def scan(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of the stored vectors: (scores (nq, k), rows (nq, k), -1 = none). Meant for small
        categories: the first call keeps the float16 rows in a faiss flat index, whose SIMD inner products
        read half the bytes of a float32 copy (3,700 x 256 rows: 0.09 ms a query against numpy's 0.23)."""
        scanner = self._scanner
        if scanner is None or scanner.ntotal != len(self.vectors):
            vec = np.ascontiguousarray(self.vectors)
            if vec.dtype == np.float16:
                scanner = faiss.IndexScalarQuantizer(vec.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                                     faiss.METRIC_INNER_PRODUCT)
                faiss.copy_array_to_vector(vec.view(np.uint8).ravel(), scanner.codes)
                scanner.ntotal = len(vec)
            else:
                scanner = faiss.IndexFlatIP(vec.shape[1])
                scanner.add(vec.astype(np.float32))
            self._scanner = scanner
        return scanner.search(np.ascontiguousarray(xq, np.float32), max(1, min(k, scanner.ntotal)))

    def exact(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products of one query (d,) with stored rows (m,) -> (m,)."""
        return self.rows_reader.take(rows) @ q.astype(np.float32)

    def search(self, xq: np.ndarray, k: int, params: fb.IndexParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) float32 queries -> (scores (nq, k), rows (nq, k)); rows index ``meta``, -1 = none.
        For PQ indices the rerank*k shortlist is rescored exactly from the stored vectors."""
        p = params or self.params
        D, rows = self.approx(xq, self.shortlist_size(k, p), p)
        if self.is_pq and p.rerank > 0 and rows.size:
            cand = self.rows_reader.take(np.maximum(rows, 0))  # (nq, c, d)
            D = np.einsum("qd,qcd->qc", xq.astype(np.float32), cand)  # exact scores
            D[rows < 0] = -np.inf
            order = np.argsort(-D, axis=1)[:, :k]
            D, rows = np.take_along_axis(D, order, 1), np.take_along_axis(rows, order, 1)
        return D[:, :k].astype(np.float32), rows[:, :k]

    @property
    def centroid(self) -> np.ndarray:
        if "centroid" not in self.infos:  # built in memory, not yet saved
            self.infos["centroid"] = _centroid(self.vectors).tolist()
        return np.asarray(self.infos["centroid"], np.float32)

    def with_params(self, **changes) -> fb.IndexParams:
        return replace(self.params, **changes)


def write_meta(meta: pa.Table, folder: Path) -> None:
    """meta.arrow: an uncompressed Arrow IPC file, so a load maps it instead of decoding it."""
    with pa.OSFile(str(folder / "meta.arrow"), "wb") as f, pa.ipc.new_file(f, META_SCHEMA) as w:
        w.write_table(meta.cast(META_SCHEMA))


def read_meta(folder: Path, mmap: bool = True) -> pa.Table:
    if (folder / "meta.arrow").exists():
        src = pa.memory_map(str(folder / "meta.arrow")) if mmap else pa.OSFile(str(folder / "meta.arrow"))
        return pa.ipc.open_file(src).read_all()
    return pq.read_table(folder / "meta.parquet")  # folders written before meta.arrow


def _centroid(vec16: np.ndarray) -> np.ndarray:
    c = np.asarray(vec16, np.float32).mean(0)
    return c / max(float(np.linalg.norm(c)), 1e-12)
