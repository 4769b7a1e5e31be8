"""The shared-quantizer layout (index/shared.py) against an exact oracle: unrouted, routed and filtered
searches, appends and deletes, memory-mapped loading, the streaming builder's resume and bad rows, and the
indexer choosing the layout for large sets."""
import json
import types
import warnings
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moonsearch.data.synthetic import generate_vectors
from moonsearch.eval.metrics import ann_recall
from moonsearch.index import faiss_backend as fb
from moonsearch.index.category import IndexMismatch
from moonsearch.index.index_set import IndexSet
from moonsearch.index.multi import multi_search
from moonsearch.index.stream import build_from_vectors


def _exact(xb, xq, k, allowed=None):
    sc = xq.astype(np.float64) @ np.asarray(xb, np.float64).T
    if allowed is not None:
        sc[:, ~allowed] = -np.inf
    return np.argsort(-sc, axis=1, kind="stable")[:, :k]


def _ids(found, cats):
    rows = [np.array([int(x[1:]) for x in c.meta.column("item_id").to_pylist()]) for c in cats]
    out = np.full((len(found), 10), -1)
    for i, hits in enumerate(found):
        for j, (_, c, r) in enumerate(hits):
            out[i, j] = rows[c][r]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    generate_vectors(folder, 6000, dim=64, n_queries=60)
    return folder


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "index"
    rep = build_from_vectors(world / "catalog.parquet", world / "vectors.npy", out, chunk=1000, log=lambda m: None)
    return out, rep


def test_unrouted_routed_and_filtered_search_match_exact(world, built):
    out, rep = built
    xb, xq = np.load(world / "vectors.npy"), np.load(world / "queries.npy")
    iset = IndexSet.load(out)
    assert (out / "quantizer" / "template.faiss").exists() and iset.manifest["shared"]["id"] == iset.shared.id
    slugs = sorted(iset.categories)
    cats = [iset.categories[s] for s in slugs]
    assert all(c.shared is iset.shared and c._mapped for c in cats)  # memory-mapped, one quantizer
    assert sum(c.index.ntotal for c in cats) == 6000 == rep["items"]
    assert len({c.code for c in cats}) == len(cats)
    assert all(len(c.infos["centroid"]) == 64 for c in cats)  # routing needs no scan of the vectors
    # all categories, unrouted: one stacked search
    assert ann_recall(_ids(multi_search(cats, xq, 10), cats), _exact(xb, xq, 10)) >= 0.95
    # the stacked view returns what one global index over the same codes returns (raw PQ, no re-rank)
    no_rr = replace(cats[0].params, rerank=0)
    glob = iset.shared.empty()
    for c in cats:  # the same codes, merged into one index
        glob.merge_from(iset.shared.attach(fb.read(c.path / "index.faiss", mmap=False)), 0)
    assert glob.ntotal == 6000
    D, I = glob.search(xq, 10, params=__import__("faiss").SearchParametersIVF(nprobe=no_rr.nprobe))
    found = multi_search(cats, xq, 10, no_rr)
    for q in range(len(xq)):
        ours = [fb.faiss_ids(cats[c].code, cats[c].seq[r]) for _, c, r in found[q]]
        assert set(ours) == set(I[q][I[q] >= 0].tolist())
    # routed to three categories: nothing from elsewhere, and the exact answer inside them
    leaf = np.array([c[-1] for c in pq.read_table(world / "catalog.parquet").column("category").to_pylist()])
    want = [0, 5, 9]
    allowed = np.isin(leaf, [cats[c].infos["category"][-1] for c in want])
    got = _ids(multi_search(cats, xq, 10, chosen=[set(want)] * len(xq)), cats)
    assert allowed[got[got >= 0]].all()
    assert ann_recall(got, _exact(xb, xq, 10, allowed)) >= 0.95
    # a filter to one small category is scanned exactly: the exact answer over the stored (float16)
    # vectors, in order
    one = np.isin(leaf, [cats[3].infos["category"][-1]])
    got = _ids(multi_search(cats, xq, 10, chosen=[{3}] * len(xq)), cats)
    assert np.array_equal(got, _exact(xb.astype(np.float16), xq, 10, one))
    # the same filter through the stacked lists (no exact scan): most queries lie in other categories, far
    # from this one's items, and still find its nearest items (only lists holding them are probed)
    stacked = replace(cats[0].params, exact_scan_below=0)
    got = _ids(multi_search(cats, xq, 10, stacked, chosen=[{3}] * len(xq)), cats)
    assert one[got[got >= 0]].all()
    assert ann_recall(got, _exact(xb, xq, 10, one)) >= 0.9


