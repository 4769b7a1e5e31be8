"""The fine-tuned image tower of the visual block: its data (wide pool only, never an eval vendor), the
training views and pairs, the recipe script's CPU dry run, and the packaged tower on held-out vendors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moonsearch.data import real
from moonsearch.models.base import l2_normalize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    from moonsearch.training.visual_tower import pack

    out = tmp_path_factory.mktemp("pack")
    pack(out, vendors=["bi", "carbon", "icon-park"], max_concepts=40, log=lambda *_: None)
    return out


def test_the_pack_draws_only_on_the_wide_pool(tiny_pack):
    from moonsearch.training.visual_tower import load_pack, pool_concepts

    arrays, meta, trunk = load_pack(tiny_pack)
    assert meta["vendors"] == ["bi", "carbon", "icon-park"]
    assert len(meta["concepts"]) == 40 and len(arrays["text"]) == 40
    assert arrays["glyphs"].shape[1:] == (128, 128) and arrays["colours"].shape[1:] == (128, 128, 3)
    assert len(arrays["colours"]) > 0  # IconPark's colour drawings go in as colour
    assert set(meta["photos"]).isdisjoint(real.splits()["eval"].photos)
    assert "_fc.weight" not in trunk and "_conv_head.weight" in trunk
    for held_out in ("mdi", "lucide", "flat-color-icons", "tabler", "streamline-freehand-color"):
        with pytest.raises(ValueError, match="not in the wide fitting pool"):
            pool_concepts([held_out])  # eval vendors and the fit split's held-out vendors never go in


def test_pairs_are_two_vendors_drawing_one_concept_never_twice_in_a_batch(tiny_pack):
    from moonsearch.training.visual_tower import PairSampler, load_pack

    arrays, _, _ = load_pack(tiny_pack)
    concept = np.concatenate([arrays["glyph_concept"], arrays["colour_concept"]])
    vendor = np.concatenate([arrays["glyph_vendor"], arrays["colour_vendor"]])
    sample = PairSampler(arrays, seed=0, colour_side=1.0)
    for _ in range(7):  # 7 x 16 crosses several passes over the 40 concepts
        cs, a, b = sample(16)
        assert len(cs) == len(set(cs.tolist())) == 16
        assert (concept[a] == cs).all() and (concept[b] == cs).all()
        assert (vendor[a] != vendor[b]).all()  # one concept per vendor in the pack: different drawings


def test_views_put_drawings_on_white_or_into_photographs(tiny_pack):
    from moonsearch.training.visual_tower import Views, load_pack

    arrays, _, _ = load_pack(tiny_pack)
    ids = torch.arange(12)
    clean = Views(arrays, "cpu", 64, listing=0.0, seed=1)(ids)
    busy = Views(arrays, "cpu", 64, listing=1.0, seed=1)(ids)
    assert clean.shape == busy.shape == (12, 3, 64, 64)
    white = (1 - 127 / 255) / (128 / 255)  # a white pixel after Lite0's normalisation
    corner = lambda x: x[:, :, :3, :3].mean(dim=(1, 2, 3))  # noqa: E731
    assert (corner(clean) > 0.9 * white).float().mean() > 0.8  # drawings on white...
    assert (corner(busy) < 0.9 * white).float().mean() > 0.5  # ...or over a photograph
    assert (clean.amin(dim=(1, 2, 3)) < 0.5 * white).all()  # every view shows ink


@pytest.mark.slow  # ~7 s: run by make test-slow (CI runs both)
def test_the_recipe_script_trains_and_saves_loadable_towers_on_cpu(tiny_pack, tmp_path):
    from moonsearch.errors import UserError
    from moonsearch.models.visual import whitening_path, WHITENING
    from moonsearch.models.visual_tower import load_tuned

    out = tmp_path / "towers"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/tune_tower.py"), "train", "--pack", str(tiny_pack),
                    "--out", str(out), "--recipe", "pairs-text-late", "--dry-run"], check=True, cwd=ROOT)
    report = json.loads((out / "train.json").read_text())[0]
    assert report["steps"] == 2 and report["recipe"]["frozen_blocks"] == 8
    tuned = load_tuned(out / "pairs-text-late.safetensors")
    assert tuned.meta["recipe"]["name"] == "pairs-text-late"
    images = [real.draw("bi", "camera", 96), real.draw("carbon", "camera", 96)]
    v = tuned.vectors(images)
    assert v.shape == (2, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # the frozen stem kept its pretrained weights; the head was trained
    from moonsearch.models.efficientnet_lite import load_pretrained

    assert torch.allclose(tuned.model.trunk._conv_stem.weight, load_pretrained()._conv_stem.weight.half().float())
    with pytest.raises(UserError, match="not a moonsearch tuned tower"):
        load_tuned(whitening_path(WHITENING))


def test_the_packaged_tower_matches_held_out_vendors_better_than_the_pretrained_block():
    """Held-out real artwork: tabler glyphs (never in the pool) against streamline-freehand-color
    drawings (never in the pool), both of the fit split, 60 pairs. The tuned tower ranks the right drawing higher
    than the pretrained tower + whitening does."""
    from moonsearch.models.towers import ImageTower
    from moonsearch.models.visual import VisualBlock
    from moonsearch.models.visual_tower import TOWER, load_tuned

    tuned = load_tuned(TOWER)
    assert set(tuned.meta["vendors"]).isdisjoint({"tabler", "ph", "streamline-freehand-color", "mdi", "lucide",
                                                  "flat-color-icons", "fluent-color"})
    products = real.concepts("streamline-freehand-color")
    queries = real.concepts("tabler")
    pairs = sorted((c.split("-", 1)[-1], n) for c, n in products.items() if c.split("-", 1)[-1] in queries)[:60]
    assert len(pairs) == 60
    prod = [real.draw("streamline-freehand-color", n, 160) for _, n in pairs]
    qs = [real.draw("tabler", queries[c], 160) for c, _ in pairs]

    def mean_rank(q, p):
        s = l2_normalize(q) @ l2_normalize(p).T
        return float((s > np.diag(s)[:, None]).sum(1).mean())

    old = VisualBlock(crops=False)
    tower = ImageTower(160)
    before = mean_rank(old.pictures(tower, qs), old.pictures(tower, prod))
    after = mean_rank(tuned.vectors(qs), tuned.vectors(prod))
    assert after < 0.7 * before, (before, after)
