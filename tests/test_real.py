"""The held-out real-artwork check: its source split, and "photos never make a product harder to find
by text" on real drawings and photographs (eval split, real decoding, real encoders)."""
import dataclasses

import numpy as np
import pytest

from moonsearch.data import real
from moonsearch.data.render import PHOTOS
from moonsearch.eval import real_bench


@pytest.fixture(scope="module")
def eval_set():
    return real.build("eval", max_products=60)


def test_fit_and_eval_share_no_vendor_and_no_photograph():
    sp = real.splits()
    real.check_disjoint(sp["fit"], sp["eval"])
    # nothing the synthetic world (what the models are fitted on) photographs is an eval background
    assert not set(sp["eval"].photos) & set(PHOTOS)
    with pytest.raises(ValueError, match="share sources"):
        real.check_disjoint(sp["fit"], dataclasses.replace(sp["eval"], queries=("tabler",)))


def test_the_wide_fitting_pool_holds_no_eval_vendor_and_no_set_that_redraws_one(monkeypatch):
    real.check_wide_pool()
    assert not set(real.WIDE_GLYPHS) & {"mdi", "lucide", "tabler", "ph"}  # eval, and fit's query vendors
    for relative in ("feather", "fluent", "icons8"):  # lucide forks feather; fluent-color; flat-color-icons
        monkeypatch.setitem(real.WIDE_GLYPHS, relative, "1.2.0")
        with pytest.raises(ValueError, match=relative):
            real.check_wide_pool()
        monkeypatch.delitem(real.WIDE_GLYPHS, relative)


