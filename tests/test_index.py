import json
from dataclasses import replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import structured_vectors
from moonsearch.eval.metrics import ann_recall
from moonsearch.index import faiss_backend as fb
from moonsearch.index.category import CategoryIndex, IndexMismatch
from moonsearch.index.index_set import IndexSet
from moonsearch.indexer.run import IndexJob, run_index
from moonsearch.models.base import create_encoder


def _meta(n, start=0):
    return pa.table({"seq": pa.array(np.arange(start, start + n), pa.int64()),
                     "item_id": [f"i{i}" for i in range(start, start + n)], "title": [""] * n,
                     "category": [["c"]] * n, "attributes": ["{}"] * n, "group_id": [None] * n,
                     "images": [[]] * n, "extra": ["{}"] * n})


def _exact(xb, xq, k):
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(xq, k)[1]


def test_factory_ladder():
    p = fb.IndexParams()
    assert fb.choose_factory(500, 64, p) == "IDMap2,Flat"
    assert fb.choose_factory(5000, 64, p) == "IDMap2,HNSW32"
    assert fb.choose_factory(200_000, 256, p) == "IVF1024,PQ64np"  # 64 bytes = 1/16 of float32
    assert fb.choose_factory(200_000, 256, replace(p, bytes_per_vector=128)) == "IVF1024,PQ128np"


def test_gpu_copies_of_ivfpq_indices_ask_for_half_precision_lookup_tables():
    """Without float16 tables faiss refuses the GPU copy of a 256-d PQ64 index (seen on an H200: the
    streaming build fell back to training on the CPU), so every IVF-PQ recipe moonsearch builds must be
    recognised as one, also as the factory hands it back (IndexIVF base class, IDMap2 around it)."""
    p = fb.IndexParams(flat_below=0, ivfpq_from=0)
    for d in (64, 256, 1792):
        factory = fb.choose_factory(100_000, d, p)
        assert ",PQ" in factory
        assert fb.half_lookup_tables(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)), factory
        assert fb.half_lookup_tables(faiss.index_factory(d, "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT))
    assert not fb.half_lookup_tables(faiss.index_factory(256, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT))


def test_ivfpq_against_exact_oracle_and_rerank(tmp_path):
    xb = structured_vectors(12_000, 32, seed=1)
    xq = structured_vectors(200, 32, seed=2)
    params = fb.IndexParams(nprobe=16)
    ci = CategoryIndex.write(tmp_path / "c", xb, _meta(len(xb)), params, {"fingerprint": "x"}, ["c"])
    assert ci.infos["factory"].startswith("IVF") and "PQ8" in ci.infos["factory"]
    assert ci.index.metric_type == faiss.METRIC_INNER_PRODUCT
    exact = _exact(xb, xq, 10)
    _, rows_raw = ci.search(xq, 10, replace(params, rerank=0))
    _, rows_rr = ci.search(xq, 10, replace(params, rerank=8))
    r_raw, r_rr = ann_recall(rows_raw, exact), ann_recall(rows_rr, exact)
    assert r_rr >= 0.9 and r_rr > r_raw + 0.05, (r_raw, r_rr)
    assert ci.infos["bytes_per_vector"] < xb.shape[1] * 4 / 2
    # reloaded from disk, it answers the same
    again = CategoryIndex.load(tmp_path / "c")
    assert np.array_equal(again.search(xq, 10, replace(params, rerank=8))[1], rows_rr)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's memory maps of ``path`` (/proc/self/smaps)."""
    import re

    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line: range, perms, ..., path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_rerank_reads_stored_rows_without_growing_the_mapped_memory(tmp_path):
    """The exact re-rank reads its candidates' float16 rows with pread: the same numbers as indexing
    the memory map, but the map's pages never become resident in the serving process (at 10M vectors
    reading through the map grew it by 5.6 GB after 1,000 queries)."""
    xb = structured_vectors(40_000, 64, seed=3)
    xq = structured_vectors(300, 64, seed=4)
    ci = CategoryIndex.write(tmp_path / "c", xb, _meta(len(xb)), fb.IndexParams(nprobe=16, rerank=16),
                             {"fingerprint": "x"}, ["c"])
    assert ci.is_pq and isinstance(ci.vectors, np.memmap)
    vec_file = (tmp_path / "c" / "vectors.npy").resolve()
    _, rows = ci.search(xq, 10)
    assert _mapped_rss_kb(vec_file) == 0  # 300 queries x 160 candidates read, nothing mapped in
    assert ann_recall(rows, _exact(xb, xq, 10)) >= 0.9
    pick = np.random.default_rng(0).integers(0, len(xb), (7, 5))
    np.testing.assert_array_equal(ci.rows_reader.take(pick), np.asarray(ci.vectors[pick], np.float32))
    with pytest.raises(IndexError, match="out of range"):
        ci.rows_reader.take(np.array([len(xb)]))
    np.asarray(ci.vectors[np.unique(rows.ravel())], np.float32)  # the old way: through the map
    assert _mapped_rss_kb(vec_file) > 0


def test_rows_widen_from_float16_exactly_in_either_reading_mode(tmp_path):
    """The re-rank widens float16 rows through torch or faiss (15x / 3x numpy's cast): every float16 value,
    infinities, NaN and subnormals included, must come out as numpy's exact widening gives it, read with
    pread or through the map."""
    from moonsearch.utils.io import RowReader, as_float32, widen_faiss, widen_torch

    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 64)
    for widen in (as_float32, widen_torch, widen_faiss):  # faiss's: processes that never load torch
        got = widen(every)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, every.astype(np.float32))  # NaNs compare equal here
    assert widen_faiss(every[:6].reshape(2, 3, 64)).shape == (2, 3, 64)
    np.save(tmp_path / "v.npy", every)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    pick = np.random.default_rng(1).integers(0, len(every), (9, 4))
    by_pread = RowReader(mapped)
    by_map = RowReader(mapped)
    by_map.close()  # without its file descriptor it indexes the map
    for reader in (by_pread, by_map):
        got = reader.take(pick)
        assert got.dtype == np.float32 and got.shape == (9, 4, 64)
        np.testing.assert_array_equal(got, every[pick].astype(np.float32))


