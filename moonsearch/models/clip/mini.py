"""clip-mini: the offline default dual encoder, built from real pretrained towers shipped on PyPI.

image -> EfficientNet-Lite0 features f (1280) and ImageNet probabilities p (1000)
text  -> all-MiniLM-L6-v2 sentence embedding t (384)

    text_emb  = normalise(W_t t)
    image_emb = normalise(W_t bridge(f) + W_i f),   bridge(f) = normalise(p @ E)

E (1000, 384) are the MiniLM embeddings of "a photo of a <ImageNet class name>": the bridge places any
photo in the text space through the classes it resembles (running shoe, backpack, coffee mug, ...),
so clip-mini works on real photographs it never saw. W_t starts as the identity and W_i as zero, i.e.
at initialisation clip-mini is exactly the zero-shot bridge; fitting on the synthetic world
(``moonsearch.trainer.clip_mini``) teaches W_i what the bridge cannot see (colour, pattern, style),
while a penalty on ||W_i f|| for real photographs keeps the bridge in charge off the synthetic domain.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from moonsearch.models.base import DualEncoder, Fusion
from moonsearch.models.towers import ImageTower, MiniLMTextTower
from moonsearch.models.visual import WHITENING, VisualBlock
from moonsearch.models.visual_tower import TOWER
from moonsearch.errors import MissingFile

ASSETS = Path(__file__).parent / "assets"
HEADS_FILE = ASSETS / "clip_mini_heads.safetensors"
BRIDGE_PROMPT = "a photo of a {}"


@dataclass(frozen=True)
class MiniConfig:
    image_size: int = 160  # EfficientNet input side; 160 is 3x faster than 224 on 2 CPU cores
    dim: int = 384  # shared space = MiniLM's space, so W_t can start as the identity
    bridge_temperature: float = 1.0  # softmax temperature on ImageNet logits
    image_weight: float = 1.0
    text_weight: float = 1.0
    # the raw EfficientNet-Lite0 features beside the text-space vector (moonsearch.models.visual);
    # 0 for products turns the block off. Heads files written before it existed get these defaults.
    visual_product: float = 0.7071
    visual_image_query: float = 0.9
    visual_text_image_query: float = 0.5
    visual_whitening: str = WHITENING  # per-image transform of the visual block ("" = raw average-pooled)
    visual_crops: bool = True  # a picture's visual vector = n(picture + its detector crop)
    visual_tower: str = TOWER  # the packaged fine-tuned image tower of the block (replaces the whitening; "" = none)


class MiniHeads(nn.Module):
    """The trainable part of clip-mini: W_i (1280 -> dim), W_t (384 -> dim) and the bridge table."""

    def __init__(self, cfg: MiniConfig, class_text: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.w_i = nn.Linear(1280, cfg.dim, bias=False)
        self.w_t = nn.Linear(384, cfg.dim, bias=False)
        nn.init.zeros_(self.w_i.weight)
        with torch.no_grad():
            self.w_t.weight.copy_(torch.eye(cfg.dim, 384))
        self.register_buffer("class_text", class_text.float())  # (1000, 384)

    def bridge(self, logits: torch.Tensor) -> torch.Tensor:
        p = (logits / self.cfg.bridge_temperature).softmax(-1)  # (n, 1000)
        return nn.functional.normalize(p @ self.class_text, dim=-1)  # (n, 384)

    def image(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z = self.w_t(self.bridge(logits)) + self.w_i(feats)  # (n, dim)
        return nn.functional.normalize(z, dim=-1)

    def text(self, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.w_t(t), dim=-1)  # (n, dim)


def save_heads(heads: MiniHeads, path: Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    from moonsearch.utils.io import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    state["class_text"] = state["class_text"].half()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(asdict(heads.cfg)), "meta": json.dumps(meta or {})})


def load_heads(path: Path) -> tuple[MiniHeads, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = MiniConfig(**json.loads(md.get("config", "{}")))
    heads = MiniHeads(cfg, state["class_text"].float())
    state["class_text"] = state["class_text"].float()
    heads.load_state_dict(state)
    return heads.eval(), json.loads(md.get("meta", "{}"))


def initial_heads(cfg: MiniConfig = MiniConfig(), text: MiniLMTextTower | None = None) -> MiniHeads:
    """Heads at initialisation: the pure ImageNet bridge (W_i = 0, W_t = I)."""
    from moonsearch.models.efficientnet_lite import imagenet_class_names

    text = text or MiniLMTextTower()
    names = [BRIDGE_PROMPT.format(n) for n in imagenet_class_names()]
    return MiniHeads(cfg, text.embed(names))


class ClipMini(DualEncoder):
    def __init__(self, heads_path: str | Path | None = None, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(heads_path) if heads_path else HEADS_FILE
        if path.is_dir():  # a trainer checkpoint folder (moonsearch train --preset clip-finetune)
            path = path / "heads.safetensors"
        if not path.exists():
            raise MissingFile(f"clip-mini heads not found at {path}; build them with "
                                    "'moonsearch fit-clip-mini' (about 3 minutes on 2 cores)")
        self.heads, self.meta = load_heads(path)
        self.heads.to(self.device)
        cfg = self.heads.cfg
        self.fusion = Fusion(cfg.image_weight, cfg.text_weight)
        self.visual = VisualBlock(cfg.visual_product, cfg.visual_image_query, cfg.visual_text_image_query,
                                  cfg.visual_whitening, cfg.visual_crops, cfg.visual_tower) if cfg.visual_product > 0 else None
        self.cropper = None
        if self.visual and self.visual.crops:  # the core-product detector (a box head on the same tower)
            from moonsearch.models.cropping import make_cropper

            self.cropper = make_cropper("detector")
        self.image_tower = ImageTower(cfg.image_size, self.device)
        self.text_tower = MiniLMTextTower(self.device)
        self.name = "clip-mini" if path == HEADS_FILE else f"clip-mini:{path}"
        self.semantic_dim = cfg.dim
        self.dim = cfg.dim + (self.visual.dim if self.visual else 0)
        # everything that changes the vectors: the weights and the effective config (defaults included)
        h = hashlib.sha1(path.read_bytes())
        h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
        if self.visual:
            h.update(self.visual.fingerprint())
        if self.cropper is not None:
            from moonsearch.models.cropping import cropper_fingerprint

            h.update(cropper_fingerprint("detector"))
        self.fingerprint = h.hexdigest()[:16]

    @torch.inference_mode()
    def image_parts(self, images: Sequence[Image.Image], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        feats, gem, logits = self.image_tower.pooled(images, batch_size)
        emb = self.heads.image(feats.to(self.device), logits.to(self.device)).cpu().numpy().astype(np.float32)
        if not self.visual:
            return emb, None
        crops = None
        if self.cropper is not None:
            from moonsearch.models.cropping import crop

            crops = [crop(im, b) for im, b in zip(images, self.cropper.boxes(list(images)))]
        return emb, self.visual.pictures(self.image_tower, list(images), crops, pooled=(feats, gem))

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.image_parts(images, batch_size)[0]

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        t = self.text_tower.embed(texts, batch_size).to(self.device)
        return self.heads.text(t).cpu().numpy().astype(np.float32)
