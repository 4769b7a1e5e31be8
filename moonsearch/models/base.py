"""The Encoder protocol every model implements, and the registry that creates encoders by name.

Contract: ``encode_queries`` and ``encode_products`` return float32 arrays of shape ``(n, encoder.dim)``,
one row per input, in input order, L2-normalised (except a product without photos under a visual
block, ``moonsearch.models.visual``: norm < 1, so that text scores it as it scores the others). A query is text, an image, or both; a product
is up to N images plus title, category path and attributes. ``fingerprint`` identifies the weights,
so an index built with one encoder refuses queries from another.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from moonsearch.errors import UnknownItem, UserError


@dataclass
class Query:
    text: str | None = None
    image: Image.Image | None = None

    def __post_init__(self):
        if not self.text and self.image is None:
            raise UserError("a query needs text, an image, or both")

    @property
    def modality(self) -> str:
        if self.text and self.image is not None:
            return "text+image"
        return "text" if self.text else "image"


@dataclass
class Product:
    title: str = ""
    category: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)
    item_id: str | None = None


def product_text(p: Product, with_category: bool = True, with_attributes: bool = True) -> str:
    """The text side of a product: ``title. category: a > b > c. key: value, key: value``."""
    parts = [p.title.strip()] if p.title else []
    if with_category and p.category:
        parts.append("category: " + " > ".join(p.category))
    if with_attributes and p.attributes:
        parts.append(", ".join(f"{k}: {v}" for k, v in p.attributes.items()))
    return ". ".join(parts)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class Encoder(ABC):
    """Base of every encoder; subclasses set ``name``, ``dim`` and ``fingerprint``."""

    name: str
    dim: int
    fingerprint: str

    @abstractmethod
    def encode_queries(self, queries: Sequence[Query], batch_size: int = 32) -> np.ndarray:
        """(n_queries, dim) float32, L2-normalised."""

    @abstractmethod
    def encode_products(self, products: Sequence[Product], batch_size: int = 32) -> np.ndarray:
        """(n_products, dim) float32, L2-normalised."""

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Plain texts (category or attribute names) embedded as text queries."""
        return self.encode_queries([Query(text=t) for t in texts], batch_size)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.fingerprint}


@dataclass
class Fusion:
    """How a CLIP-style dual encoder fuses a product's images and text into one vector.

    product = normalise(image_weight * normalise(mean_i image_emb_i) + text_weight * text_emb);
    a product with no image is its text alone, one with no text its images alone. Queries with
    both text and image are fused the same way.
    """

    image_weight: float = 1.0
    text_weight: float = 1.0
    with_category: bool = True
    with_attributes: bool = True


def fuse(img, sizes: list[int], txt, has_text: list[bool], fusion: Fusion):
    """The one fusion rule (inference and training): per input,
    ``normalise(w_img * normalise(mean of its image embeddings) + w_txt * its text embedding)``; an
    input with no image is its text alone, one with no text its images alone.

    img: (sum(sizes), d) torch tensor or None; txt: (sum(has_text), d) or None -> (len(sizes), d)."""
    import torch
    import torch.nn.functional as F

    assert len(sizes) == len(has_text)
    out, start, t = [], 0, 0
    for i, g in enumerate(sizes):
        parts = []
        if g:
            parts.append(fusion.image_weight * F.normalize(img[start:start + g].mean(0), dim=-1))
            start += g
        if has_text[i]:
            parts.append(fusion.text_weight * txt[t])
            t += 1
        if not parts:
            raise UserError(f"input {i} has neither text nor image")
        out.append(F.normalize(sum(parts), dim=-1) if len(parts) > 1 else parts[0])
    return torch.stack(out)