@pytest.mark.parametrize("n,factory", [(300, "IDMap2,Flat"), (2500, "IDMap2,HNSW32")])
def test_small_category_fallbacks_are_near_exact(tmp_path, n, factory):
    xb = structured_vectors(n, 24, seed=n)
    ci = CategoryIndex.write(tmp_path / "c", xb, _meta(n), fb.IndexParams(), {"fingerprint": "x"}, ["c"])
    assert ci.infos["factory"] == factory
    xq = xb[:50] + 0.01
    assert ann_recall(ci.search(xq, 10)[1], _exact(xb, xq, 10)) >= 0.97


@pytest.mark.parametrize("n", [300, 2500, 12_000])
def test_append_and_delete(tmp_path, n):
    xb = structured_vectors(n + 100, 32, seed=7)
    ci = CategoryIndex.write(tmp_path / "c", xb[:n], _meta(n), fb.IndexParams(nprobe=64), {"fingerprint": "x"}, ["c"])
    ci = ci.append(xb[n:], _meta(100))
    assert ci.index.ntotal == n + 100 and ci.meta.num_rows == n + 100
    new_ids = ci.meta.column("item_id").to_pylist()[n:]
    _, rows = ci.search(xb[n:n + 5], 1)
    found = [ci.meta.column("item_id")[int(r)].as_py() for r in rows[:, 0]]
    assert found == new_ids[:5]  # appended items are found as their own nearest neighbour
    victims = {found[0], "i0"}
    np.testing.assert_array_equal(ci.rows_of(fb.faiss_ids(ci.code, ci.seq)), np.arange(n + 100))
    ci, removed = ci.delete(victims)
    assert removed == 2 and ci.index.ntotal == n + 98
    _, rows = ci.search(xb[n:n + 1], 5)
    assert victims.isdisjoint(ci.meta.column("item_id")[int(r)].as_py() for r in rows[0] if r >= 0)
    assert CategoryIndex.load(tmp_path / "c").index.ntotal == n + 98
    # after a delete the stored sequence numbers have gaps: every item still maps back to its own row,
    # and a search for each remaining vector finds its own id
    ids = np.concatenate([fb.faiss_ids(ci.code, ci.seq), [-1]])
    np.testing.assert_array_equal(ci.rows_of(ids), np.concatenate([np.arange(n + 98), [-1]]))
    rows_self = ci.search(np.asarray(ci.vectors[:20], np.float32), 1)[1][:, 0]
    assert (rows_self == np.arange(20)).mean() >= 0.95