def test_the_rerank_reads_rows_through_the_map_for_small_sets_and_with_pread_for_large(world, built, monkeypatch):
    """Below MAP_RERANK_BELOW bytes of stored vectors a process re-ranks through the memory maps (faster:
    no system call per row); above, with pread (10M vectors never become its memory). Same answers."""
    import moonsearch.index.index_set as index_set

    out, _ = built
    xq = np.load(world / "queries.npy")
    small = IndexSet.load(out)
    monkeypatch.setattr(index_set, "MAP_RERANK_BELOW", 0)
    large = IndexSet.load(out)
    mapped = [small.categories[s] for s in sorted(small.categories)]
    preads = [large.categories[s] for s in sorted(large.categories)]
    assert all(c.rows_reader._fd is None for c in mapped) and all(c.rows_reader._fd is not None for c in preads)
    assert any(c.is_pq for c in preads)  # the re-rank runs
    assert multi_search(mapped, xq, 10) == multi_search(preads, xq, 10)


def test_probing_each_categorys_own_centroids_equals_the_selector_search(world, built, monkeypatch):
    """A group's nearest lists are found by searching each member category's filled lists apart and merging
    (nothing built per group), by a flat index of the group's filled lists (a shard, few lists) or by the
    whole quantizer behind a selector of them: the same lists with the same scores, so the same hits, for
    one category and for four."""
    import faiss

    import moonsearch.index.shared as shared_mod

    out, _ = built
    xq = np.load(world / "queries.npy")
    iset = IndexSet.load(out)
    sq = iset.shared
    cats = [iset.categories[s] for s in sorted(iset.categories)]
    # this world's categories fill disjoint lists; a category listed twice fills every list twice (the
    # merge keeps each list once, as for two categories sharing one)
    once, twice = (sq.probe_lists([cats[2].index] * k, xq, 6) for k in (1, 2))
    assert np.array_equal(once[1], twice[1]) and np.array_equal(once[0], twice[0])
    for group in ([0], [3], [1, 5, 9, 20]):
        indices = [cats[c].index for c in group]
        _, sizes, _, _ = sq.view(indices)
        filled = np.flatnonzero(sizes > 0)
        assert 0 < len(filled) < sq.ivf.nlist  # the group leaves lists empty: a selector matters
        for probes in (3, 8, len(filled) + 5):  # more probes than filled lists: the rest is -1
            D, L = sq.probe_lists(indices, xq, probes)
            Dr, Lr = sq.ivf.quantizer.search(xq, min(probes, len(filled)),
                                             params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(filled)))
            assert np.array_equal(L[:, :Lr.shape[1]], Lr) and np.array_equal(D[:, :Dr.shape[1]], Dr)
            assert (L[:, Lr.shape[1]:] == -1).all()
            assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in L)  # no list twice
        for nprobe in (8, 10 * len(filled)):  # few lists, and more than the group fills (-1 keys skipped)
            answers = []
            for few in (0.0, 1.0):  # a shard's ways: the quantizer behind a selector / the group's centroids
                monkeypatch.setattr(shared_mod, "FEW_LISTS", few)
                sq._selectors.clear()
                answers.append(sq.search(indices, xq, 40, nprobe, share=0.1, sizes=sizes))
            answers.append(sq.search(indices, xq, 40, nprobe, share=0.1))  # this process: each category's own
            for D, I in answers[1:]:
                assert np.array_equal(I, answers[0][1]) and np.allclose(D, answers[0][0], atol=1e-6)


