"""The visual block: pretrained image features kept beside a model's own vector.

Learned heads (clip-mini's, MOON's projector and experts) are fitted on the synthetic world; on real
drawings and photographs they throw away much of what the pretrained image tower knows (held-out
real artwork: raw EfficientNet-Lite0 features find the product from another artist's drawing more
often than either trained model). So every embedding carries an identity path to those features:

    vector = [ a * semantic ; b * visual ],   a = sqrt(1 - b^2)

``semantic`` is the model's L2-normalised vector (text space for clip-mini, pooled hidden states for
MOON); ``visual`` is the L2-normalised mean of the input's per-image visual vectors (zeros without
images). A per-image visual vector is the GeM-pooled EfficientNet-Lite0 feature map, L2-normalised,
centred and PCA-whitened (256 components, shrunk toward isotropy) by a transform fitted once on the
real-artwork ``fit`` split (``moonsearch fit-visual``; never on the held-out ``eval`` split).
Whitening stops a few dominant, style-bound directions (white backgrounds, line art vs flat colour)
from deciding the cosine, so objects are matched rather than drawing styles.

Both blocks are unit, so the vector is unit, except a product without photos: its norm is a, its
text scored on the same scale as every other product's. The inner product of a query and a product is
``a_q a_p <sem_q, sem_p> + b_q b_p <vis_q, vis_p>``: the weights say how much visual evidence each kind
of input brings. A text query has b = 0, so its ranking is the semantic one: a product's photos can add
to what its text says, never drown it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from moonsearch.errors import MissingFile

RAW_DIM = 1280  # EfficientNet-Lite0 pooled features
WHITENING_DIR = Path(__file__).parent / "assets"
WHITENING = "real-fit-v1"  # the packaged transform (moonsearch/models/assets/visual-real-fit-v1.safetensors)


def whitening_path(name: str) -> Path:
    return WHITENING_DIR / f"visual-{name}.safetensors"


@lru_cache(maxsize=4)
def load_whitening(name: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(mean (1280,), projection (1280, d), file bytes for fingerprints) of a packaged transform."""
    from safetensors.numpy import load

    path = whitening_path(name)
    if not path.exists():
        raise MissingFile(f"visual whitening {name!r} not found at {path}; fit it with 'moonsearch fit-visual'")
    raw = path.read_bytes()
    t = load(raw)
    return t["mean"].astype(np.float32), t["projection"].astype(np.float32), raw


