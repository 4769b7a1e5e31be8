"""The visual block: unit vectors, weights by input kind, text rankings untouched by photos."""
import numpy as np

from moonsearch.models.base import Product, Query, l2_normalize
from moonsearch.models.visual import VisualBlock, compose, group_mean, input_kinds


def test_compose_weights_blocks_and_keeps_photo_products_on_the_text_scale():
    rng = np.random.default_rng(0)
    sem = l2_normalize(rng.normal(size=(3, 8)))
    vis = group_mean(rng.random((3, 5)).astype(np.float32), [2, 1, 0])  # third product: no photos
    assert np.allclose(np.linalg.norm(vis, axis=1), [1, 1, 0])
    block = VisualBlock(product=0.6)
    x = compose(sem, vis, block.weights(input_kinds(["a", "b", "c"], [2, 1, 0], products=True)))
    assert np.allclose(np.linalg.norm(x, axis=1), [1, 1, 0.8], atol=1e-6)
    q = compose(sem[:1], np.zeros((1, 5), np.float32), block.weights(input_kinds(["a"], [0], products=False)))
    # a text query sees only the semantic block, and every product at the same scale 0.8
    assert np.allclose(q @ x.T, 0.8 * sem[:1] @ sem.T, atol=1e-6)


def test_query_kinds_get_their_own_weights():
    block = VisualBlock(product=0.7, image_query=0.9, text_image_query=0.4)
    kinds = input_kinds(["red", None, "red"], [0, 1, 1], products=False)
    assert kinds == ["text", "image", "text+image"]
    assert np.allclose(block.weights(kinds), [0, 0.9, 0.4])


def test_clip_mini_carries_the_tuned_towers_vectors(clip_mini, world):
    from moonsearch.data.images import load_image
    from moonsearch.models.visual_tower import TOWER, load_tuned
    import pyarrow.parquet as pq

    row = pq.read_table(world / "catalog.parquet").to_pylist()[0]
    img = load_image(row["images"][0], world)
    v = clip_mini.encode_queries([Query(image=img), Query("red sneakers")])
    sem = clip_mini.semantic_dim
    from moonsearch.models.towers import pil_to_tensor
    from moonsearch.vision.croppers import crop
    from moonsearch.vision.detector import DetectorCropper

    from moonsearch.models.efficientnet_lite import load_pretrained

    assert clip_mini.visual.tower == TOWER
    tuned = load_tuned(TOWER)
    assert tuned.frozen == 8
    pretrained = load_pretrained()

    def by_hand(im, own_prefix=False):  # the pretrained stem + 8 blocks, the tuned blocks, GeM, L2, head, L2
        x = pil_to_tensor([im], 160, (127 / 255,) * 3, (128 / 255,) * 3)
        trunk = tuned.model.trunk
        fm = trunk.feature_map(x) if own_prefix else trunk.suffix(pretrained.prefix(x, 8), 8)
        gem = fm.detach().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        w, b = tuned.model.head.weight.detach().numpy(), tuned.model.head.bias.detach().numpy()
        return l2_normalize(l2_normalize(gem.numpy()) @ w.T + b)[0]

    core = crop(img, DetectorCropper().boxes([img])[0])  # the picture and its core-product crop, summed
    want = l2_normalize(by_hand(img) + by_hand(core))
    # the file's own (fp16-stored) copy of the frozen blocks gives the same vector up to that rounding
    assert float(want @ l2_normalize(by_hand(img, True) + by_hand(core, True))) > 0.9999
    assert clip_mini.visual.dim == 256 == v.shape[1] - sem
    bq = clip_mini.visual.image_query
    assert np.allclose(v[0, sem:], bq * want, atol=1e-4)
    assert np.allclose(v[1, sem:], 0)  # a text query carries no visual evidence
    p = clip_mini.encode_products([Product("x", images=[img, img])])
    assert np.allclose(p[0, sem:], clip_mini.visual.product * want, atol=1e-4)


def test_without_a_tuned_tower_the_block_is_the_whitened_pretrained_features(world):
    from moonsearch.data.images import load_image
    from moonsearch.models.towers import ImageTower, pil_to_tensor
    from moonsearch.models.visual import VisualBlock, load_whitening
    import pyarrow.parquet as pq

    block, tower = VisualBlock(crops=False), ImageTower(160)
    mean, proj, _ = load_whitening(block.whitening)
    img = load_image(pq.read_table(world / "catalog.parquet").to_pylist()[0]["images"][0], world)
    fm = tower.model.feature_map(pil_to_tensor([img], 160, (127 / 255,) * 3, (128 / 255,) * 3))
    gem = fm.detach().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    want = l2_normalize((l2_normalize(gem) - mean) @ proj)
    assert np.allclose(block.pictures(tower, [img]), want, atol=1e-5)
    assert block.fingerprint() != VisualBlock(crops=False, tower="real-pool-v1").fingerprint()