class DualEncoder(Encoder):
    """An encoder made of an image tower and a text tower in one space, fused by ``Fusion``; with a
    ``visual`` block (``moonsearch.models.visual``) the raw image features ride along beside it."""

    fusion: Fusion
    visual = None  # VisualBlock or None
    semantic_dim: int

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(n, semantic_dim) float32, L2-normalised."""

    @abstractmethod
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, semantic_dim) float32, L2-normalised."""

    def image_parts(self, images: Sequence[Image.Image], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """(semantic embeddings (n, semantic_dim), raw visual features (n, dv) or None)."""
        return self.embed_images(images, batch_size), None

    def _encode(self, texts: list[str | None], image_groups: list[list[Image.Image]], batch_size: int,
                products: bool) -> np.ndarray:
        from moonsearch.models.towers import shared_feature_maps

        with shared_feature_maps():  # the detector and the image tower see the same pictures
            return self._encode_all(texts, image_groups, batch_size, products)

    def _encode_all(self, texts: list[str | None], image_groups: list[list[Image.Image]], batch_size: int,
                products: bool) -> np.ndarray:
        import torch

        t_idx = [i for i, t in enumerate(texts) if t]
        t_emb = self.embed_texts([texts[i] for i in t_idx], batch_size) if t_idx else None
        flat = [im for g in image_groups for im in g]
        i_emb, feats = self.image_parts(flat, batch_size) if flat else (None, None)
        sizes = [len(g) for g in image_groups]
        sem = fuse(None if i_emb is None else torch.from_numpy(i_emb), sizes,
                   None if t_emb is None else torch.from_numpy(t_emb), [bool(t) for t in texts], self.fusion)
        return self._with_visual(sem.numpy().astype(np.float32), feats, texts, sizes, products)

    def _with_visual(self, sem: np.ndarray, feats: np.ndarray | None, texts: list, sizes: list[int],
                     products: bool) -> np.ndarray:
        from moonsearch.models import visual as vis

        if self.visual is None:
            return sem
        v = vis.group_mean(feats if feats is not None else np.zeros((0, self.visual.dim), np.float32), sizes)
        return vis.compose(sem, v, self.visual.weights(vis.input_kinds(texts, sizes, products)))

    def frame(self, texts: list[str | None], image_groups: list[list[Image.Image]], products: bool) -> np.ndarray:
        """What the served vector holds around the fused semantic vector: (n, 1 + fixed dims), column 0
        its factor, the rest the visual block as served (see MoonEncoder.frame)."""
        from moonsearch.models.towers import shared_feature_maps

        flat = [im for g in image_groups for im in g]
        with shared_feature_maps():
            feats = self.image_parts(flat)[1] if flat and self.visual is not None else None
        return self._with_visual(np.ones((len(texts), 1), np.float32), feats, texts, [len(g) for g in image_groups],
                                 products)

    def encode_queries(self, queries: Sequence[Query], batch_size: int = 32) -> np.ndarray:
        return self._encode([q.text for q in queries], [[q.image] if q.image is not None else [] for q in queries],
                            batch_size, products=False)

    def encode_products(self, products: Sequence[Product], batch_size: int = 32) -> np.ndarray:
        f = self.fusion
        texts = [product_text(p, f.with_category, f.with_attributes) or None for p in products]
        return self._encode(texts, [list(p.images) for p in products], batch_size, products=True)


# The quick start's and `moonsearch index`'s encoder: the model that wins the held-out real-artwork
# check (moonsearch bench real; benchmarks/README.md), as long as it indexes the demo in under 5 minutes.
DEFAULT_ENCODER = "moon-mini"


# --- registry --------------------------------------------------------------------------------------
_FACTORIES: list[tuple[re.Pattern, Callable[..., Encoder], str]] = []


def register(pattern: str, help: str = ""):
    """Register a factory for names matching ``pattern`` (a regex matched against the whole name).
    The factory gets the regex match's groups as arguments, plus ``device``."""

    def deco(fn):
        _FACTORIES.append((re.compile(pattern), fn, help))
        return fn

    return deco


def available() -> list[tuple[str, str]]:
    _load_builtin()
    return [(p.pattern, h) for p, _, h in _FACTORIES]


def _load_builtin() -> None:
    import moonsearch.models.clip  # noqa: F401  (registers clip-mini, clip-tiny, clip:...)
    import moonsearch.models.moon  # noqa: F401  (registers moon-mini, moon-tiny, moon:...)


def folder_spec(folder: str) -> str | None:
    """The registry name for a checkpoint folder given bare (``runs/<run>/final``), from what it holds."""
    import json
    from pathlib import Path

    f = Path(folder)
    if (f / "open_clip_config.json").exists():
        return f"clip:{folder}"
    try:
        fmt = json.loads((f / "config.json").read_text()).get("format", "")
    except (OSError, ValueError):
        return None
    if fmt.startswith("moonsearch-moon"):
        return f"moon:{folder}"
    if fmt.startswith("moonsearch-clip-mini"):
        return f"clip-mini:{folder}"
    return None


def create_encoder(name: str, device: str | None = None) -> Encoder:
    """Build an encoder by registry name, e.g. ``clip-mini``, ``clip:ViT-B-32/laion2b_s34b_b79k``, or
    a checkpoint folder the trainer wrote (``runs/<run>/final``)."""
    _load_builtin()
    if ":" not in name and ("/" in name or name.startswith(".")):
        spec = folder_spec(name)
        if spec is None:
            raise UserError(f"{name}: not a checkpoint folder (no MOON, clip-mini or open_clip config in it)")
        name = spec
    for pattern, factory, _ in _FACTORIES:
        m = pattern.fullmatch(name)
        if m:
            return factory(*m.groups(), device=device)
    names = ", ".join(p.pattern for p, _, _ in _FACTORIES)
    raise UnknownItem(f"unknown encoder {name!r}; known patterns: {names}")