def test_a_listing_photo_knows_where_its_product_was_pasted(eval_set):
    """The ground-truth box (what the crop bench scores croppers against) frames the product's drawing."""
    def ink_error(i, box):
        x0, y0, x1, y1 = box
        clean = np.asarray(eval_set.clean[i].resize((x1 - x0, y1 - y0)), np.float32)
        seen = np.asarray(eval_set.listing[i].crop(box), np.float32)
        ink = clean.mean(2) < 200
        return np.abs(clean - seen)[ink].mean()

    for i in range(0, 60, 7):
        x0, y0, x1, y1 = box = eval_set.listing_boxes[i]
        assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 320
        side = x1 - x0
        assert side == y1 - y0 and side >= int(320 * 0.42)  # the product is the big drawing
        shifted = (max(0, x0 - side // 3), y0, max(0, x0 - side // 3) + side, y1) if x0 >= side // 3 else \
            (x0 + side // 3, y0, x0 + side // 3 + side, y1)
        if shifted[2] <= 320:
            assert ink_error(i, box) < 0.5 * ink_error(i, shifted), (i, box)
        assert ink_error(i, box) < 20, (i, box)


def test_eval_set_draws_only_on_eval_vendors(eval_set):
    sp = real.splits()["eval"]
    assert set(eval_set.sources) <= set(sp.products)
    image_queries = [q for q in eval_set.queries if q["image"] is not None]
    assert image_queries and {q["source"] for q in image_queries} <= set(sp.queries)
    # the query drawing is another vendor's drawing, never the product's own picture
    ids = {x: i for i, x in enumerate(eval_set.item_ids)}
    for q in image_queries:
        own = np.asarray(eval_set.clean[ids[q["item_id"]]])
        assert q["source"] != eval_set.sources[ids[q["item_id"]]] and not np.array_equal(np.asarray(q["image"]), own)


def test_the_set_is_seeded_and_emoji_sources_are_refused(eval_set):
    again = real.build("eval", max_products=60)
    assert again.item_ids == eval_set.item_ids
    assert np.array_equal(np.asarray(again.listing[7]), np.asarray(eval_set.listing[7]))
    with pytest.raises(ValueError):
        real.fetch("twemoji")


def _text_rank_change(enc, data):
    res = real_bench.evaluate(enc, data, ("clean+listing", "listing", "no photos"))
    return res, res["text_rank_change"]


# the default model in make test; the baseline (~16 s) in make test-slow, which CI runs after it
@pytest.mark.parametrize("name", [pytest.param("clip_mini", marks=pytest.mark.slow), "moon_mini"])
def test_photos_never_make_a_product_harder_to_find_by_text(name, request, eval_set):
    enc = request.getfixturevalue(name)
    res, change = _text_rank_change(enc, eval_set)
    for variant in ("clean+listing", "listing"):
        # moon-mini's block pooling makes this exact; clip-mini's text and image parts are summed
        assert change[variant]["worse"] <= (0 if name == "moon_mini" else 1), (variant, change)
        assert res["rows"][variant]["text"]["R@1"] >= res["rows"]["no photos"]["text"]["R@1"] - 1 / 60
    # and the photos do their job: another artist's drawing finds the product more often with them
    assert res["rows"]["clean+listing"]["image"]["R@10"] > res["rows"]["no photos"]["image"]["R@10"]
    # the image figure split by the vendor of the product sought adds up to the whole
    by_vendor = res["image by product vendor (clean+listing)"]
    assert set(by_vendor) <= set(real.splits()["eval"].products)
    whole = res["rows"]["clean+listing"]["image"]
    assert sum(v["n"] for v in by_vendor.values()) == whole["n"]
    assert sum(v["R@10"] * v["n"] for v in by_vendor.values()) == pytest.approx(whole["R@10"] * whole["n"])


@pytest.mark.slow  # ~13 s: make test-slow (CI runs it); the property itself is checked above in make test
def test_the_check_catches_photos_that_drown_the_text(moon_mini, eval_set):
    """The paper's pooling (one mean over every position, images first) on the same weights: the
    image tokens swamp the title, and the check above would fail."""
    from moonsearch.models.moon.encoder import MoonEncoder

    cfg = dataclasses.replace(moon_mini.cfg, pool="mean", text_first=False, visual_product=0.0, text_block=0.0)
    model = moon_mini.model
    saved, model.cfg = model.cfg, cfg
    try:
        _, change = _text_rank_change(MoonEncoder(model, "moon-mini-mean", "mean-pool"), eval_set)
    finally:
        model.cfg = saved
    assert change["clean+listing"]["worse"] > 10, change


def test_the_crop_bench_scores_croppers_on_real_listing_photos():
    """benchmarks/crop.py's real-artwork rows: the trained detector finds the pasted product in real
    listing photos better than the whole photo and than a centre crop."""
    from moonsearch.eval.crop_bench import NoCrop, evaluate
    from moonsearch.models.cropping import make_cropper

    rows = evaluate(n=30, croppers=[NoCrop(), make_cropper("centre"), make_cropper("detector")], real_split="eval")
    real_rows = {r["cropper"]: r for r in rows if r["set"] == "real artwork (eval split)"}
    assert set(real_rows) == {"no crop", "centre", "detector"} and real_rows["detector"]["images"] == 30
    assert real_rows["detector"]["mean_iou"] > real_rows["centre"]["mean_iou"] > real_rows["no crop"]["mean_iou"]
    assert real_rows["detector"]["hit_rate@0.5"] > real_rows["centre"]["hit_rate@0.5"]


@pytest.mark.slow  # fetches the wide pool's ~36 icon sets once (npm): make test-slow
def test_the_real_training_world_adds_real_artwork_beside_the_demo_world_for_training_only(world, tmp_path):
    """benchmarks/real_training.py's world: the demo world whole (its test split untouched), real drawn
    products from the wide pool queried by name and by other vendors' drawings, all in the training
    split; the MOON trainer reads it."""
    import pyarrow.parquet as pq

    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.data import Batches, load_pairs

    out = tmp_path / "demo-real"
    stats = real.write_training_world(out, world, limit=40)
    cat = pq.read_table(out / "catalog.parquet").to_pylist()
    beh = pq.read_table(out / "behavior.parquet").to_pylist()
    demo_cat = pq.read_table(world / "catalog.parquet").to_pylist()
    demo_beh = pq.read_table(world / "behavior.parquet").to_pylist()
    assert cat[:len(demo_cat)] == demo_cat and beh[:len(demo_beh)] == demo_beh
    assert [b for b in beh if b["split"] == "test"] == [b for b in demo_beh if b["split"] == "test"]
    products = cat[len(demo_cat):]
    queries = beh[len(demo_beh):]
    assert len(products) == stats["real products"] == 40 and len(queries) == stats["real queries"]
    assert all(q["split"] == "train" for q in queries)
    train_times = [b["timestamp"] for b in demo_beh if b["split"] == "train"]
    assert min(train_times) <= min(q["timestamp"] for q in queries) <= max(q["timestamp"] for q in queries) <= max(train_times)
    titles = {p["item_id"]: p["title"] for p in products}
    assert {q["query_text"] for q in queries if q["modality"] == "text"} == set(titles.values())
    image_queries = [q for q in queries if q["modality"] == "image"]
    assert len(image_queries) >= 20
    held_out = {v for sp in real.splits().values() for v in sp.products + sp.queries} | set(real.EVAL_RELATIVES)
    for q in image_queries:  # another vendor's drawing of the same object, from the wide pool's glyph sets
        vendor = q["query_image"].rsplit("_q", 1)[1].removesuffix(".png")
        assert vendor in real.WIDE_GLYPHS and vendor not in held_out and not real.is_emoji(vendor)
    cfg = load_config("moon-mini-real", data=str(out))
    train, _ = load_pairs(out, cfg)
    batches = Batches(out, cfg)
    pair = next(p for p in train if p.item_id in titles and p.modality == "image")
    product = batches.product(pair.item_id)
    assert product.title == titles[pair.item_id] and len(product.images) == 2  # clean drawing + listing photo
    assert product.images[1].size == (320, 320) and batches.query(pair).image is not None


@pytest.mark.slow  # reads the wide pool's icon sets (fetched once with npm): make test-slow
def test_the_wide_pool_names_for_distillation_leave_the_fit_split_names_out():
    """moon-mini-distill-wide distils on these names; benchmarks/real_training.py textgap judges on the fit
    split's product names, so none of those may be among them."""
    names = real.wide_names()
    fit = real.fit_product_names()
    assert len(names) > 10_000 and len(fit) > 1_000 and not set(names) & set(fit)
    assert all("-" not in n and n == n.strip() for n in names)  # words, as a product title has them
