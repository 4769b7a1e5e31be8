import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from moonsearch.data.synthetic import generate_vectors, generate_world, sample_specs
from moonsearch.data.world import LEAVES


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    generate_world(tmp_path / "a", n=30, seed=11, workers=1)
    generate_world(tmp_path / "b", n=30, seed=11, workers=2)
    generate_world(tmp_path / "c", n=30, seed=12, workers=1)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a["catalog.parquet"] != c["catalog.parquet"]


def test_category_tree_has_three_levels_and_24_leaves(world):
    assert len(LEAVES) >= 24
    assert all(len(path) == 3 for path, _, _ in LEAVES.values())
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    assert all(len(r["category"]) == 3 for r in cat)


def test_catalog_images_and_core_boxes(world):
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    counts = Counter(len(r["images"]) for r in cat)
    assert set(counts) <= {1, 2, 3, 4} and len(counts) >= 3
    for r in cat[:40]:
        assert len(r["image_boxes"]) == len(r["images"])
        for rel, box in zip(r["images"], r["image_boxes"]):
            img = Image.open(world / rel)
            img.load()
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert (x1 - x0) * (y1 - y0) > 0.02  # the core product is visible, not a speck


def test_variants_differ_in_exactly_one_attribute():
    specs = sample_specs(400, seed=3)
    groups = {}
    for s in specs:
        groups.setdefault(s.group_id, []).append(s)
    multi = [g for g in groups.values() if len(g) > 1]
    assert len(multi) > 20
    for g in multi:
        for other in g[1:]:
            a, b = g[0].attributes(), other.attributes()
            assert sum(a[k] != b[k] for k in a) == 1, (a, b)


def test_behaviour_log_mix_split_and_fresh_query_photos(world):
    beh = pq.read_table(world / "behavior.parquet").to_pylist()
    mix = Counter(b["modality"] for b in beh)
    total = sum(mix.values())
    assert abs(mix["text"] / total - 12 / 17) < 0.1
    assert mix["image"] > 0 and mix["text+image"] > 0
    train = [b["timestamp"] for b in beh if b["split"] == "train"]
    test = [b["timestamp"] for b in beh if b["split"] == "test"]
    assert train and test and max(train) <= min(test)
    cat_hashes = {hashlib.sha1(p.read_bytes()).hexdigest() for p in (world / "images").glob("*.jpg")}
    for b in beh:
        if b["query_image"]:
            assert hashlib.sha1((world / b["query_image"]).read_bytes()).hexdigest() not in cat_hashes
        assert (b["query_text"] is not None) == (b["modality"] != "image")


def test_vectors_only_mode(tmp_path):
    info = generate_vectors(tmp_path, 5000, dim=32, n_queries=50, seed=1)
    x = np.load(tmp_path / "vectors.npy")
    q = np.load(tmp_path / "queries.npy")
    assert info["items"] == 5000 and x.shape == (5000, 32) and q.shape == (50, 32)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert pq.read_table(tmp_path / "catalog.parquet").num_rows == 5000
    # structured: same-leaf vectors are much closer than random pairs
    cats = [c[-1] for c in pq.read_table(tmp_path / "catalog.parquet").column("category").to_pylist()]
    same = [i for i in range(1, 500) if cats[i] == cats[0]]
    other = [i for i in range(1, 500) if cats[i] != cats[0]]
    assert (x[same] @ x[0]).mean() > (x[other] @ x[0]).mean() + 0.2
