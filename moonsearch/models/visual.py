"""The visual block: raw pretrained image features kept beside a model's own vector.

Learned heads (clip-mini's, MOON's projector and experts) are fitted on the synthetic world; on real
drawings and photographs they throw away much of what the pretrained image tower knows (held-out
real artwork: raw EfficientNet-Lite0 features find the product from another artist's drawing more
often than either trained model). So every embedding carries an identity path to those features:

    vector = [ a * semantic ; b * visual ],   a = sqrt(1 - b^2)

``semantic`` is the model's L2-normalised vector (text space for clip-mini, pooled hidden states for
MOON); ``visual`` is the L2-normalised mean of the L2-normalised pooled EfficientNet-Lite0 features
of the input's images (zeros without images). Both blocks are unit, so the vector is unit, except a
product without photos: its norm is a, its text scored on the same scale as every other product's. The inner
product of a query and a product is ``a_q a_p <sem_q, sem_p> + b_q b_p <vis_q, vis_p>``: the weights
say how much raw visual evidence each kind of input brings. A text query has b = 0, so its ranking
is the semantic one: a product's photos can add to what its text says, never drown it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VISUAL_DIM = 1280  # EfficientNet-Lite0 pooled features


@dataclass(frozen=True)
class VisualBlock:
    """Weights b of the visual block by input kind (0 turns the block's evidence off for that kind)."""

    product: float = 0.7071  # products with photos: semantic and visual blocks equally weighted
    image_query: float = 0.7  # photo queries lean on the raw features (tuned on the real 'fit' split)
    text_image_query: float = 0.5  # photo + words: the words take a larger share
    dim: int = VISUAL_DIM

    def weights(self, kinds: list[str]) -> np.ndarray:
        """(n,) b per input; kinds: ``product``, ``text``, ``image``, ``text+image``."""
        table = {"product": self.product, "image": self.image_query, "text+image": self.text_image_query}
        return np.array([table.get(k, 0.0) for k in kinds], np.float32)


def group_mean(feats: np.ndarray, sizes: list[int]) -> np.ndarray:
    """(n, dv): per group, the L2-normalised mean of its L2-normalised rows (zeros for an empty group)."""
    from moonsearch.models.base import l2_normalize

    assert feats.shape[0] == sum(sizes), (feats.shape, sum(sizes))
    f = l2_normalize(feats) if len(feats) else feats
    out = np.zeros((len(sizes), feats.shape[1] if feats.ndim == 2 else VISUAL_DIM), np.float32)
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