def test_incomplete_folder_does_not_load(tmp_path):
    ci = CategoryIndex.write(tmp_path / "c", structured_vectors(50, 8), _meta(50), fb.IndexParams(),
                             {"fingerprint": "x"}, ["c"])
    (tmp_path / "c" / "index_infos.json").unlink()
    with pytest.raises(IndexMismatch, match="index_infos.json"):
        CategoryIndex.load(tmp_path / "c")
    assert ci.index.ntotal == 50


def test_index_folder_describes_itself(tiny_index, clip_tiny, world):
    s = IndexSet.load(tiny_index)
    assert s.encoder["name"] == "clip-tiny" and s.encoder["fingerprint"] == clip_tiny.fingerprint
    cats = {tuple(c["path"]) for c in s.manifest["categories"].values()}
    leaf = {tuple(r["category"]) for r in pq.read_table(world / "catalog.parquet").to_pylist()}
    assert cats == leaf and s.count == 120
    one = next(iter(s.categories.values()))
    infos = json.loads((one.path / "index_infos.json").read_text())
    assert {"factory", "params", "metric", "count", "dim", "encoder"} <= set(infos)
    assert infos["metric"] == "inner_product" and infos["encoder"]["name"] == "clip-tiny"


def test_encoder_mismatch_is_a_clear_error(tiny_index, tmp_path):
    from moonsearch.models.clip.openclip import save_tiny_clip
    from moonsearch.search.service import SearchService

    other = create_encoder(f"clip:{save_tiny_clip(tmp_path / 'other', seed=9)}")
    with pytest.raises(IndexMismatch, match="was built with encoder clip-tiny"):
        SearchService(tiny_index, encoder=other)


class CountingEncoder:
    """A real encoder that counts products and can be told to die mid-run (an interrupted job)."""

    def __init__(self, inner, die_after_batches=None):
        self.inner, self.die, self.batches, self.products = inner, die_after_batches, 0, 0
        self.name, self.dim, self.fingerprint = inner.name, inner.dim, inner.fingerprint

    def describe(self):
        return self.inner.describe()

    def encode_products(self, products, batch_size=32):
        if self.die is not None and self.batches >= self.die:
            raise KeyboardInterrupt
        self.batches += 1
        self.products += len(products)
        return self.inner.encode_products(products, batch_size)


