"""Batches that never hold the same item, or two items of one group, twice (either would be a false
negative for the other). Deterministic for a (seed, epoch); ``start`` skips batches when resuming;
with ``world_size`` > 1 every rank takes its own slice of each global batch."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class UniqueBatchSampler:
    def __init__(self, items: Sequence[str], groups: Sequence[str | None], batch_size: int, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        assert batch_size % world_size == 0, "the global batch must split evenly over ranks"
        self.items, self.groups = list(items), [g or f"item:{i}" for g, i in zip(groups, items)]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self._cached: tuple[int, list[list[int]]] | None = None
        self.builds = 0  # epochs built (each once while the trainer stays in it)

    def batches(self, epoch: int) -> list[list[int]]:
        """Global batches (indices into the pair list) for one epoch; the last epoch asked for is kept,
        so the trainer, which asks for the batch of every step, builds each epoch once (not once per step)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build(epoch))
            self.builds += 1
        return self._cached[1]

    def _build(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        out, pending = [], list(order)
        while pending:
            batch, used, rest = [], set(), []
            for i in pending:
                key = self.groups[i]
                if len(batch) < self.batch_size and key not in used:
                    batch.append(int(i))
                    used.add(key)
                else:
                    rest.append(i)
            if len(batch) < self.batch_size and self.drop_last:
                break
            out.append(batch)
            pending = rest
        return out

    def __call__(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        per = self.batch_size // self.world_size
        for b in self.batches(epoch)[start:]:
            yield b[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.batches(0))
