"""A fine-tuned image tower for the visual block (``moonsearch.training.visual_tower`` trains it).

EfficientNet-Lite0's trunk with its own weights, GeM pooling (p = 3), L2 normalisation, a linear head
and L2 again: one unit vector per picture. Stored as safetensors (fp16) with the recipe in the metadata;
nothing is unpickled.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moonsearch.errors import MissingFile, UserError
from moonsearch.models import efficientnet_lite as effnet
from moonsearch.models.towers import GEM_P

ASSETS = Path(__file__).parent / "assets"
# the packaged tower (assets/tower-real-pool-v1.safetensors): the wide pool's 36 vendors, recipe
# "pairs-text-late" of benchmarks/tune_tower.py, 1,079 steps on one H200 (benchmarks/README, "Tuned tower")
TOWER = "real-pool-v1"


class TunedTower(nn.Module):
    """Lite0 trunk -> GeM -> L2 -> linear head -> L2."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.trunk = effnet.EfficientNetLite(0)
        del self.trunk._fc
        self.head = nn.Linear(effnet.FEATURE_DIM, dim)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.gem(self.trunk.feature_map(x))

    @staticmethod
    def gem(fm: torch.Tensor) -> torch.Tensor:
        return F.normalize(fm.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1 / GEM_P), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pooled(x))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(pooled).float(), dim=-1)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "TunedTower":
        m = cls(state["head.weight"].shape[0])
        m.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return m.eval()


class TunedVisual:
    """A loaded tuned tower: ``vectors(images)`` -> (n, dim) float32 unit vectors at ``size`` px.

    A tower trained with its stem and first ``frozen`` blocks frozen shares them with the pretrained
    tower: that prefix runs on the pretrained weights through ``towers.prefix_map``, so inside one
    encoding a picture that the pretrained tower already saw costs only the tuned blocks (2.6 of 14 ms
    on 2 CPU cores). The file's frozen weights must be the pretrained ones (as stored, in fp16)."""

    def __init__(self, model: TunedTower, raw: bytes, meta: dict, size: int = 160):
        self.model, self.raw, self.meta, self.size = model, raw, meta, size
        self.dim = model.head.out_features
        self.frozen = int(meta.get("recipe", {}).get("frozen_blocks", 0))
        if self.frozen:
            from moonsearch.models.towers import _effnet

            pretrained = _effnet().state_dict()  # the shared pretrained tower (loaded once per process)
            own = model.trunk.state_dict()
            for k, v in own.items():
                block = k.split(".")[1] if k.startswith("_blocks.") else None
                if (k.startswith(("_conv_stem", "_bn0")) or (block is not None and int(block) < self.frozen)) \
                        and v.is_floating_point() and not torch.equal(v, pretrained[k].half().float()):
                    raise UserError(f"tuned tower: {k} should be frozen at the pretrained weights but differs")

    @torch.inference_mode()
    def vectors(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        from moonsearch.models.towers import _effnet, pil_to_tensor, prefix_map

        out = []
        for s in range(0, len(images), batch_size):
            x = pil_to_tensor(images[s:s + batch_size], self.size, effnet.MEAN, effnet.STD)
            if self.frozen:
                fm = self.model.trunk.suffix(prefix_map(_effnet(), x, self.frozen), self.frozen)
            else:
                fm = self.model.trunk.feature_map(x)
            out.append(self.model.project(self.model.gem(fm)).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


def tower_path(name: str) -> Path:
    return ASSETS / f"tower-{name}.safetensors"


def load_tuned(name_or_path: str | Path) -> TunedVisual:
    """A packaged tuned tower by name (moonsearch/models/assets/tower-NAME.safetensors) or a file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = tower_path(str(name_or_path))
    return _load(str(path))


@lru_cache(maxsize=4)
def _load(path: str) -> TunedVisual:
    from safetensors import safe_open
    from safetensors.torch import load

    p = Path(path)
    if not p.exists():
        raise MissingFile(f"tuned image tower not found at {p}")
    raw = p.read_bytes()
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != "moonsearch-tuned-tower":
        raise UserError(f"{p}: not a moonsearch tuned tower (metadata kind {meta.get('kind')!r})")
    report = json.loads(meta.get("report", "{}"))
    return TunedVisual(TunedTower.from_state(load(raw)), raw, report)
