"""Rendering one synthetic product photo: body fill, pose, background, clutter and overlays.

``render(spec, rng, size, kind)`` returns ``(RGB image, core box)``; the box is the ground-truth
bounding box of the sold product in pixel coordinates ``(x0, y0, x1, y1)``. ``kind`` is ``"listing"``
(catalog photos, often noisy) or ``"query"`` (a user's fresh photo: no promo text, other poses).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from moonsearch.data.shapes import DRAWERS
from moonsearch.data.world import COLOURS, LEAVES, PATTERNS, PROMO_TEXTS, ProductSpec

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field",
          "retina", "immunohistochemistry", "motorcycle")


@lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    """Real photographs shipped with scikit-image, used as cluttered backgrounds."""
    return [photo(name) for name in PHOTOS]


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A real photograph by name, RGB uint8: scikit-image's, or matplotlib's ``grace_hopper``."""
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


@lru_cache(maxsize=4)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _rgb(rng, base, jitter=18):
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


def make_fill(spec: ProductSpec, rng: np.random.Generator, s: int) -> Image.Image:
    """Colour + pattern + material texture as an RGBA square of side ``s``."""
    base = np.array(_rgb(rng, COLOURS[spec.colour][0], 8), dtype=np.float32)
    img = np.ones((s, s, 3), np.float32) * base
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    accent = np.array([245, 245, 245] if base.mean() < 128 else [30, 30, 30], np.float32)
    period = 0.12
    if spec.pattern == "striped":
        m = (np.floor((xx + yy * 0.3) / period) % 2 == 0)
        img[m] = img[m] * 0.35 + accent * 0.65
    elif spec.pattern == "dotted":
        m = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period * 0.28) ** 2
        img[m] = accent
    elif spec.pattern == "checked":
        m = ((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0)
        img[m] = img[m] * 0.55 + accent * 0.45
    mat = spec.material
    if mat in ("knit", "denim", "canvas", "cotton"):
        freq = {"knit": 40, "denim": 70, "canvas": 55, "cotton": 90}[mat]
        img *= (0.9 + 0.1 * np.sin(xx * freq * np.pi) * np.sin(yy * freq * np.pi))[..., None]
        img += rng.normal(0, 6, img.shape)
    elif mat == "leather":
        img *= 0.85 + 0.15 * rng.random((s, s, 1))
    elif mat == "wood":
        img *= (0.8 + 0.2 * np.sin(yy * 40 + 3 * np.sin(xx * 6)))[..., None]
    elif mat in ("metal", "glossy", "glass", "ceramic"):
        sheen = np.exp(-((xx - 0.3) ** 2) / 0.02)[..., None] * (0.6 if mat in ("metal", "glossy") else 0.3)
        img = img * (1 - sheen) + 255 * sheen
    elif mat == "matte":
        img *= 0.93
    alpha = np.full((s, s, 1), 170 if mat == "glass" else 255, np.float32)
    return Image.fromarray(np.concatenate([np.clip(img, 0, 255), alpha], -1).astype(np.uint8), "RGBA")


def product_layer(spec: ProductSpec, rng: np.random.Generator, s: int, angle: float) -> Image.Image:
    """The product alone on a transparent tile, rotated by ``angle`` degrees."""
    detail = tuple(int(c * 0.45) for c in COLOURS[spec.colour][0]) + (255,)
    tile = DRAWERS[spec.leaf](s, make_fill(spec, rng, s), detail, spec.style)
    return tile.rotate(angle, resample=Image.BICUBIC, expand=False)


def _background(rng, size, kind_weights) -> Image.Image:
    kind = rng.choice(["white", "gradient", "cluttered", "photo"], p=kind_weights)
    if kind == "white":
        return Image.new("RGB", (size, size), _rgb(rng, (245, 245, 245), 10))
    if kind == "gradient":
        a, b = np.array(_rgb(rng, (200, 200, 210), 50)), np.array(_rgb(rng, (120, 120, 140), 60))
        t = np.linspace(0, 1, size)[:, None, None]
        arr = (a * (1 - t) + b * t) * np.ones((1, size, 1))
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "photo":
        photo = _photos()[int(rng.integers(len(_photos())))]
        h, w = photo.shape[:2]
        c = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        return Image.fromarray(photo[y:y + c, x:x + c]).resize((size, size), Image.BILINEAR)
    img = Image.new("RGB", (size, size), _rgb(rng, (225, 220, 210), 25))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 20, size // 5))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:
            d.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=col)
    return img


def _distractor_spec(rng, spec: ProductSpec) -> ProductSpec:
    leaves = [k for k in LEAVES if k != spec.leaf]
    return ProductSpec("", "", str(rng.choice(leaves)), str(rng.choice(list(COLOURS))),
                       str(rng.choice(PATTERNS)), "cotton", int(rng.integers(2)), "", "")


def render(spec: ProductSpec, rng: np.random.Generator, size: int = 160, kind: str = "listing",
           backgrounds: list[float] | None = None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One photo of ``spec``; returns (RGB image, core box in pixels).

    ``backgrounds``: probabilities of white, gradient, cluttered and photographic backgrounds."""
    if kind == "listing":
        img = _background(rng, size, backgrounds or [0.3, 0.15, 0.2, 0.35])
        scale = rng.uniform(0.45, 0.9)
    else:
        img = _background(rng, size, backgrounds or [0.15, 0.15, 0.2, 0.5])
        scale = rng.uniform(0.55, 0.95)
    noisy = rng.random() < (0.5 if kind == "listing" else 0.3)
    # distractors first so the core product is on top of them
    if noisy:
        for _ in range(int(rng.integers(1, 3))):
            ds = int(size * rng.uniform(0.25, 0.45))
            layer = product_layer(_distractor_spec(rng, spec), rng, ds, float(rng.uniform(-30, 30)))
            img.paste(layer, (int(rng.integers(-ds // 4, size - ds * 3 // 4)),
                              int(rng.integers(-ds // 4, size - ds * 3 // 4))), layer)
    if kind == "listing" and rng.random() < 0.1:  # several units of the product in one picture
        for _ in range(int(rng.integers(1, 3))):
            ds = int(size * rng.uniform(0.25, 0.4))
            layer = product_layer(spec, rng, ds, float(rng.uniform(-20, 20)))
            img.paste(layer, (int(rng.integers(0, size - ds)), int(rng.integers(0, size - ds))), layer)
    ps = int(size * scale)
    layer = product_layer(spec, rng, ps, float(rng.uniform(-20, 20)))
    ox = int(rng.integers(min(0, size - ps), max(1, size - ps + 1)))
    oy = int(rng.integers(min(0, size - ps), max(1, size - ps + 1)))
    img.paste(layer, (ox, oy), layer)
    bb = layer.getchannel("A").getbbox() or (0, 0, ps, ps)
    box = (max(0, bb[0] + ox), max(0, bb[1] + oy), min(size, bb[2] + ox), min(size, bb[3] + oy))
    if kind == "listing" and rng.random() < 0.3:
        d = ImageDraw.Draw(img)
        text = str(rng.choice(PROMO_TEXTS))
        fs = int(size * rng.uniform(0.08, 0.16))
        x, y = int(rng.integers(0, size // 2)), int(rng.integers(0, size - fs))
        if rng.random() < 0.5:
            d.rectangle([x - 2, y - 2, x + fs * len(text) * 0.62, y + fs * 1.2], fill=(220, 20, 30))
        d.text((x, y), text, fill=(255, 255, 255) if rng.random() < 0.6 else (255, 230, 0), font=_font(fs))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.15))
    return img, box
