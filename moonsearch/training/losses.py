"""InfoNCE between queries and products with false-negative masking.

For query i with positive product column pos_i among candidate products j (in-batch, hard negatives,
gathered from other ranks, queued from past steps):

    loss_i = -log( exp(s_i,pos_i / t) / sum_{j not masked} exp(s_ij / t) ),   s = q @ p.T (cosine)

A candidate j != pos_i is masked (a false negative) when it is the same item as the positive or,
with ``mask_groups``, shares its group id (a variant of the same SPU). With ``symmetric`` the
product -> query direction over the batch's own queries is added and the two are averaged.

``similarity_kl`` is the distillation term (UniME-style): each row's softmax over its similarities to
the batch's other rows, the student's pulled toward a frozen teacher's by KL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(pos_item: torch.Tensor, pos_group: torch.Tensor, cand_item: torch.Tensor,
                        cand_group: torch.Tensor, pos_index: torch.Tensor, mask_groups: bool = True) -> torch.Tensor:
    """(B, P) bool: True where candidate j must not count as a negative for query i."""
    same = pos_item[:, None] == cand_item[None, :]  # (B, P)
    if mask_groups:
        same |= (pos_group[:, None] == cand_group[None, :]) & (pos_group[:, None] >= 0)
    same[torch.arange(len(pos_index)), pos_index] = False  # the positive itself stays
    return same


def info_nce(q: torch.Tensor, p: torch.Tensor, pos_index: torch.Tensor, mask: torch.Tensor | None,
             temperature: float | torch.Tensor = 0.05, symmetric: bool = False) -> torch.Tensor:
    """q (B, d), p (P, d) L2-normalised; pos_index (B,) columns of the positives; mask (B, P)."""
    logits = q @ p.T / temperature  # (B, P)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, pos_index)
    if symmetric:
        # products -> queries over the batch's positives only (other queries are in-batch negatives)
        sub = logits[:, pos_index].T  # (B, B): row b = positive product of query b against all queries
        same = pos_index[:, None] == pos_index[None, :]
        sub = sub.masked_fill(same & ~torch.eye(len(pos_index), dtype=torch.bool, device=sub.device), float("-inf"))
        loss = (loss + F.cross_entropy(sub, torch.arange(len(pos_index), device=sub.device))) / 2
    return loss


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) between the rows' similarity distributions over the
    other rows of the batch (itself excluded). ``student`` (n, d) and ``teacher`` (n, d') L2-normalised
    (the two spaces may differ: only their batch similarities are compared); zero when they agree."""
    n = len(student)
    if n < 3:
        return student.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    teacher = teacher.to(student.device, student.dtype)
    s = (student @ student.T / temperature)[off].view(n, n - 1)
    t = (teacher @ teacher.T / temperature)[off].view(n, n - 1)
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