def test_search_shards_return_what_one_process_returns(world, built):
    """moonsearch serve --ray: the categories dealt to 2 and 3 shards, each shard's shortlist merged by the
    router, give the single process's top-10, unrouted and routed, with the stacked lists forced on
    (no exact scan of small groups: the probe choice is what a shard could get wrong) and few lists
    probed (nprobe 8), where a shard probing its own categories' nearest lists would differ."""
    from moonsearch.index.multi import finish, merge, shortlists
    from moonsearch.search.service import SearchService
    from moonsearch.serve.ray_app import ShardCore

    out, _ = built
    xq = np.load(world / "queries.npy")
    svc = SearchService(out)
    cats = [svc.index.categories[s] for s in svc.slugs]
    stacked = replace(next(iter(svc.index.categories.values())).params, exact_scan_below=0, nprobe=8)
    for n in (2, 3):
        shards = [ShardCore(out, i, n) for i in range(n)]
        for route in (None, 2, 4):
            want = svc.search_vectors(xq, 10, route=route, params=stacked)
            chosen = svc.route(xq, svc.slugs, route) if route else None
            one, _ = shortlists(cats, xq, 10, stacked, chosen)
            parts = [sh.shortlist(xq, 10, svc.slugs, chosen, stacked, stacked.rerank) for sh in shards]
            for q, row in enumerate(want):
                merged, top = merge([p[q][0] for p in parts], 10, stacked.rerank)
                # the whole shortlist, not only its top 10: every shard probed the lists one process probes
                assert set(zip(merged.cat.tolist(), merged.row.tolist())) == \
                    set(zip(one[q].cat.tolist(), one[q].row.tolist())), (n, route, q)
                pooled = [h for p in parts for h in p[q][1]]
                by_pos = {(int(c), int(r)): pooled[i] for c, r, i in zip(merged.cat, merged.row, top)}
                assert [by_pos[(c, r)].item_id for _, c, r in finish(merged, 10)] == [h.item_id for h in row]