def test_resume_after_interruption_and_no_reembedding(world, clip_tiny, tmp_path):
    job = IndexJob(world / "catalog.parquet", tmp_path / "idx", model="clip-tiny", batch_size=16, flush_every=16)
    dying = CountingEncoder(clip_tiny, die_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        run_index(job, encoder=dying)
    assert not (tmp_path / "idx" / "manifest.json").exists()  # no half-built index that loads
    second = CountingEncoder(clip_tiny)
    rep = run_index(job, encoder=second)
    assert rep.cached == 48 and second.products == 120 - 48 and rep.indexed == 120
    third = CountingEncoder(clip_tiny)
    rep = run_index(replace(job, params=fb.IndexParams(nprobe=4)), encoder=third)
    assert third.products == 0 and rep.cached == 120  # other index parameters, nothing re-embedded
    assert IndexSet.load(tmp_path / "idx").count == 120


def test_indexer_append_and_rejects(world, clip_tiny, tmp_path):
    cat = pq.read_table(world / "catalog.parquet")
    first, rest = cat.slice(0, 80), cat.slice(80)
    pq.write_table(first, world / "first.parquet")
    bad = pa.table({"item_id": ["P0000000", "NEW1", "NEW2"], "title": ["dup", "fine", ""],
                    "category": [["x"], ["home", "kitchen", "mugs"], ["x"]],
                    "images": [["images/P0000000_0.jpg"], ["images/nope.jpg"], ["images/nope.jpg"]]})
    extra = pa.concat_tables([rest.select(["item_id", "title", "category", "images"]), bad])
    pq.write_table(extra, world / "extra.parquet")
    out = tmp_path / "idx"
    run_index(IndexJob(world / "first.parquet", out, model="clip-tiny"), encoder=clip_tiny)
    enc = CountingEncoder(clip_tiny)
    rep = run_index(IndexJob(world / "extra.parquet", out, model="clip-tiny", append=True), encoder=enc)
    assert enc.products == 41 and IndexSet.load(out).count == 121
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {(r["item_id"], r["action"]): r["reason"] for r in rejects}
    assert "duplicate" in reasons[("P0000000", "row skipped")]
    assert "missing image file" in reasons[("NEW1", "image skipped")]
    assert "no usable image and no title" in reasons[("NEW2", "row skipped")]
    assert rep.indexed == 41


def test_index_bench_oracle_is_an_independent_brute_force():
    """The bench's exact top-k is a numpy brute force (blocks merged), not the faiss index it measures."""
    from moonsearch.eval.index_bench import exact_top_k

    rng = np.random.default_rng(0)
    xb, xq = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(20, 16)).astype(np.float32)
    top = exact_top_k(xb, xq, 5, block=64)
    assert (top == np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :5]).all()


@pytest.mark.slow
def test_index_bench_measures_the_flat_row(tmp_path):
    """The flat row's recall, build time and memory are measured, not written in as constants."""
    from moonsearch.eval.index_bench import bench_size

    rows = bench_size(3000, 32, tmp_path, log=lambda *a: None)
    flat = next(r for r in rows if r["layout"] == "single flat")
    assert flat["recall10"] >= 0.99 and flat["build_s"] > 0 and 32 * 4 <= flat["bytes_per_vector"] < 32 * 4 + 8
    per_cat = [r for r in rows if r["layout"] == "per-category, own quantizers"]
    shared = [r for r in rows if r["layout"] == "shared quantizer"]
    assert per_cat and shared and all(0 < r["recall10"] <= 1 for r in per_cat + shared)
    assert max(r["recall10"] for r in shared) >= 0.95  # the layout sets of 20k+ items get, measured
    assert all(r["open_s"] < 5 and r["anon_after_queries_mib"] > 0 for r in shared)


