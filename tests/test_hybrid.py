"""Hybrid search: the BM25 side (against bm25s as the oracle), fusion, query understanding, and the
lexical index kept in step with the vector index through append and delete."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moonsearch.index.lexical import CategoryTerms, LexicalSet, analyse, fold
from moonsearch.search.service import SearchService, convex, rrf
from moonsearch.search.understand import Gazetteer, Reading

SHOP = {
    "shoes": ["Lumen red sneakers", "grey leather boots by Kestrel", "red running shoes, size 42",
              "white canvas sneakers", "Crème brûlée coloured sandals"],
    "bags": ["red leather handbag", "black backpack with laptop sleeve", "orange tote bag"],
    "kitchen": ["ceramic teapot", "red kettle", "espresso cups set of 4", "Orange brand blender"],
}


def test_bm25_with_shared_statistics_equals_bm25s_on_the_union():
    import bm25s

    parts = {k: CategoryTerms.build(v) for k, v in SHOP.items()}
    lex = LexicalSet(parts)
    union = [t for v in SHOP.values() for t in v]
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index([analyse(t) for t in union], show_progress=False)
    for q in ["red sneakers", "leather", "orange bag", "size 42 shoes", "teapot teapot", "creme brulee"]:
        ours = np.concatenate([lex.scores(slug, analyse(q)) for slug in SHOP])
        theirs = ref.get_scores(analyse(q))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=q)
    top = lex.search("red leather", 3)
    assert [(s, r) for _, s, r in top][:2] == [("bags", 0), ("shoes", 1)]  # the two with both words first


def test_bm25_keeps_its_weighed_postings_within_a_byte_bound(monkeypatch):
    """A server reuses each (category, term)'s BM25 weights; the cache never outgrows its byte bound, and
    answers stay those of a fresh set."""
    import moonsearch.index.lexical as lexical

    monkeypatch.setattr(lexical, "POSTINGS_CACHE_BYTES", 1200)
    parts = {k: CategoryTerms.build(v) for k, v in SHOP.items()}
    lex = LexicalSet(parts)
    queries = ["red sneakers", "leather", "orange bag", "size 42 shoes", "teapot teapot", "creme brulee",
               "red red leather", "black backpack laptop", "espresso cups", "kettle"] * 3
    for q in queries:
        assert lex.search(q, 5) == LexicalSet(parts).search(q, 5), q
        assert lex._cache_bytes <= 1200 and len(lex._cache) <= 1200 // lexical._ENTRY_BYTES
    assert lex._cache  # it does keep some


def test_analysis_folds_accents_case_and_stems():
    assert fold("Crème BRÛLÉE") == "creme brulee"
    assert analyse("The RUNNING Shoes") == analyse("running shoe") == ["run", "shoe"]
    lex = LexicalSet({k: CategoryTerms.build(v) for k, v in SHOP.items()})
    assert lex.search("CRÈME", 5)[0][1:] == ("shoes", 4)
    assert lex.search("the of with", 5) == [] and lex.search("", 5) == []  # stop words only, empty


def test_lexical_file_round_trip(tmp_path):
    t = CategoryTerms.build(SHOP["shoes"])
    t.save(tmp_path / "lexical.npz")
    back = CategoryTerms.load(tmp_path / "lexical.npz")
    assert back.terms.tolist() == t.terms.tolist() and (back.tf != t.tf).nnz == 0
    np.load(tmp_path / "lexical.npz", allow_pickle=False)  # no pickled objects inside


def test_fusion_orders():
    fused = rrf([["a", "b", "c"], ["c", "a"]])
    assert sorted(fused, key=lambda i: -fused[i]) == ["a", "c", "b"]
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    c = convex([("a", 0.9), ("b", 0.5), ("c", 0.1)], [("c", 12.0), ("d", 2.0)], alpha=0.5)
    assert c == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.5, "d": 0.0})
    assert sorted(convex([("a", 0.9), ("b", 0.5)], [("b", 3.0), ("a", 1.0)], 0.8).items())[0][0] == "a"


def _gaz():
    return Gazetteer([Reading("colour", "red", ("red",)), Reading("colour", "grey", ("grey",)),
                      Reading("colour", "orange", ("orange",)), Reading("brand", "Orange", ("orange",)),
                      Reading("brand", "Kestrel", ("kestrel",)), Reading("size", "S", ("s",)),
                      Reading("size", "M", ("m",)), Reading("style", "knee-high", ("knee", "high")),
                      Reading("category", "apparel > shoes > sneakers", ("sneakers",)),
                      Reading("category", "apparel > shoes", ("shoes",))])


def test_gazetteer_filters_synonyms_ambiguity_and_codes():
    g = _gaz()
    u = g.parse("Red SNEAKERS")
    assert u.filters == {"colour": "red", "category": "apparel > shoes > sneakers"} and not u.boosts
    assert g.parse("gray boots").filters == {"colour": "grey"}  # synonym, only because "grey" is a catalog value
    u = g.parse("orange blender")  # a colour and a brand: a boost for each, no filter
    assert u.filters == {} and set(u.boosts) == {("colour", "orange"), ("brand", "Orange")}
    assert g.parse("levi's jeans").filters == {}  # the "s" is no size
    assert g.parse("hoodie size m").filters == {"size": "M"}
    assert g.parse("knee-high kestrel").filters == {"style": "knee-high", "brand": "Kestrel"}
    assert g.parse("knee pads").filters == {}  # part of a value is not the value
    assert g.parse("P0000042 sneakers").codes == ["p0000042"]
    assert not g.parse("the of") and not g.parse("")
    u = g.parse("red sneakers")
    assert u.matches(["apparel", "shoes", "sneakers"], {"colour": "Red"}) == (2, 0)
    assert u.matches(["apparel", "shoes", "boots"], {"colour": "red"}) == (1, 0)


@pytest.fixture(scope="module")
def svc(tiny_index, clip_tiny):
    return SearchService(tiny_index, encoder=clip_tiny)


def _catalog(svc):
    return [m for c in svc.index.categories.values() for m in c.meta.to_pylist()]


def test_understood_values_lead_in_every_mode(svc):
    items = _catalog(svc)
    leaf = items[0]["category"]
    colour = json.loads(items[0]["attributes"])["colour"]
    q = f"{colour} {leaf[-1]}"
    carrying = {m["item_id"] for m in items if m["category"] == leaf and json.loads(m["attributes"])["colour"] == colour}
    for mode in ("vector", "lexical", "hybrid"):
        res = svc.search(q, k=len(carrying) + 3, mode=mode)
        assert res.understood.get("colour") == colour, res.understood
        top = [h.item_id for h in res.hits[:len(carrying)]]
        assert set(top) == carrying, (mode, top)
        plain = svc.search(q, k=len(carrying), mode=mode, understand=False)
        assert plain.understood == {}


def test_the_filtered_side_searches_only_categories_that_hold_the_values(svc, monkeypatch):
    """A query understood as an attribute value without a category ("compact camera" -> style=compact)
    searches, on its filtered side, only the categories where some item carries every value, and finds
    what a search of every category finds."""
    items = _catalog(svc)
    paths = {}
    for m in items:
        for key, v in json.loads(m["attributes"]).items():
            paths.setdefault((key, v), set()).add(" > ".join(m["category"]))
    (key, value), where = min(paths.items(), key=lambda kv: (len(kv[1]), kv[0]))  # the rarest value
    assert svc._holding({key: value}, None) == sorted(where, key=lambda p: svc.slugs.index(
        next(s for s in svc.slugs if " > ".join(svc._path(s)) == p)))
    leaf = next(iter(where))
    assert svc._holding({key: value, "category": leaf}, None) == [leaf]
    assert svc._holding({key: "no such value"}, None) == []
    queries = sorted({v for (k, v) in paths if k == key})[:6]
    narrowed = {(q, mode): [h.item_id for h in svc.search(q, k=10, mode=mode).hits]
                for q in queries for mode in ("vector", "hybrid", "lexical")}
    monkeypatch.setattr(svc, "_holding", lambda filters, categories: [" > ".join(svc._path(s)) for s in svc.slugs])
    for (q, mode), ids in narrowed.items():
        assert [h.item_id for h in svc.search(q, k=10, mode=mode).hits] == ids, (q, mode)


def test_exact_title_and_product_code_queries(svc):
    items = _catalog(svc)
    hits1 = sum(svc.search(m["title"], k=1, mode="lexical", understand=False).hits[0].item_id == m["item_id"]
                for m in items[:40])
    assert hits1 >= 30  # titles repeat words across products; the lexical side still finds most
    target = items[17]["item_id"]
    for mode in ("lexical", "hybrid"):
        res = svc.search(target, k=3, mode=mode)
        assert res.hits[0].item_id == target and res.understood["codes"] == [target.lower()]


def test_stop_words_only_falls_back_to_the_vector_side(svc):
    res = svc.search("the of", k=5, mode="hybrid")
    assert len(res.hits) == 5 and [h.item_id for h in res.hits] == \
        [h.item_id for h in svc.search("the of", k=5, mode="vector").hits]
    assert svc.search("the of", k=5, mode="lexical").hits == []
    with pytest.raises(ValueError, match="empty query"):
        svc.search("   ", k=5)
    with pytest.raises(ValueError, match="mode"):
        svc.search("x", k=5, mode="bm25")


def test_append_and_delete_keep_lexical_and_vector_in_step(world, tiny_index, clip_tiny, tmp_path):
    from moonsearch.index.index_set import IndexSet
    from moonsearch.indexer.run import IndexJob, run_index

    folder = tmp_path / "idx"
    shutil.copytree(tiny_index, folder)
    svc = SearchService(folder, encoder=clip_tiny)
    victim = _catalog(svc)[5]
    assert svc.search(victim["item_id"], k=1, mode="lexical").hits[0].item_id == victim["item_id"]
    IndexSet.load(folder).delete({victim["item_id"]})
    cat = pq.read_table(world / "catalog.parquet").slice(0, 3)
    cat = cat.set_column(cat.schema.get_field_index("item_id"), "item_id", pa.array(["ZZ900", "ZZ901", "ZZ902"]))
    pq.write_table(cat, tmp_path / "more.parquet")
    run_index(IndexJob(tmp_path / "more.parquet", folder, append=True), encoder=clip_tiny)
    svc = SearchService(folder, encoder=clip_tiny)
    for c in svc.index.categories.values():
        assert (c.path / "lexical.npz").exists() and c.lexical.n == c.meta.num_rows == c.index.ntotal
    gone = svc.search(victim["item_id"], k=200, mode="hybrid")
    assert victim["item_id"] not in {h.item_id for h in gone.hits}
    assert svc.search(victim["item_id"], k=5, mode="lexical").hits == []
    assert svc.search("ZZ901", k=1, mode="lexical").hits[0].item_id == "ZZ901"
    vec = svc.search_text(cat.column("title")[1].as_py(), k=200)
    assert "ZZ901" in {h.item_id for h in vec}


def test_a_catalog_without_attributes(tmp_path, clip_tiny, world):
    from moonsearch.indexer.run import IndexJob, run_index

    cat = pq.read_table(world / "catalog.parquet").slice(0, 30)
    cat = cat.drop_columns([c for c in cat.column_names if c not in ("item_id", "title", "category", "images")])
    images = [[str((world / p).resolve()) for p in row] for row in cat.column("images").to_pylist()]
    cat = cat.set_column(cat.schema.get_field_index("images"), "images", pa.array(images))
    pq.write_table(cat, tmp_path / "plain.parquet")
    run_index(IndexJob(tmp_path / "plain.parquet", tmp_path / "idx"), encoder=clip_tiny)
    svc = SearchService(tmp_path / "idx", encoder=clip_tiny)
    title = cat.column("title")[4].as_py()
    res = svc.search(title, k=3)
    assert res.hits and res.hits[0].title == title
    assert set(res.understood) <= {"category", "boost", "codes"}
