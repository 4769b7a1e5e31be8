"""Index precomputed embeddings without holding them in RAM: ``moonsearch index CATALOG --vectors V.npy``.

Row i of ``V.npy`` (float32 or float16, (n, d), memory-mapped) is the embedding of catalog row i. Built in
passes that never hold more than one chunk of float vectors:

1. the shared coarse quantizer + PQ codebook is trained on a sample of rows (saved under ``quantizer/``);
2. chunk by chunk, vectors are L2-normalised, encoded (IVF list + PQ code, faiss ``sa_encode``) and their
   float16 copies written into each category's ``vectors.npy``; each finished chunk leaves a marker file, so
   an interrupted build resumes at the first chunk without one;
3. the codes are added to one index per category (``add_sa_codes``: no re-encoding), and every category
   folder and the manifest are written atomically. The work folder ``.build/`` is removed at the end.

Rows with a missing item id, a duplicate item id or a non-finite vector are reported in rejects.jsonl and
skipped. The result is an ordinary moonsearch index folder in the shared layout (index/shared.py); its
encoder is ``vectors:<file name>``, so text and photo queries need an index built by an encoder, while
vector and product-to-product searches work on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moonsearch.data.catalog import Problem, write_rejects
from moonsearch.errors import UserError
from moonsearch.index import faiss_backend as fb
from moonsearch.index.category import META_SCHEMA, CategoryIndex, write_meta
from moonsearch.index.index_set import IndexSet, category_key, new_manifest, slugify
from moonsearch.index.shared import SharedQuantizer
from moonsearch.utils.io import atomic_write_json, swap_in_dir


def _fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha1(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _problems(catalog: pa.Table, vectors: np.ndarray, chunk: int) -> tuple[np.ndarray, list[Problem]]:
    """-> (keep mask, problem records) for missing/duplicate ids and non-finite vectors."""
    n = catalog.num_rows
    keep = np.ones(n, bool)
    problems = []
    ids = catalog.column("item_id")
    missing = np.asarray(pc.is_null(ids).to_numpy(zero_copy_only=False)) | \
        np.asarray(pc.equal(pc.utf8_length(pc.fill_null(ids, "")), 0).to_numpy(zero_copy_only=False))
    for r in np.flatnonzero(missing):
        problems.append(Problem(int(r), None, "item_id", "missing item id"))
    keep &= ~missing
    codes = pc.dictionary_encode(pc.fill_null(ids, "")).combine_chunks().indices.to_numpy()
    first = np.full(codes.max(initial=-1) + 1, -1, np.int64)
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.r_[True, sc[1:] != sc[:-1]]
    dup = order[~starts]
    first[sc[starts]] = order[starts]
    for r in np.sort(dup):
        if keep[r]:
            problems.append(Problem(int(r), ids[int(r)].as_py(), "item_id",
                                    f"duplicate of row {int(first[codes[r]])}"))
            keep[r] = False
    for s in range(0, n, chunk):
        bad = ~np.isfinite(np.asarray(vectors[s:s + chunk], np.float32)).all(1)
        for r in np.flatnonzero(bad) + s:
            if keep[r]:
                problems.append(Problem(int(r), ids[int(r)].as_py(), "vector", "vector has NaN or infinite values"))
                keep[r] = False
    return keep, problems


def build_from_vectors(catalog_path: Path, vectors_path: Path, out: Path, params: fb.IndexParams | None = None,
                       level: int | None = None, chunk: int = 250_000, log: Callable[[str], None] = print,
                       progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Build the index at ``out`` from a catalog and its row-aligned embeddings; see the module docstring."""
    t0 = time.time()
    auto = params is None
    catalog_path, vectors_path, out = Path(catalog_path), Path(vectors_path), Path(out)
    vectors = np.load(vectors_path, mmap_mode="r")
    if vectors.ndim != 2 or vectors.dtype not in (np.float32, np.float16):
        raise UserError(f"{vectors_path}: expected a (rows, dim) float32 or float16 array, got {vectors.dtype} "
                        f"{vectors.shape}")
    cols = [c for c in ("item_id", "title", "category") if c in pq.read_schema(catalog_path).names]
    if "item_id" not in cols:
        raise UserError(f"{catalog_path}: no item_id column")
    table = pq.read_table(catalog_path, columns=cols)
    n, d = vectors.shape
    if table.num_rows != n:
        raise UserError(f"{catalog_path} has {table.num_rows} rows but {vectors_path} has {n} vectors; row i of "
                        "the vectors must be the embedding of catalog row i")
    keep, problems = _problems(table, vectors, chunk)
    rows = np.flatnonzero(keep)
    params = replace(fb.IndexParams(), rerank=fb.auto_rerank(len(rows))) if auto else params
    # category of every row: the path cut to `level`, one slug each
    paths = table.column("category") if "category" in cols else pa.nulls(n, pa.list_(pa.string()))
    joined = pc.binary_join(pc.fill_null(paths, pa.scalar([], pa.list_(pa.string()))), "\x1f")
    enc = pc.dictionary_encode(joined).combine_chunks()
    uniq = [category_key(v.split("\x1f") if v else [], level) for v in enc.dictionary.to_pylist()]
    slug_of = [slugify(p) for p in uniq]
    slugs = sorted(set(slug_of))
    cat_of_value = np.array([slugs.index(s) for s in slug_of], np.int64)
    cat = cat_of_value[enc.indices.to_numpy()]  # (n,) category number per row
    cat_path = {slugs.index(s): p for s, p in zip(slug_of, uniq)}
    counts = np.bincount(cat[rows], minlength=len(slugs))
    within = np.full(n, -1, np.int64)  # a kept row's position inside its category
    for c in range(len(slugs)):
        mine = rows[cat[rows] == c]
        within[mine] = np.arange(len(mine))
    encoder = {"name": f"vectors:{vectors_path.name}", "dim": int(d), "fingerprint": _fingerprint(vectors_path)}
    work = out / ".build"
    state = {"catalog": str(catalog_path.resolve()), "vectors": encoder["fingerprint"], "rows": int(len(rows)),
             "chunk": chunk, "level": level, "params": params.to_dict()}
    if (work / "state.json").exists() and json.loads((work / "state.json").read_text()) != state:
        shutil.rmtree(work)  # a different build was interrupted here: start over
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, work / "state.json")

    # 1. the shared quantizer (kept across resumes)
    shared = SharedQuantizer.load(work)
    if shared is None:
        factory, n_train = SharedQuantizer.plan(len(rows), d, params)
        pick = np.sort(np.random.default_rng(0).choice(rows, min(n_train, len(rows)), replace=False))
        sample = np.asarray(vectors[pick], np.float32)
        faiss.normalize_L2(sample)
        t = time.time()
        shared = SharedQuantizer.train(sample, len(rows), params, log=log)
        shared.save(work)
        log(f"trained {shared.factory} on {len(sample):,} points in {time.time() - t:.1f}s")
    # 2. encode chunk by chunk; float16 vectors go straight into each category's vectors.npy
    staged = {}
    for c in range(len(slugs)):
        if (work / f"done-{c}").exists():  # written to its folder by an interrupted step 3
            continue
        f = work / f"vectors-{c}.npy"
        mode = "r+" if f.exists() else "w+"
        staged[c] = np.lib.format.open_memmap(f, mode=mode, dtype=np.float16, shape=(int(counts[c]), d))
    starts = list(range(0, n, chunk))
    tick = progress(n) if progress else None
    t = time.time()
    assign, checked = None, False  # lists assigned on the GPU where faiss sees one (checked on the first chunk)
    for i, s in enumerate(starts):
        marker = work / f"chunk-{i:05d}.npz"
        e = min(n, s + chunk)
        if marker.exists():
            if tick:
                tick(e - s)
            continue
        sel = rows[(rows >= s) & (rows < e)]
        x = np.ascontiguousarray(vectors[sel], np.float32)
        faiss.normalize_L2(x)
        if not checked:
            assign, checked = fb.coarse_assigner(shared.template, check=x[:2048]), True
        codes = fb.ivf_encode(shared.template, x, assign)
        cs = cat[sel]
        for c in np.unique(cs):
            m = cs == c
            if int(c) in staged:
                staged[int(c)][within[sel[m]]] = x[m].astype(np.float16)
        for mm in staged.values():
            mm.flush()
        tmp = marker.with_suffix(".tmp.npz")
        np.savez(tmp, rows=sel, codes=codes)
        os.replace(tmp, marker)
        if tick:
            tick(e - s)
    encode_s = time.time() - t
    # 3. one index per category from the codes, then the folders
    t = time.time()
    indices = {c: shared.empty() for c in range(len(slugs))}
    for i in range(len(starts)):
        with np.load(work / f"chunk-{i:05d}.npz") as z:
            sel, codes = z["rows"], z["codes"]
        cs = cat[sel]
        for c in np.unique(cs):
            m = cs == c
            indices[int(c)].add_sa_codes(np.ascontiguousarray(codes[m]), fb.faiss_ids(int(c) + 1, within[sel[m]]))
    index_set = IndexSet(out, new_manifest(encoder, level, params.to_dict(), str(catalog_path.resolve())), {},
                         shared)
    shared.save(out)
    shared = index_set.shared = SharedQuantizer.load(out)
    titles = table.column("title") if "title" in cols else pa.nulls(n, pa.string())
    (out / "categories").mkdir(parents=True, exist_ok=True)
    for c, slug in enumerate(slugs):
        if counts[c] == 0:
            continue
        if (work / f"done-{c}").exists():
            index_set.categories[slug] = CategoryIndex.load(out / "categories" / slug, shared=index_set.shared)
            continue
        mine = rows[cat[rows] == c]
        folder = out / "categories" / f".tmp-{slug}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "index.faiss").write_bytes(shared.serialize(indices[c]))
        staged[c].flush()
        del staged[c]
        os.replace(work / f"vectors-{c}.npy", folder / "vectors.npy")
        take = pa.array(mine)
        k = len(mine)
        meta = pa.table({
            "seq": pa.array(np.arange(k), pa.int64()), "item_id": pc.take(table.column("item_id"), take),
            "title": pc.take(titles, take),
            "category": pa.array([cat_path[c]] * k, pa.list_(pa.string())),
            "attributes": pa.array(["{}"] * k), "group_id": pc.take(table.column("item_id"), take),
            "images": pa.array([[]] * k, pa.list_(pa.string())), "extra": pa.array(["{}"] * k)}, schema=META_SCHEMA)
        write_meta(meta, folder)
        vec = np.load(folder / "vectors.npy", mmap_mode="r")
        mean = sum(np.asarray(vec[s:s + chunk], np.float64).sum(0) for s in range(0, k, chunk)) / k
        infos = {"centroid": (mean / max(float(np.linalg.norm(mean)), 1e-12)).round(6).tolist(),
                 "factory": shared.factory, "metric": "inner_product", "count": k, "dim": int(d),
                 "params": params.to_dict(), "encoder": encoder, "category": cat_path[c], "next_seq": k,
                 "faiss_version": faiss.__version__, "code": c + 1, "shared": shared.id,
                 "index_bytes": os.path.getsize(folder / "index.faiss"),
                 "bytes_per_vector": os.path.getsize(folder / "index.faiss") / k}
        atomic_write_json(infos, folder / "index_infos.json")
        os.chmod(folder, 0o755)
        swap_in_dir(folder, out / "categories" / slug)
        indices[c] = None  # free the codes once written
        (work / f"done-{c}").touch()
        index_set.categories[slug] = CategoryIndex.load(out / "categories" / slug, shared=index_set.shared)
    index_set.write_manifest()
    if problems:
        write_rejects(sorted(problems, key=lambda p: p.row), out / "rejects.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    return {"items": int(len(rows)), "skipped": len(problems), "categories": int((counts > 0).sum()),
            "factory": shared.factory, "encode_s": round(encode_s, 1), "assemble_s": round(time.time() - t, 1),
            "total_s": round(time.time() - t0, 1)}
