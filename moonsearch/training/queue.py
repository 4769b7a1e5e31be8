"""The temporal negatives: a FIFO queue of product embeddings from past steps (as in MoCo).

Vectors and the ids they belong to are module buffers, so the queue is saved in checkpoints and
follows the model's device. Ids are stored as 63-bit hashes of the item and group strings.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def id_hash(text: str | None) -> int:
    """A stable non-negative 63-bit hash (-1 for None), the same in every process."""
    if text is None:
        return -1
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class NegativeQueue(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("items", torch.full((size,), -2, dtype=torch.long))
        self.register_buffer("groups", torch.full((size,), -2, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, vectors: torch.Tensor, items: torch.Tensor, groups: torch.Tensor) -> None:
        """Add (n, dim) detached vectors, overwriting the oldest entries."""
        n = min(len(vectors), self.size)
        vectors, items, groups = vectors[-n:], items[-n:], groups[-n:]
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.vectors[idx] = vectors.detach().to(self.vectors.dtype)
        self.items[idx] = items.to(self.items.device)
        self.groups[idx] = groups.to(self.groups.device)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors (m, dim), items (m,), groups (m,)) of the filled part."""
        m = int(self.filled)
        return self.vectors[:m], self.items[:m], self.groups[:m]
