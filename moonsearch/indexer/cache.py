"""The indexer's embedding cache: ``<index>/embeddings/<encoder fingerprint>/shard-*.npz``.

An unchanged item is never embedded twice by the same encoder (vectors keyed by the item's content
hash), so an interrupted ``index`` resumes and a rebuild with other index parameters re-embeds nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moonsearch.utils.io import atomic_path


class EmbeddingCache:
    """Append-only shards of (content key, float16 vector); safe to interrupt at any point."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(folder.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as z:
                for key, vec in zip(z["keys"], z["vectors"]):
                    self.vectors[str(key)] = vec
        self._pending_keys: list[str] = []
        self._pending: list[np.ndarray] = []

    def __contains__(self, key: str) -> bool:
        return key in self.vectors

    def get(self, key: str) -> np.ndarray:
        return self.vectors[key]

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        vec16 = vectors.astype(np.float16)
        for k, v in zip(keys, vec16):
            self.vectors[k] = v
        self._pending_keys.extend(keys)
        self._pending.append(vec16)

    def flush(self) -> None:
        if not self._pending_keys:
            return
        name = f"shard-{time.time_ns():020d}.npz"
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(self._pending_keys), vectors=np.concatenate(self._pending))
        self._pending_keys, self._pending = [], []
