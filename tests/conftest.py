"""Session fixtures: seeded tiny worlds and encoders built once, handed out to every test."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["MOONSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A 120-product synthetic world (seed 5)."""
    from moonsearch.data.synthetic import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, n=120, seed=5, workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_index(world, clip_tiny, tmp_path_factory):
    """The world indexed with clip-tiny."""
    from moonsearch.indexer.run import IndexJob, run_index

    out = tmp_path_factory.mktemp("index")
    run_index(IndexJob(world / "catalog.parquet", out, model="clip-tiny"), encoder=clip_tiny)
    return out


def structured_vectors(n: int, d: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Clustered unit vectors (uniform ones defeat IVF-PQ, as they would any real index)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _encoder(name: str):
    """A session fixture holding the registry's encoder ``name``, built once."""

    @pytest.fixture(scope="session")
    def fixture():
        from moonsearch.models.base import create_encoder

        return create_encoder(name)

    return fixture


clip_tiny, clip_mini = _encoder("clip-tiny"), _encoder("clip-mini")
moon_tiny, moon_mini = _encoder("moon-tiny"), _encoder("moon-mini")
