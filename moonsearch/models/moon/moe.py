"""Guided mixture of experts for decoder FFNs (MOON, section "guided MoE").

Each chosen decoder layer's FFN becomes: a category expert, an attribute expert and N general experts
with a learned top-k gate, all upcycled from the pretrained FFN (identical at initialisation, so the
model's output is unchanged until training moves them apart). Routing is guided by the token-type map:

    category tokens  -> category expert
    attribute tokens -> attribute expert
    other tokens     -> sum_{e in topk(gate(x))} softmax_topk(gate(x))_e * general_e(x)

Optionally the original FFN stays as an always-on shared expert (averaged with the routed output), and
experts can be low-rank deltas ``shared(x) + B_e A_e x`` instead of full copies (for big backbones).
The load-balancing loss (Switch Transformer) over gate-routed tokens is
``aux = N * sum_e f_e * p_e`` with f_e the share of tokens sent to e and p_e the mean gate probability.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moonsearch.models.moon.tokens import ATTRIBUTE, CATEGORY


@dataclass(frozen=True)
class MoEConfig:
    n_general: int = 2  # general experts behind the gate
    top_k: int = 1  # general experts per token
    shared_expert: bool = False  # keep the pretrained FFN as an always-on expert
    low_rank: int = 0  # >0: experts are rank-r deltas on the shared FFN instead of full copies
    layers: tuple[int, ...] | None = None  # decoder layers to convert (None = all)
    guided: bool = True  # False (an ablation): category/attribute tokens go through the gate like the rest


class LowRankExpert(nn.Module):
    """base(x) + up(down(x)); ``base`` is shared (not owned), ``up`` starts at zero."""

    def __init__(self, base: nn.Module, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self._base = [base]  # a list, so the shared FFN is not registered twice

    def forward(self, x):
        return self._base[0](x) + self.up(self.down(x))


class GuidedMoE(nn.Module):
    def __init__(self, ffn: nn.Module, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        n = 2 + cfg.n_general
        if cfg.low_rank:
            self.shared = ffn
            self.experts = nn.ModuleList(LowRankExpert(ffn, hidden, cfg.low_rank) for _ in range(n))
        else:
            self.shared = ffn if cfg.shared_expert else None
            self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(n))
        self.gate = nn.Linear(hidden, cfg.n_general, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.token_types: torch.Tensor | None = None  # (B, T), set by the encoder before each forward
        self.aux_loss = torch.zeros(())
        self.counts = torch.zeros(n, dtype=torch.long)  # tokens routed to each expert, since reset

    def unfreeze(self) -> None:
        """Make the experts and the gate trainable; low-rank experts leave the shared pretrained FFN frozen."""
        self.requires_grad_(True)
        if self.cfg.low_rank:
            self.shared.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H)
        B, T, H = x.shape
        tt = self.token_types
        if tt is None or tt.shape != (B, T):
            raise RuntimeError("GuidedMoE needs the token-type map of this batch (set .token_types)")
        flat = x.reshape(-1, H)  # (B*T, H)
        plan = _guided_plan(tt, self.cfg.guided, x.device)
        outs = []
        for e in (0, 1):  # category and attribute tokens: their expert, no gate
            if plan.sizes[e]:
                outs.append(self.experts[e](flat.index_select(0, plan.rows[e])).to(flat.dtype))
        per_gate = [0] * self.cfg.n_general  # tokens each general expert receives
        G = plan.sizes[2]
        if G:
            xs = flat.index_select(0, plan.rows[2])  # (G, H)
            probs = self.gate(xs).float().softmax(-1)  # (G, N)
            w, sel = probs.topk(self.cfg.top_k, dim=-1)  # (G, k)
            w = (w / w.sum(-1, keepdim=True)).to(xs.dtype)
            # token-sorted dispatch: each (token, chosen expert) pair, grouped by expert, so every expert runs
            # once on one contiguous slice; the per-expert sizes are this layer's one host sync
            chosen = sel.reshape(-1)
            per_expert = torch.bincount(chosen, minlength=self.cfg.n_general)
            order = chosen.argsort(stable=True)
            token = order // self.cfg.top_k
            per_gate = per_expert.tolist()
            xin = xs.index_select(0, token)
            ys = [self.experts[2 + j](part) for j, part in enumerate(xin.split(per_gate)) if per_gate[j]]
            ys = torch.cat(ys).to(xs.dtype) * w.reshape(-1, 1).index_select(0, order)
            outs.append(torch.zeros_like(xs).index_add_(0, token, ys))
            # top-k picks distinct experts, so a token counts once for each expert it reaches
            self.aux_loss = self.cfg.n_general * (per_expert.float() / G * probs.mean(0)).sum()
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        out = torch.cat(outs).index_select(0, plan.inverse)  # back to the tokens' own order
        if self.shared is not None and not self.cfg.low_rank:
            out = (out + self.shared(flat)) / 2  # the mean keeps the upcycled layer's output at init
        self.counts += torch.tensor([plan.sizes[0], plan.sizes[1], *per_gate])
        return out.reshape(B, T, H)


class _Plan(NamedTuple):
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # category, attribute, gated token rows (device)
    sizes: tuple[int, int, int]
    inverse: torch.Tensor  # position of each token in cat(category, attribute, gated) (device)


_last_plan: list = [None]  # (a copy of the token types, guided, device, plan): one batch, shared by all layers


def _guided_plan(tt: torch.Tensor, guided: bool, device: torch.device) -> _Plan:
    """Which rows of the flattened batch go to the category expert, the attribute expert and the gate.
    The token types are the same in every layer, so the split is made once per batch (on the host, where
    the encoder keeps them) and shipped to the device in one copy, instead of a sync per layer and expert.
    The cache compares the types themselves (a few thousand integers), so a new batch, or the same tensor
    changed in place, is never routed by an old split. The split is made outside inference mode, so one
    made while encoding can serve a training step (autograd keeps the index tensors)."""
    types = tt.reshape(-1).cpu()
    hit = _last_plan[0]
    if hit is not None and hit[1] == guided and hit[2] == device and torch.equal(hit[0], types):
        return hit[3]
    with torch.inference_mode(False):
        plan = _split(types, guided, device)
    _last_plan[0] = (types.clone(), guided, device, plan)
    return plan


def _split(types: torch.Tensor, guided: bool, device: torch.device) -> _Plan:
    if not guided:
        types = torch.zeros_like(types)  # an ablation: every token is routed by the gate
    groups = [(types == CATEGORY).nonzero(as_tuple=True)[0], (types == ATTRIBUTE).nonzero(as_tuple=True)[0]]
    groups.append(((types != CATEGORY) & (types != ATTRIBUTE)).nonzero(as_tuple=True)[0])
    order = torch.cat(groups)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    packed = torch.cat([order, inverse])
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    sizes = tuple(len(g) for g in groups)
    rows = tuple(packed[:len(order)].split(sizes))
    return _Plan(rows, sizes, packed[len(order):])


def convert(layers: list[nn.Module], hidden: int, cfg: MoEConfig) -> list[GuidedMoE]:
    """Replace ``layer.mlp`` by a GuidedMoE in the chosen decoder layers; returns the MoE modules."""
    chosen = range(len(layers)) if cfg.layers is None else cfg.layers
    mods = []
    for i in chosen:
        moe = GuidedMoE(layers[i].mlp, hidden, cfg)
        layers[i].mlp = moe
        mods.append(moe)
    return mods
