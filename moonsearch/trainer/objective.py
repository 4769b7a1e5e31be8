"""The objective of one micro-batch: InfoNCE of the queries against every negative MOON uses, with the
false negatives masked, all in one place.

Candidates for each query: this rank's products (its positives first, then one hard negative per
query), every other rank's (all-gather, "spatial"), and the queue of past steps' products
("temporal"). A candidate sharing the positive's item id (or group, with ``mask_groups``) is masked;
without ``in_batch`` the other queries' positives are masked too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moonsearch.trainer.config import TrainConfig
from moonsearch.training.distributed import all_gather_with_grad, is_distributed
from moonsearch.training.losses import false_negative_mask, info_nce
from moonsearch.training.queue import NegativeQueue, id_hash


def _ids(items: list[str], groups: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([id_hash(i) for i in items]), torch.tensor([id_hash(g) for g in groups])


def _gather_ids(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@dataclass
class Scored:
    loss: torch.Tensor
    candidates: int  # products each query was scored against (its positive included)
    fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # this step's products (all ranks) for the queue


def contrastive_loss(q_emb: torch.Tensor, p_emb: torch.Tensor, q_keys: tuple[list, list], p_keys: tuple[list, list],
                     cfg: TrainConfig, queue: NegativeQueue | None, rank: int, world: int,
                     temperature: torch.Tensor) -> Scored:
    """``q_emb`` (B, d) and ``p_emb`` (B + hard, d) unit rows, positives first; ``*_keys`` (item ids,
    group ids). Every rank must pass the same number of products (the all-gather needs equal sizes)."""
    c_items, c_groups = _ids(*p_keys)
    B = len(q_emb)
    if cfg.gather:
        cand = all_gather_with_grad(p_emb)
        c_items, c_groups = _gather_ids(c_items), _gather_ids(c_groups)
        offset = rank * len(p_emb)
    else:
        cand, offset = p_emb, 0
    n_fresh = len(cand)
    fresh = (cand.detach(), c_items, c_groups)
    q_items, q_groups = _ids(*q_keys)
    if queue is not None and int(queue.filled):
        qv, qi, qg = queue.contents()
        cand = torch.cat([cand, qv])
        c_items, c_groups = torch.cat([c_items, qi.cpu()]), torch.cat([c_groups, qg.cpu()])
    pos = torch.arange(B) + offset
    mask = false_negative_mask(q_items, q_groups, c_items, c_groups, pos, cfg.mask_groups)
    if not cfg.in_batch:  # the other queries' positives are not used as negatives
        mask[:, offset:offset + B] |= ~torch.eye(B, dtype=torch.bool)
    loss = info_nce(q_emb, cand, pos.to(cand.device), mask.to(cand.device), temperature, cfg.symmetric)
    assert n_fresh == len(p_emb) * (world if cfg.gather else 1)
    return Scored(loss, len(cand), fresh)