def test_search_service_over_ivfpq_categories_matches_exact_search(tmp_path):
    """The path users hit at scale: several IVF-PQ categories searched through SearchService (shortlists
    merged, one global exact re-rank) against brute force over all stored vectors."""
    from moonsearch.index.category import CategoryIndex
    from moonsearch.index.index_set import IndexSet, new_manifest
    from moonsearch.search.service import SearchService

    d, per = 32, 3000
    x = structured_vectors(3 * per, d, seed=3)
    info = {"name": "vectors", "dim": d, "fingerprint": "test"}
    params = replace(fb.IndexParams(), flat_below=0, ivfpq_from=0, nlist=64, nprobe=16, rerank=8)
    root = tmp_path / "idx"
    cats = {}
    for c in range(3):
        ids = [f"c{c}-{i}" for i in range(per)]
        meta = pa.table({"seq": pa.array(np.arange(per), pa.int64()), "item_id": ids, "title": ids,
                         "category": pa.array([["shop", f"cat{c}"]] * per, pa.list_(pa.string())),
                         "attributes": ["{}"] * per, "group_id": pa.array([None] * per, pa.string()),
                         "images": pa.array([[]] * per, pa.list_(pa.string())), "extra": ["{}"] * per})
        cats[f"shop--cat{c}"] = CategoryIndex.write(root / "categories" / f"shop--cat{c}", x[c * per:(c + 1) * per],
                                                    meta, params, info, ["shop", f"cat{c}"])
    IndexSet(root, new_manifest(info, None, params.to_dict(), "vectors"), cats).write_manifest()

    svc = SearchService(root)
    assert all(c.is_pq for c in svc.index.categories.values())
    xq = structured_vectors(200, d, seed=4)
    hits = svc.search_vectors(xq, k=10)
    exact = np.argsort(-(xq @ x.T), axis=1)[:, :10]
    names = np.array([f"c{i // per}-{i % per}" for i in range(len(x))])
    recall = np.mean([len({h.item_id for h in row} & set(names[e])) / 10 for row, e in zip(hits, exact)])
    assert recall >= 0.9, recall
    for row, q in zip(hits[:20], xq[:20]):  # re-ranked scores are exact inner products, best first
        got = np.array([h.score for h in row])
        want = np.array([q @ x[list(names).index(h.item_id)] for h in row])
        assert np.allclose(got, want, atol=1e-3) and (np.diff(got) <= 1e-6).all()
    # without the re-rank the scores are PQ approximations and recall drops: the re-rank is doing work
    rough = svc.search_vectors(xq, k=10, params=replace(params, rerank=0))
    rough_recall = np.mean([len({h.item_id for h in row} & set(names[e])) / 10 for row, e in zip(rough, exact)])
    assert rough_recall < recall
    # split over 2 search shards (moonsearch serve --ray): each shard's shortlist of its own categories,
    # merged by index score and finished by the re-ranked score, gives exactly the hits above
    from moonsearch.index.multi import finish, merge
    from moonsearch.serve.ray_app import ShardCore

    shards = [ShardCore(root, i, 2) for i in range(2)]
    assert sorted(s for sh in shards for s in sh.slugs) == svc.slugs and all(sh.slugs for sh in shards)
    parts = [sh.shortlist(xq, 10, svc.slugs, None, None, 8) for sh in shards]
    for q, row in enumerate(hits):
        merged, top = merge([p[q][0] for p in parts], 10, 8)
        pooled = [h for p in parts for h in p[q][1]]
        by_pos = {(int(c), int(r)): pooled[i] for c, r, i in zip(merged.cat, merged.row, top)}
        assert [by_pos[(c, r)].item_id for _, c, r in finish(merged, 10)] == [h.item_id for h in row]


def test_folders_from_before_the_shared_layout_still_load(tmp_path):
    """A category folder written before meta.arrow and category codes (meta.parquet, ids = seq) loads,
    searches and takes appends as before."""
    xb = structured_vectors(12_000, 32, seed=3)
    ci = CategoryIndex.write(tmp_path / "c", xb, _meta(len(xb)), fb.IndexParams(nprobe=16), {"fingerprint": "x"},
                             ["c"])
    want = ci.search(xb[:20], 5)[1]
    folder = tmp_path / "c"
    pq.write_table(pa.ipc.open_file(pa.memory_map(str(folder / "meta.arrow"))).read_all(), folder / "meta.parquet")
    (folder / "meta.arrow").unlink()
    infos = json.loads((folder / "index_infos.json").read_text())
    del infos["code"]
    (folder / "index_infos.json").write_text(json.dumps(infos))
    old = CategoryIndex.load(folder)
    assert old.code == 0 and np.array_equal(old.search(xb[:20], 5)[1], want)
    grown = old.append(xb[:3] * 0.5 + structured_vectors(3, 32, seed=9) * 0.5, _meta(3))
    assert grown.index.ntotal == len(xb) + 3 and (folder / "meta.arrow").exists()
    assert np.array_equal(grown.search(xb[:20], 5)[1][:, 0], want[:, 0])