def test_append_and_delete_keep_the_shared_layout(world, built, tmp_path):
    import shutil

    out, _ = built
    mine = tmp_path / "index"
    shutil.copytree(out, mine)
    iset = IndexSet.load(mine)
    slug = sorted(iset.categories)[2]
    cat = iset.categories[slug]
    rng = np.random.default_rng(1)
    new = rng.normal(size=(5, 64)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    meta = pa.table({"seq": pa.array(np.zeros(5), pa.int64()), "item_id": [f"N{i}" for i in range(5)],
                     "title": ["new"] * 5, "category": [cat.infos["category"]] * 5, "attributes": ["{}"] * 5,
                     "group_id": [f"N{i}" for i in range(5)], "images": [[]] * 5, "extra": ["{}"] * 5})
    iset.categories[slug] = cat.append(new, meta)  # a memory-mapped index: appended on a private copy
    iset.write_manifest()
    again = IndexSet.load(mine)
    cats = [again.categories[s] for s in sorted(again.categories)]
    for i, hits in enumerate(multi_search(cats, new, 1)):
        _, c, r = hits[0]
        assert cats[c].meta.column("item_id")[r].as_py() == f"N{i}"
    assert again.delete({"N0", "N3"}) == 2
    cats = [again.categories[s] for s in sorted(again.categories)]
    ids = {cats[c].meta.column("item_id")[r].as_py() for hits in multi_search(cats, new, 3) for _, c, r in hits}
    assert {"N1", "N2", "N4"} <= ids and not ids & {"N0", "N3"}
    assert IndexSet.load(mine).count == 6000 + 3


def test_category_from_another_quantizer_is_refused(built, tmp_path):
    import shutil

    out, _ = built
    mine = tmp_path / "index"
    shutil.copytree(out, mine)
    infos = json.loads((mine / "manifest.json").read_text())
    infos["shared"]["id"] = "0000000000000000"
    (mine / "manifest.json").write_text(json.dumps(infos))
    with pytest.raises(IndexMismatch, match="rebuild"):
        IndexSet.load(mine)


def test_streaming_build_resumes_and_reports_bad_rows(world, built, tmp_path):
    cat = pq.read_table(world / "catalog.parquet")
    vec = np.load(world / "vectors.npy")
    ids = cat.column("item_id").to_pylist()
    ids[7] = ids[3]  # a duplicate id
    vec[11, 0] = np.nan  # a broken vector
    pq.write_table(cat.set_column(0, "item_id", pa.array(ids)), tmp_path / "catalog.parquet")
    np.save(tmp_path / "vectors.npy", vec)
    out = tmp_path / "index"
    calls = []

    def progress(total):
        def tick(n):
            calls.append(n)
            if len(calls) == 3:
                raise KeyboardInterrupt  # interrupted after two chunks were encoded
        return tick

    with pytest.raises(KeyboardInterrupt):
        build_from_vectors(tmp_path / "catalog.parquet", tmp_path / "vectors.npy", out, chunk=1000,
                           log=lambda m: None, progress=progress)
    assert len(list((out / ".build").glob("chunk-*.npz"))) == 3
    calls.clear()
    rep = build_from_vectors(tmp_path / "catalog.parquet", tmp_path / "vectors.npy", out, chunk=1000,
                             log=lambda m: None)
    assert rep["items"] == 5998 and rep["skipped"] == 2 and not (out / ".build").exists()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert {(r["row"], r["field"]) for r in rejects} == {(7, "item_id"), (11, "vector")}
    assert "duplicate of row 3" in rejects[0]["reason"] or "duplicate of row 3" in rejects[1]["reason"]
    # the resumed build answers like the uninterrupted one
    a, b = IndexSet.load(out), IndexSet.load(built[0])
    xq = np.load(world / "queries.npy")
    ca = [a.categories[s] for s in sorted(a.categories)]
    cb = [b.categories[s] for s in sorted(b.categories)]
    ra, rb = _ids(multi_search(ca, xq, 10), ca), _ids(multi_search(cb, xq, 10), cb)
    assert (ra == rb).mean() > 0.98  # equal except where rows 7 and 11 were answers


def test_indexer_uses_the_shared_layout_for_large_sets(tmp_path, clip_tiny):
    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.search.service import SearchService

    words = ["red", "blue", "green", "black", "white", "grey", "pink", "brown"]
    things = ["sneaker", "boot", "sandal", "jacket", "shirt", "scarf"]
    rows = [{"item_id": f"I{i}", "title": f"{words[i % 8]} {things[i % 6]} model {i}",
             "category": ["apparel", things[i % 6] + "s"], "images": []} for i in range(1200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "catalog.parquet")
    params = fb.IndexParams(shared_from=1000)
    run_index(IndexJob(tmp_path / "catalog.parquet", tmp_path / "index", model="clip-tiny", params=params),
              encoder=clip_tiny)
    iset = IndexSet.load(tmp_path / "index")
    assert iset.shared is not None and all(c.shared is iset.shared for c in iset.categories.values())
    svc = SearchService(tmp_path / "index", encoder=clip_tiny)
    hits = [h.item_id for h in svc.search("blue boot model 1", k=5, mode="vector").hits]
    q = clip_tiny.encode_queries([__import__("moonsearch.models.base", fromlist=["Query"]).Query("blue boot model 1")])[0]
    everything = [(float(np.asarray(c.vectors[r], np.float32) @ q), c.meta.column("item_id")[r].as_py())
                  for c in iset.categories.values() for r in range(c.index.ntotal)]
    exact = [i for _, i in sorted(everything, reverse=True)[:5]]
    assert len(set(hits) & set(exact)) >= 4, (hits, exact)
    assert svc.search("blue boot model 1", k=1, mode="lexical").hits[0].item_id == "I1"
    more = [{"item_id": "X1", "title": "orange umbrella deluxe", "category": ["apparel", "boots"], "images": []}]
    pq.write_table(pa.Table.from_pylist(more), tmp_path / "more.parquet")
    run_index(IndexJob(tmp_path / "more.parquet", tmp_path / "index", append=True), encoder=clip_tiny)
    svc = SearchService(tmp_path / "index", encoder=clip_tiny)
    assert svc.search("orange umbrella deluxe", k=3, mode="lexical").hits[0].item_id == "X1"
    assert "X1" in [h.item_id for h in svc.search("orange umbrella deluxe", k=10, mode="vector").hits]


def test_lists_assigned_outside_the_index_give_sa_encodes_codes(world, built, monkeypatch):
    """The streaming build assigns coarse lists with a flat index over the centroids, on the GPU where faiss
    sees one (this machine has none: a CPU flat index stands in for the GPU copy). Its codes must be
    sa_encode's byte for byte, the build must answer as before, and an assigner that disagrees with the CPU
    is dropped with a warning instead of writing wrong lists."""
    import faiss

    out, _ = built
    template = IndexSet.load(out).shared.template
    x = np.array(np.load(world / "vectors.npy", mmap_mode="r")[:3000], np.float32)  # a copy: normalised in place
    faiss.normalize_L2(x)
    flat = fb.coarse_assigner(template, check=x, gpu=False)
    assert flat is not None and flat.ntotal == faiss.extract_index_ivf(template).nlist
    assert np.array_equal(fb.ivf_encode(template, x, flat), template.sa_encode(x))

    # the GPU control flow with CPU stand-ins: the "GPU copy" is the index itself, trained and assigning
    monkeypatch.setattr(fb, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: types.SimpleNamespace(), raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, co=None: index)
    again = out.parent / "again"
    build_from_vectors(world / "catalog.parquet", world / "vectors.npy", again, chunk=1000, log=lambda m: None)
    xq = np.load(world / "queries.npy")[:20].astype(np.float32)
    hits = []
    for folder in (out, again):
        iset = IndexSet.load(folder)
        cats = [iset.categories[s] for s in sorted(iset.categories)]
        hits.append(_ids(multi_search(cats, xq, 10), cats))
    assert np.array_equal(hits[0], hits[1])

    def shuffled(index, co=None):  # a copy whose lists are numbered differently
        bad = faiss.IndexFlat(index.d, index.metric_type)
        bad.add(index.reconstruct_n(0, index.ntotal)[::-1].copy())
        return bad

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", shuffled)
    with pytest.warns(UserWarning, match="the CPU assigns instead"):
        assert fb.coarse_assigner(template, check=x) is None

    def broken(index, co=None):
        raise RuntimeError("CUDA error 209 no kernel image is available for execution on the device")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", broken)
    fresh = faiss.index_factory(x.shape[1], "IVF16,PQ8np", faiss.METRIC_INNER_PRODUCT)
    with pytest.warns(UserWarning, match="training on the CPU instead"):
        trained = fb.train_on_device(fresh, x)
    assert trained.is_trained


def test_an_index_too_big_for_the_gpu_still_runs_its_k_means_there(monkeypatch):
    """moon-mini's 1,792-d vectors get PQ448, more sub-quantisers than faiss's GPU kernels take, so the whole
    index cannot train on the GPU; its coarse k-means (the costly part) still runs there through a flat
    index over the centroids. CPU stand-ins for the GPU (this machine has none): the refused copy raises,
    the "GPU flat index" is a CPU one. The trained index must be the one a plain CPU training gives."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 64)).astype(np.float32)
    faiss.normalize_L2(x)
    recipe = "IVF32,PQ16np"

    def fresh():
        index = faiss.index_factory(64, recipe, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.seed = 3
        return index

    plain = fresh()
    plain.train(x)
    flats = []

    def to_gpu(index, co=None):
        if not isinstance(index, faiss.IndexFlat):
            raise RuntimeError("Error: 'requiredSmemSize <= getMaxSharedMemPerBlock(config_.device)' failed")
        flats.append(index)
        return index

    monkeypatch.setattr(fb, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: types.SimpleNamespace(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpu)
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: this is the planned path
        trained = fb.train_on_device(fresh(), x, said.append)
    assert len(flats) == 1 and flats[0].metric_type == faiss.METRIC_INNER_PRODUCT and flats[0].ntotal == 32
    assert said and "coarse k-means on the GPU" in said[0] and "requiredSmemSize" in said[0]
    assert faiss.extract_index_ivf(trained).clustering_index is None  # not kept past the training
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 32) for i in (trained, plain)]
    assert np.array_equal(*centroids)
    assert np.array_equal(trained.sa_encode(x), plain.sa_encode(x))


def test_shared_sets_get_twice_the_lists_of_one_global_index_up_to_a_cap():
    """The shared quantizer's lists: the power of two nearest 8 sqrt(n) (one global index of the size ladder
    gets 4 sqrt(n)), at most 8,192 and n / 39; an explicit ``nlist`` wins."""
    from moonsearch.index.shared import SharedQuantizer

    def lists(n, **kw):
        return SharedQuantizer.plan(n, 256, replace(fb.IndexParams(), **kw))[0].split(",")[0]

    assert lists(100_000) == "IVF2048" and fb.choose_factory(100_000, 256, fb.IndexParams()).startswith("IVF1024,")
    assert lists(1_000_000) == "IVF8192" and lists(10_000_000) == "IVF8192"
    assert lists(20_000) == "IVF512"  # 39 training points per list
    assert lists(1_000_000, nlist=1024) == "IVF1024"
    assert SharedQuantizer.plan(1_000_000, 256, fb.IndexParams())[1] == 39 * 8192  # k-means sample