def fit_whitening(feats: np.ndarray, dim: int = 256, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening of L2-normalised features: mean (D,), projection (D, dim). Eigenvalues are shrunk
    toward their mean (lambda + shrink * mean(lambda)), so rare directions are not blown up by noise."""
    from moonsearch.models.base import l2_normalize

    x = l2_normalize(feats.astype(np.float64))
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    lam = sv[:dim] ** 2 / len(x)
    proj = vt[:dim].T / np.sqrt(lam + shrink * lam.mean())
    # C order: safetensors writes the raw buffer, and the transposed SVD factor is Fortran-ordered
    return np.ascontiguousarray(mean, np.float32), np.ascontiguousarray(proj, np.float32)


@dataclass(frozen=True)
class VisualBlock:
    """Weights b of the visual block by input kind (0 turns the block's evidence off for that kind),
    and the per-image transform (``whitening``: a packaged transform's name; "" = raw average-pooled
    features, the first version of the block)."""

    product: float = 0.7071  # products with photos: semantic and visual blocks equally weighted
    image_query: float = 0.9  # photo queries lean on the visual features (chosen on the real 'fit' split)
    text_image_query: float = 0.5  # photo + words: the words take a larger share
    whitening: str = WHITENING
    crops: bool = True  # each picture is n(v(picture) + v(its core-product crop)) (the encoder's cropper)
    # a packaged fine-tuned tower (moonsearch.models.visual_tower, assets/tower-NAME.safetensors) whose
    # own unit vectors replace the pretrained tower's whitened features; "" = pretrained + ``whitening``
    tower: str = ""

    @property
    def dim(self) -> int:
        if self.tower:
            from moonsearch.models.visual_tower import load_tuned

            return load_tuned(self.tower).dim
        return load_whitening(self.whitening)[1].shape[1] if self.whitening else RAW_DIM

    def fingerprint(self) -> bytes:
        """What changes the visual vectors beyond the weights: the transform's (or tuned tower's) bytes."""
        if self.tower:
            import hashlib

            from moonsearch.models.visual_tower import load_tuned

            return b"tower:" + hashlib.sha1(load_tuned(self.tower).raw).digest()
        return load_whitening(self.whitening)[2] if self.whitening else b"raw-avg"

    def pictures(self, tower, images: list, crops: list | None = None, pooled=None) -> np.ndarray:
        """(n, dim) unit visual vectors of ``images`` (PIL); with ``crops`` (the core-product crop of each
        image, same order) each vector is the normalised sum of the picture's and its crop's: the
        product cut out of a cluttered listing photo counts as much as the whole photo. ``pooled``:
        the tower's (avg, gem) features of ``images`` when the caller already has them."""
        from moonsearch.models.base import l2_normalize

        if not images:
            return np.zeros((0, self.dim), np.float32)
        if self.tower:  # the tuned tower sees the pictures itself (the pretrained tower's features are not used)
            from moonsearch.models.visual_tower import load_tuned

            tuned = load_tuned(self.tower)
            v = tuned.vectors(images)
            if crops is not None and self.crops:
                v = l2_normalize(v + tuned.vectors(crops)).astype(np.float32)
            return v
        avg, gem = pooled if pooled is not None else tower.pooled(images)[:2]
        v = self.image_vectors(avg.numpy(), gem.numpy())
        if crops is not None and self.crops:
            a2, g2, _ = tower.pooled(crops)
            v = l2_normalize(v + self.image_vectors(a2.numpy(), g2.numpy())).astype(np.float32)
        return v

    def image_vectors(self, avg: np.ndarray, gem: np.ndarray) -> np.ndarray:
        """(n, dim) unit per-image visual vectors from the tower's pooled features."""
        from moonsearch.models.base import l2_normalize

        if not self.whitening:
            return l2_normalize(avg) if len(avg) else np.zeros((0, RAW_DIM), np.float32)
        mean, proj, _ = load_whitening(self.whitening)
        if not len(gem):
            return np.zeros((0, proj.shape[1]), np.float32)
        return l2_normalize((l2_normalize(gem) - mean) @ proj).astype(np.float32)

    def weights(self, kinds: list[str]) -> np.ndarray:
        """(n,) b per input; kinds: ``product``, ``text``, ``image``, ``text+image``."""
        table = {"product": self.product, "image": self.image_query, "text+image": self.text_image_query}
        return np.array([table.get(k, 0.0) for k in kinds], np.float32)


def group_mean(feats: np.ndarray, sizes: list[int]) -> np.ndarray:
    """(n, dv): per group, the L2-normalised mean of its L2-normalised rows (zeros for an empty group)."""
    from moonsearch.models.base import l2_normalize

    assert feats.shape[0] == sum(sizes), (feats.shape, sum(sizes))
    f = l2_normalize(feats) if len(feats) else feats
    out = np.zeros((len(sizes), feats.shape[1] if feats.ndim == 2 else RAW_DIM), np.float32)
    start = 0
    for i, g in enumerate(sizes):
        if g:
            out[i] = l2_normalize(f[start:start + g].mean(0))
        start += g
    return out


def compose(semantic: np.ndarray, visual: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[sqrt(1 - b^2) * semantic ; b * visual] -> (n, ds + dv): unit rows when both blocks are unit. A
    product without photos keeps a = sqrt(1 - b^2) on an empty visual block (norm a < 1), so a text
    query scores it exactly as it scores a product with photos: photos never change text rankings."""
    assert semantic.shape[0] == visual.shape[0] == b.shape[0], (semantic.shape, visual.shape, b.shape)
    b = b.astype(np.float32)[:, None]  # (n, 1)
    return np.concatenate([np.sqrt(1.0 - b ** 2) * semantic, b * visual], 1).astype(np.float32)


def input_kinds(texts: list, sizes: list[int], products: bool) -> list[str]:
    if products:
        return ["product"] * len(sizes)
    return [("text+image" if t else "image") if g else "text" for t, g in zip(texts, sizes)]


def fit_packaged(name: str = WHITENING, split: str = "fit", dim: int = 256, shrink: float = 1.0,
                 image_size: int = 160, log=print) -> Path:
    """Fit the visual block's whitening on the real-artwork ``split`` (products' clean pictures and
    listing photos, the query vendors' drawings; never the held-out ``eval`` split) and save it as a
    packaged transform (safetensors + metadata)."""
    from safetensors.numpy import save

    from moonsearch.data import real
    from moonsearch.errors import UserError
    from moonsearch.models.towers import ImageTower
    from moonsearch.utils.io import atomic_write_bytes

    if split == "eval":
        raise UserError("the eval split is held out: fit the visual whitening on 'fit'")
    data = real.build(split)
    images = [*data.clean, *data.listing, *(q["image"] for q in data.queries if q["modality"] == "image")]
    log(f"{len(images)} images from the {split!r} split's sources {', '.join(real.splits()[split].all_sources())}")
    _, gem, _ = ImageTower(image_size).pooled(images)
    mean, proj = fit_whitening(gem.numpy(), dim, shrink)
    meta = {"split": split, "images": str(len(images)), "dim": str(dim), "shrink": str(shrink), "pool": "gem3",
            "image_size": str(image_size), "sources": ",".join(real.splits()[split].all_sources())}
    path = whitening_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(save({"mean": mean, "projection": proj}, metadata=meta), path)
    load_whitening.cache_clear()
    saved = load_whitening(name)
    if not (np.array_equal(saved[0], mean) and np.array_equal(saved[1], proj)):  # read back what was written
        raise RuntimeError(f"{path}: the saved transform does not read back as fitted")
    return path
