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
        types = tt.reshape(-1).to(x.device)
        if not self.cfg.guided:
            types = torch.zeros_like(types)  # every token is routed by the gate
        out = torch.zeros_like(flat)
        counts = torch.zeros(len(self.experts), dtype=torch.long)
        for e, kind in ((0, CATEGORY), (1, ATTRIBUTE)):
            idx = (types == kind).nonzero(as_tuple=True)[0]
            if len(idx):
                out[idx] = self.experts[e](flat[idx]).to(out.dtype)
                counts[e] += len(idx)
        gidx = ((types != CATEGORY) & (types != ATTRIBUTE)).nonzero(as_tuple=True)[0]
        if len(gidx):
            xs = flat[gidx]  # (G, H)
            probs = self.gate(xs).float().softmax(-1)  # (G, N)
            w, sel = probs.topk(self.cfg.top_k, dim=-1)  # (G, k)
            w = (w / w.sum(-1, keepdim=True)).to(xs.dtype)
            acc = torch.zeros_like(xs)
            for j in range(self.cfg.n_general):
                hit = (sel == j)  # (G, k)
                rows = hit.any(-1).nonzero(as_tuple=True)[0]
                if len(rows):
                    acc[rows] += (w[rows] * hit[rows]).sum(-1, keepdim=True) * self.experts[2 + j](xs[rows])
                    counts[2 + j] += len(rows)
            out[gidx] = acc.to(out.dtype)
            frac = torch.stack([(sel == j).any(-1).float().mean() for j in range(self.cfg.n_general)])
            self.aux_loss = self.cfg.n_general * (frac * probs.mean(0)).sum()
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        if self.shared is not None and not self.cfg.low_rank:
            out = (out + self.shared(flat)) / 2  # the mean keeps the upcycled layer's output at init
        self.counts += counts.to(self.counts.device)
        return out.reshape(B, T, H)


def convert(layers: list[nn.Module], hidden: int, cfg: MoEConfig) -> list[GuidedMoE]:
    """Replace ``layer.mlp`` by a GuidedMoE in the chosen decoder layers; returns the MoE modules."""
    chosen = range(len(layers)) if cfg.layers is None else cfg.layers
    mods = []
    for i in chosen:
        moe = GuidedMoE(layers[i].mlp, hidden, cfg)
        layers[i].mlp = moe
        mods.append(moe)
    return mods
