"""FAISS index construction with a size-based choice of index type (inner product everywhere).

``choose_factory(n, d, params)`` follows autofaiss's ladder: exact ``Flat`` for small sets, ``HNSW``
for mid-size ones, ``IVF{nlist},PQ{m}np`` above ``params.ivfpq_from`` with ``m`` sized from a memory
budget in bytes per vector. ``np`` switches off faiss's polysemous training, which made training 20-25x
slower here for no recall gain. PQ loses recall (~0.66 recall@10 against exact); an exact re-rank of a
``rerank`` x k shortlist from the stored vectors brings it back (~0.98).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class IndexParams:
    flat_below: int = 1000  # exact search below this many vectors
    ivfpq_from: int = 10_000  # IVF-PQ from this many vectors (PQ training wants ~39 x 256 points)
    bytes_per_vector: float | None = None  # PQ code budget; default dim/4 bytes = 1/16 of float32
    nlist: int | None = None  # IVF lists; default ~4 sqrt(n), a power of two
    nprobe: int = 32  # IVF lists visited per query
    hnsw_m: int = 32
    ef_search: int = 128
    rerank: int = 8  # exact re-rank of the best rerank*k candidates from stored vectors (0: off)
    train_size: int = 100_000  # training sample cap (IVF coarse training takes at least 39 points per list)
    # an index set built with at least this many items shares ONE coarse quantizer and PQ codebook across
    # its categories (index/shared.py): an all-category search then costs what one global index costs
    shared_from: int = 20_000
    # a search restricted to shared-layout categories holding fewer items than this in all scans their
    # stored vectors exactly (a small category's items are spread thin over the shared lists)
    exact_scan_below: int = 4096

    def to_dict(self) -> dict:
        return asdict(self)


# faiss ids are (category code << ID_BITS) | seq, so one search over several categories' inverted lists
# tells which category each hit came from (code 0: folders from before the shared layout)
ID_BITS = 40
ID_MASK = (1 << ID_BITS) - 1


def auto_rerank(n: int) -> int:
    """Default re-rank depth for a shared-quantizer set of n items: PQ codes of one global codebook rank
    less well as the set grows (measured recall@10 at 1M: 0.95 with 8, 0.99+ with 16), so the exact re-rank
    reads more candidates from the stored vectors."""
    return 8 if n < 500_000 else 16 if n < 5_000_000 else 32


def faiss_ids(code: int, seq: np.ndarray) -> np.ndarray:
    return (np.int64(code) << ID_BITS) | np.asarray(seq, np.int64)


def read(path, mmap: bool = True) -> faiss.Index:
    """Read an index file; IVF inverted lists are memory-mapped (read-only) with ``mmap``, so opening is
    instant and only the lists a query touches are paged in."""
    if mmap:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path))


def _pow2_at_most(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(1.0, x)))))


def pq_m(d: int, budget: float) -> int:
    """Largest number of 8-bit PQ sub-quantisers within ``budget`` bytes that divides ``d``."""
    for m in range(min(d, int(budget)), 0, -1):
        if d % m == 0 and (d // m) <= 64:
            return m
    return 1


def train_points(factory: str, n: int, p: IndexParams) -> int:
    """Training sample size: the cap, raised to 39 points per IVF list, at most n."""
    nlist = int(factory.split(",")[0][3:]) if factory.startswith("IVF") else 0
    return min(n, max(p.train_size, 39 * nlist))


def choose_factory(n: int, d: int, p: IndexParams) -> str:
    if n < p.flat_below:
        return "IDMap2,Flat"
    if n < p.ivfpq_from:
        return f"IDMap2,HNSW{p.hnsw_m}"
    nlist = p.nlist or min(_pow2_at_most(4 * np.sqrt(n)), max(1, n // 39))
    # d/4 bytes: 4-dim sub-vectors. d/2 trains ~9x slower (88 s vs 10 s for 37k x 256 here) and the
    # exact re-rank recovers the recall either way.
    m = pq_m(d, p.bytes_per_vector if p.bytes_per_vector else d / 4)
    return f"IVF{nlist},PQ{m}np"


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def half_lookup_tables(index: faiss.Index) -> bool:
    """Whether the GPU copy of ``index`` needs float16 lookup tables: an IVF-PQ index does (64 sub-quantisers'
    float32 tables exceed a block's 48 KiB of shared memory, and faiss refuses the copy). They serve searches
    only, so the trained index and its codes are the same; measured on an H200 with faiss-gpu 1.15.1 (train
    + add of 10M on the GPU, copied back: the CPU search of the copy finds 99.5% of the GPU's top 10).
    IVF-Flat keeps float32 storage. (``extract_index_ivf`` hands back the IndexIVF base class, so the check
    goes through ``downcast_index``.)"""
    return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFPQ)


def _to_gpus(index: faiss.Index) -> faiss.Index:
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = half_lookup_tables(index)
    return faiss.index_cpu_to_all_gpus(index, co=co)


def train_on_device(index: faiss.Index, sample: np.ndarray, log=None) -> faiss.Index:
    """Train a fresh IVF index on the GPU when faiss sees one (k-means over 8,192 lists took 30 s on an H200
    where 12 CPU cores took 105 s), else on the CPU; returns the trained CPU index. Where the GPU cannot
    hold the whole index (its PQ kernels take at most 96 sub-quantisers: moon-mini's 1,792-d vectors get
    PQ448), the coarse k-means, the costly part, still runs there (a flat index over the centroids does
    its assignments) and the rest trains on the CPU; ``log`` says so. If the GPU fails, it warns and
    trains on the CPU."""
    if gpu_available():
        try:
            work = _to_gpus(index)
            work.train(sample)
            return faiss.index_gpu_to_cpu(work)
        except RuntimeError as e:
            whole = str(e).strip().splitlines()[-1][:200]
        ivf = faiss.extract_index_ivf(index)
        try:
            assign = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
            ivf.clustering_index = assign
            index.train(sample)
            if log:
                log(f"coarse k-means on the GPU, the rest of the training on the CPU (the GPU cannot hold the "
                    f"whole index: {whole})")
            return index
        except RuntimeError as e:
            warnings.warn(f"training on the GPU failed, training on the CPU instead: {e}", stacklevel=2)
        finally:
            ivf.clustering_index = None
    index.train(sample)
    return index


def coarse_assigner(index: faiss.Index, check: np.ndarray | None = None, gpu: bool = True) -> faiss.Index | None:
    """A flat index over an IVF index's coarse centroids, on the GPU (None where faiss sees none, unless
    ``gpu`` is False): assigning millions of vectors to thousands of lists is the costly part of encoding
    them. ``check`` rows are assigned both ways first; if fewer than 99% land in the same list (float
    rounding may swap near-ties, nothing more), it warns and returns None, and the CPU assigns."""
    if gpu and not gpu_available():
        return None
    ivf = faiss.extract_index_ivf(index)
    try:  # the coarse quantizer is itself a flat index over the centroids: copied to the GPU as it is
        assign = faiss.index_cpu_to_all_gpus(ivf.quantizer) if gpu else ivf.quantizer
        if check is not None and len(check):
            x = np.ascontiguousarray(check, np.float32)
            same = float((assign.search(x, 1)[1].ravel() == ivf.quantizer.assign(x, 1).ravel()).mean())
            if same < 0.99:
                raise RuntimeError(f"only {same:.1%} of {len(x)} check rows got the CPU's list")
        return assign
    except RuntimeError as e:
        warnings.warn(f"assigning lists on the GPU failed, the CPU assigns instead: {e}", stacklevel=2)
        return None


def ivf_encode(index: faiss.Index, x: np.ndarray, assign: faiss.Index | None = None) -> np.ndarray:
    """``index.sa_encode(x)`` (list number + code per row) with the lists chosen by ``assign`` (see
    ``coarse_assigner``) when given; the codes themselves are computed on the CPU either way."""
    x = np.ascontiguousarray(x, np.float32)
    if assign is None:
        return index.sa_encode(x)
    lists = np.ascontiguousarray(assign.search(x, 1)[1].ravel(), np.int64)
    codes = np.empty((len(x), index.sa_code_size()), np.uint8)
    faiss.extract_index_ivf(index).encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(lists),
                                                  faiss.swig_ptr(codes), True)
    return codes


def build(xb: np.ndarray, ids: np.ndarray, factory: str, p: IndexParams, seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product index; asserts the metric after building."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    assert xb.ndim == 2 and len(xb) == len(ids), (xb.shape, ids.shape)
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    work = index
    if gpu_available() and factory.startswith("IVF"):
        try:
            work = _to_gpus(index)
        except RuntimeError as e:  # e.g. more PQ sub-quantisers than the GPU kernels take (1,792-d: PQ448)
            warnings.warn(f"building on the GPU failed, building on the CPU instead: {e}", stacklevel=2)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        m = train_points(factory, len(xb), p)
        sample = xb if len(xb) <= m else xb[np.sort(rng.choice(len(xb), m, replace=False))]
        work.train(sample)
    work.add_with_ids(xb, np.ascontiguousarray(ids, dtype=np.int64))
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT, "index metric is not inner product"
    assert index.ntotal == len(xb)
    return index


def configure(index: faiss.Index, p: IndexParams) -> None:
    """Set query-time knobs (nprobe for IVF, efSearch for HNSW)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(p.nprobe, ivf.nlist)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(p.ef_search, 16)


def supports_remove(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return not isinstance(inner, faiss.IndexHNSW)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