def test_the_packaged_whitening_was_fitted_on_the_fit_split_only():
    from safetensors import safe_open

    from moonsearch.data import real
    from moonsearch.models.visual import WHITENING, whitening_path

    with safe_open(str(whitening_path(WHITENING)), "np") as f:
        meta = f.metadata()
    assert meta["split"] == "fit"
    fitted = set(meta["sources"].split(","))
    assert fitted == set(real.splits()["fit"].all_sources())
    assert fitted.isdisjoint(real.splits()["eval"].all_sources())
    # it is a whitening: orthogonal directions, each scaled (a scrambled buffer would not be)
    from moonsearch.models.visual import load_whitening

    _, proj, _ = load_whitening(WHITENING)
    gram = proj.T @ proj
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-3 * np.diag(gram).max() and (np.diff(np.diag(gram)) >= -1e-3).all()


def test_fit_whitening_decorrelates_and_refuses_the_held_out_split():
    import pytest

    from moonsearch.errors import UserError
    from moonsearch.models.visual import fit_packaged, fit_whitening

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))  # correlated features
    mean, proj = fit_whitening(x, dim=8, shrink=0.0)
    assert proj.flags.c_contiguous  # safetensors writes raw buffers
    z = (l2_normalize(x) - mean) @ proj
    cov = np.cov(z.T)
    assert np.allclose(cov, np.eye(8), atol=0.05)  # whitened: unit variance, no correlation
    with pytest.raises(UserError, match="held out"):
        fit_packaged(name="never-written", split="eval")


def test_a_tower_on_another_device_never_moves_the_shared_one():
    from moonsearch.models.towers import ImageTower, _effnet

    tower = ImageTower(160, "meta")  # any non-CPU device: the shared CPU module must stay put
    assert tower.model is not _effnet()
    assert next(_effnet().parameters()).device.type == "cpu"
    assert next(tower.model.parameters()).device.type == "meta"
    assert ImageTower(160, "cpu").model is _effnet()


def test_moon_fingerprint_changes_with_anything_that_changes_the_vectors():
    import dataclasses

    from moonsearch.models.moon import builtin_config
    from moonsearch.models.moon.encoder import vector_fingerprint

    cfg = builtin_config("moon-mini-base")
    base = vector_fingerprint(cfg, b"weights")
    assert vector_fingerprint(cfg, b"weights") == base
    for change in (dict(pool="mean"), dict(text_first=False), dict(visual_product=0.0), dict(cropper="centre"),
                   dict(visual_whitening=""), dict(visual_crops=False), dict(text_block=0.0), dict(text_block=0.7),
                   dict(visual_tower="")):
        assert vector_fingerprint(dataclasses.replace(cfg, **change), b"weights") != base, change
    assert vector_fingerprint(cfg, b"other weights") != base


def test_each_picture_goes_through_efficientnet_once_per_encoding(clip_mini, world, monkeypatch):
    """The detector and the image tower see the same square pictures: inside one encode call each
    (weights, input) pair is computed once, and the vectors do not change."""
    from contextlib import nullcontext

    import pyarrow.parquet as pq

    from moonsearch.data.images import load_image
    from moonsearch.models import towers
    from moonsearch.models.base import Product

    rows = pq.read_table(world / "catalog.parquet").slice(0, 6).to_pylist()
    prods = [Product(r["title"], r["category"], {}, [load_image(i, world) for i in r["images"]]) for r in rows]
    eff = towers._effnet()
    calls = []
    orig = eff.feature_map
    monkeypatch.setattr(eff, "feature_map", lambda x: (calls.append(len(x)), orig(x))[1])
    shared = clip_mini.encode_products(prods)
    n_shared = sum(calls)
    calls.clear()
    monkeypatch.setattr(towers, "shared_feature_maps", lambda: nullcontext())
    plain = clip_mini.encode_products(prods)
    assert n_shared < sum(calls), (n_shared, sum(calls))
    np.testing.assert_allclose(shared, plain, atol=1e-6)
