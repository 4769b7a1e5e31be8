"""The MOON encoder: images, their core-product crops and the text in ONE forward pass of a generative
MLLM; the representation is the masked mean of the last hidden states (padding and prompt boilerplate
excluded), optionally projected, then L2-normalised.

Checkpoints are folders: ``config.json`` (this MoonConfig, the backbone source included) and
``model.safetensors`` (the whole MoonModel state dict). ``moonsearch index --model moon:<folder>``
loads one; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from moonsearch.models.base import Encoder, Product, Query, product_text
from moonsearch.models.moon import moe as moe_mod
from moonsearch.models.moon.tokens import IMAGE_KINDS, POOLED, TEXT_KINDS, product_segments, query_segments
from moonsearch.errors import UserError

FORMAT = "moonsearch-moon/1"


@dataclass(frozen=True)
class MoonConfig:
    backbone: str = "composed"  # "composed" (vision tower + projector + causal LM) or "qwen-vl"
    source: str = "smollm2-135m"  # LM (composed) or Qwen-VL model: hub id, local folder, or a builtin name
    num_layers: int | None = 6  # composed: keep the first N decoder layers (None: all)
    grid: int = 2  # composed: visual tokens per image = grid * grid
    image_size: int = 160
    max_images: int = 4
    use_crops: bool = True  # feed the core-product crop of every image after the image
    crop_queries: bool = True  # query photos get their crop too (with use_crops), as product photos do
    cropper: str = "detector"  # core-product cropper: detector (trained box head), saliency, centre, grounding
    grounding_source: str = ""  # cropper grounding: Qwen-VL hub id / folder ("" = the qwen-vl backbone's source)
    use_moe: bool = True
    moe: moe_mod.MoEConfig = field(default_factory=moe_mod.MoEConfig)
    projection_dim: int | None = None  # None: the hidden size, no projection
    lora_rank: int = 0  # >0: peft LoRA on the LLM's attention projections
    freeze_vision: bool = True
    seed: int = 0  # initialisation of the new parts (projector, gates)
    # pooling: "mean" (the paper: one mean over every text and image position) or "split": the text
    # and the image positions averaged apart and weighted, normalise(w * n(text) + (1-w^2)^.5 * n(image)),
    # so that a product's many image tokens cannot swamp its few text tokens; or "blocks": text and image
    # means side by side in two blocks, [w * n(text), (1-w^2)^.5 * n(image)] for an input with both, so a
    # text-only query scores the product's text block alone and photos can never move a product's rank for
    # its own text (with text_first the product's text states never see its photos). A text-only input is
    # [n(text), 0]; an image-only one [a * n(image), (1-a^2)^.5 * n(image)] (a = image_to_text_weight:
    # photo queries still meet the product's text block, as they were trained to)
    pool: str = "mean"
    text_pool_weight: float = 0.9
    image_to_text_weight: float = 0.7071
    text_first: bool = False  # product text before its images (text states then never see the photos)
    # the visual block (moonsearch.models.visual): raw EfficientNet-Lite0 features beside the pooled
    # vector; visual_product = 0 turns it off
    visual_product: float = 0.0
    visual_image_query: float = 0.9
    visual_text_image_query: float = 0.5
    visual_whitening: str = "real-fit-v1"  # per-image transform (moonsearch.models.visual; "" = raw average-pooled)
    visual_crops: bool = True  # visual vector of a picture = n(picture + its core-product crop) (with use_crops)
    visual_tower: str = ""  # a packaged fine-tuned image tower for the block (replaces the whitening; "" = none)
    # the text block: the pretrained MiniLM sentence embedding (moonsearch.models.towers.MiniLMTextTower)
    # of the input's text beside everything above, [(1-c^2)^.5 * v, c * m(text)]: product text = title,
    # category, attributes; a query without text gets an empty block, so a photo query scores every
    # product's MOON + visual part scaled by the same factor. A residual path to what MiniLM knows about
    # words (the LM cut learned its text side from 3,200 synthetic pairs). 0 turns it off
    text_block: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe"]["layers"] = list(self.moe.layers) if self.moe.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoonConfig":
        d = dict(d)
        m = dict(d.pop("moe", {}))
        if m.get("layers") is not None:
            m["layers"] = tuple(m["layers"])
        return cls(**d, moe=moe_mod.MoEConfig(**m))


class MoonModel(nn.Module):
    """adapter -> (guided MoE inside) -> masked mean pool -> optional projection."""

    def __init__(self, cfg: MoonConfig, adapter):
        super().__init__()
        self.cfg, self.adapter = cfg, adapter
        torch.manual_seed(cfg.seed)
        # a plain list: the modules are registered once, inside the decoder layers they replace
        self.moe_layers: list[moe_mod.GuidedMoE] = (
            moe_mod.convert(adapter.decoder_layers(), adapter.hidden_size, cfg.moe) if cfg.use_moe else [])
        self.projection = nn.Linear(adapter.hidden_size, cfg.projection_dim, bias=False) \
            if cfg.projection_dim else None
        self.dim = (cfg.projection_dim or adapter.hidden_size) * (2 if cfg.pool == "blocks" else 1)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> pooled (B, dim) unnormalised, aux load-balancing loss (scalar), token types (B, T)."""
        inputs = self.adapter.prepare(batch)
        token_types = inputs["token_types"]  # (B, T)
        for m in self.moe_layers:
            m.token_types = token_types  # the map that guides the experts
        hidden = self.adapter.run(inputs)  # (B, T, H)
        pooled = self.pool(hidden, token_types)  # (B, H), or (B, 2H) with blocks (projected per block)
        aux = sum((m.aux_loss for m in self.moe_layers), torch.zeros((), device=hidden.device))
        return pooled, aux, token_types

    def pool(self, hidden: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, H) or (B, 2H) with blocks, by ``cfg.pool`` (see MoonConfig);
        the projection head, when there is one, is applied to each pooled mean."""
        def masked_mean(kinds):
            m = torch.isin(token_types, torch.tensor(kinds)).to(hidden.device).unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)
            return (self.projection(mean) if self.projection is not None else mean), m.sum(1) > 0

        if self.cfg.pool == "mean":
            return masked_mean(POOLED)[0]
        if self.cfg.pool not in ("split", "blocks"):
            raise UserError(f"pool: {self.cfg.pool!r} is not one of 'mean', 'split', 'blocks'")
        (t, has_t), (i, has_i) = masked_mean(TEXT_KINDS), masked_mean(IMAGE_KINDS)
        t, i = nn.functional.normalize(t, dim=-1) * has_t, nn.functional.normalize(i, dim=-1) * has_i
        w = self.cfg.text_pool_weight
        if self.cfg.pool == "blocks":
            both = (has_t & has_i).to(hidden.dtype)
            a = self.cfg.image_to_text_weight
            only_i = (has_i & ~has_t).to(hidden.dtype)
            text_block = t * (both * w + (1 - both)) + i * only_i * a
            image_block = i * (both * (1 - w * w) ** 0.5 + only_i * (1 - a * a) ** 0.5)
            return torch.cat([text_block, image_block], dim=-1)
        wt = torch.where(has_i, torch.full_like(has_t, w, dtype=hidden.dtype), torch.ones_like(t[:, :1]))
        wi = torch.where(has_t, torch.full_like(has_i, (1 - w * w) ** 0.5, dtype=hidden.dtype),
                         torch.ones_like(i[:, :1]))
        return wt * t + wi * i

    def new_modules(self) -> list[nn.Module]:
        """Parts that start from scratch: the image projector, the projection head, the expert gates."""
        mods = [getattr(self.adapter, "projector", None), self.projection] + [m.gate for m in self.moe_layers]
        return [m for m in mods if m is not None]

    def unfreeze_added(self) -> None:
        """Make what MOON adds to the backbone trainable: the experts (a low-rank expert's shared
        pretrained FFN stays frozen), the gates, the image projector and the projection head."""
        for m in self.moe_layers:
            m.unfreeze()
        for m in self.new_modules():
            m.requires_grad_(True)

    def routing_stats(self, reset: bool = False) -> dict[str, list[int]]:
        """Tokens per expert per converted layer (category, attribute, general_1..N)."""
        out = {f"layer{i}": m.counts.tolist() for i, m in enumerate(self.moe_layers)}
        if reset:
            for m in self.moe_layers:
                m.counts.zero_()
        return out


def with_text_block(vecs: np.ndarray, m: np.ndarray, has_text: np.ndarray, c: float, products: bool) -> np.ndarray:
    """[(1-c^2)^.5 vecs ; c m] per row. Every product gets the factor (its m is zeros when it has no text
    at all), so the block never rescales one product against another; a query without text stays
    [vecs, 0], a unit row that ranks as vecs does."""
    w = np.full((len(vecs), 1), c, np.float32)
    if not products:
        w[~np.asarray(has_text, bool)] = 0.0
    return np.concatenate([np.sqrt(1 - w * w) * vecs, w * m], 1).astype(np.float32)


class MoonEncoder(Encoder):
    def __init__(self, model: MoonModel, name: str, fingerprint: str, device: str | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        if str(self.device).startswith("cuda"):
            # aligned MLP widths for the GPU's fast matrix kernels; the outputs and checkpoints stay the same
            from moonsearch.models.moon.adapters import compile_for_inference, pad_mlp_width

            pad_mlp_width(self.model)
            if os.environ.get("MOONSEARCH_COMPILE", "").lower() in ("1", "true", "yes"):
                compile_for_inference(self.model)
        self.name, self.fingerprint = name, fingerprint
        self.semantic_dim = model.dim
        self.visual = None
        if self.cfg.visual_product > 0:
            from moonsearch.models.towers import ImageTower
            from moonsearch.models.visual import VisualBlock

            self.visual = VisualBlock(self.cfg.visual_product, self.cfg.visual_image_query,
                                      self.cfg.visual_text_image_query, self.cfg.visual_whitening,
                                      self.cfg.visual_crops, self.cfg.visual_tower)
            self.image_tower = ImageTower(self.cfg.image_size, self.device)
        self.dim = model.dim + (self.visual.dim if self.visual else 0)
        self.text_tower = None
        if self.cfg.text_block > 0:
            from moonsearch.models.towers import MiniLMTextTower

            if not self.cfg.text_block < 1:
                raise UserError(f"text_block: {self.cfg.text_block} is not in [0, 1)")
            self.text_tower = MiniLMTextTower(self.device)
            self.dim += self.text_tower.dim
        from moonsearch.models.cropping import make_cropper

        grounding = self.cfg.grounding_source or (self.cfg.source if self.cfg.backbone == "qwen-vl" else "")
        self.cropper = make_cropper(self.cfg.cropper, grounding, self.device) if self.cfg.use_crops else None
        self.boxes: dict[str, tuple] = {}  # image content hash -> core box: each image is cropped once
        self._box_file: Path | None = None

    def use_crop_cache(self, path: str | Path) -> None:
        """Persist core boxes in a JSON-lines file (the indexer keeps one per index and cropper)."""
        self._box_file = Path(path)
        if self._box_file.exists():
            for line in self._box_file.read_text().splitlines():
                try:
                    d = json.loads(line)
                    self.boxes[d["image"]] = tuple(d["box"])
                except (ValueError, KeyError):
                    continue  # a torn last line after a crash

    def _boxes(self, images, titles) -> list[tuple]:
        """Core boxes of ``images``: cached ones reused, the rest found in one batch when the cropper
        supports it (and appended to the crop cache file)."""
        from moonsearch.data.images import content_key
        from moonsearch.utils.cache import fill_missing
        from moonsearch.utils.io import append_jsonl

        keys = [f"{self.cropper.name}:" + content_key(im) for im in images]
        missing = [k for k in dict.fromkeys(keys) if k not in self.boxes]

        def find(pairs):
            if hasattr(self.cropper, "boxes"):
                found = self.cropper.boxes([im for im, _ in pairs])
            else:
                found = [self.cropper.box(im, t) for im, t in pairs]
            return [tuple(int(v) for v in b) for b in found]

        out = fill_missing(self.boxes, keys, list(zip(images, titles)), find)
        if missing and self._box_file is not None:
            append_jsonl([{"image": k, "box": list(self.boxes[k])} for k in missing], self._box_file)
        return out

    def _crops(self, images, title):
        from moonsearch.models.cropping import crop

        if not self.cfg.use_crops:
            return None
        return [crop(im, b) for im, b in zip(images, self._boxes(images, [title] * len(images)))]

    def product_batch(self, products: Sequence[Product]):
        from moonsearch.models.cropping import crop

        imgs = [list(p.images[:self.cfg.max_images]) for p in products]
        crops: list = [None] * len(products)
        if self.cfg.use_crops:  # every box of the batch in one go
            boxes = iter(self._boxes([im for ims in imgs for im in ims],
                                     [p.title for p, ims in zip(products, imgs) for _ in ims]))
            crops = [[crop(im, next(boxes)) for im in ims] for ims in imgs]
        return [product_segments(p.title, p.category, p.attributes, ims, c, self.cfg.text_first)
                for p, ims, c in zip(products, imgs, crops)]

    @torch.inference_mode()
    def _run(self, batches) -> np.ndarray:
        vecs = [nn.functional.normalize(self.model(b)[0].float(), dim=-1).cpu().numpy() for b in batches]
        return np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, self.semantic_dim), np.float32)

    def _with_visual(self, sem: np.ndarray, texts: list, image_groups: list[list], products: bool) -> np.ndarray:
        """The visual block beside the pooled vector (moonsearch.models.visual), when configured."""
        if self.visual is None:
            return sem
        from moonsearch.models import visual as vis

        flat = [im for g in image_groups for im in g]
        crops = None
        if flat and self.visual.crops and self.cropper is not None:  # boxes are cached: found once per image
            from moonsearch.models.cropping import crop

            titles = [t or "" for t, g in zip(texts, image_groups) for _ in g]
            crops = [crop(im, b) for im, b in zip(flat, self._boxes(flat, titles))]
        feats = self.visual.pictures(self.image_tower, flat, crops)
        sizes = [len(g) for g in image_groups]
        return vis.compose(sem, vis.group_mean(feats, sizes), self.visual.weights(vis.input_kinds(texts, sizes, products)))

    def _with_text(self, vecs: np.ndarray, texts: list, products: bool) -> np.ndarray:
        """The text block beside ``vecs`` (MoonConfig.text_block), when configured (see with_text_block)."""
        if self.text_tower is None:
            return vecs
        m, has = self.text_tower.embed_present(texts)
        return with_text_block(vecs, m, has, self.cfg.text_block, products)

    def frame(self, texts: list, image_groups: list[list], block_texts: list, products: bool) -> np.ndarray:
        """What the served vector holds around its trained part: (n, 1 + fixed dims), column 0 the factor
        the unit pooled vector is served with, the rest the fixed blocks (visual, text) as served. The
        blocks are concatenations, linear in the pooled vector, so served = [f0 * pooled, f[1:]]
        (``served_loss`` training scores exactly what search scores). ``texts``: the titles (products)
        or query texts; ``block_texts``: what the text block reads (product_text / the query text)."""
        from moonsearch.models.towers import shared_feature_maps

        one = np.ones((len(texts), 1), np.float32)
        with shared_feature_maps():
            return self._with_text(self._with_visual(one, texts, image_groups, products), block_texts, products)

    def encode_products(self, products: Sequence[Product], batch_size: int = 8) -> np.ndarray:
        from moonsearch.models.towers import shared_feature_maps

        with shared_feature_maps():  # detector, vision tokens and visual block share each picture's pass
            return self._encode_products(list(products), batch_size)

    def _encode_products(self, products: list[Product], batch_size: int) -> np.ndarray:
        sem = self._run(self.product_batch(products[s:s + batch_size]) for s in range(0, len(products), batch_size))
        vecs = self._with_visual(sem, [p.title for p in products],
                                 [list(p.images[:self.cfg.max_images]) for p in products], products=True)
        return self._with_text(vecs, [product_text(p) for p in products], products=True)

    def query_batch(self, queries: Sequence[Query]):
        from moonsearch.models.cropping import crop

        crops: list = [None] * len(queries)
        if self.cfg.use_crops and self.cfg.crop_queries:
            have = [k for k, q in enumerate(queries) if q.image is not None]
            boxes = self._boxes([queries[k].image for k in have], [queries[k].text or "" for k in have])
            for k, b in zip(have, boxes):
                crops[k] = crop(queries[k].image, b)
        return [query_segments(q.text, q.image, c) for q, c in zip(queries, crops)]

    def encode_queries(self, queries: Sequence[Query], batch_size: int = 16) -> np.ndarray:
        from moonsearch.models.towers import shared_feature_maps

        with shared_feature_maps():
            return self._encode_queries(list(queries), batch_size)

    def _encode_queries(self, queries: list[Query], batch_size: int) -> np.ndarray:
        sem = self._run(self.query_batch(queries[s:s + batch_size]) for s in range(0, len(queries), batch_size))
        vecs = self._with_visual(sem, [q.text for q in queries],
                                 [[q.image] if q.image is not None else [] for q in queries], products=False)
        return self._with_text(vecs, [q.text for q in queries], products=False)


# ---- building and checkpoints -------------------------------------------------------------------
def build_model(cfg: MoonConfig, device: str | None = None) -> MoonModel:
    from moonsearch.models.moon.backbones import build_adapter

    adapter = build_adapter(cfg)
    model = MoonModel(cfg, adapter)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank)
    return model


def apply_lora(model: MoonModel, rank: int) -> None:
    """peft LoRA on the LLM's attention projections (q, k, v, o)."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = model.adapter.lm if hasattr(model.adapter, "lm") else model.adapter.model.language_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]), lm)
    model.unfreeze_added()  # peft froze everything it did not add; MOON's own parts are trained too


def save_pretrained(model: MoonModel, folder: str | Path, meta: dict | None = None, trained_only: bool = False,
                    dtype: torch.dtype | None = None, state: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors``. With ``trained_only`` only the parameters that
    training changes are stored (those with requires_grad: experts, gates, projector, LoRA); loading
    rebuilds the rest from the backbone's packaged weights, which is what keeps moon-mini's trained
    checkpoint a few MB. ``dtype`` (e.g. float16) shrinks the stored floating-point tensors. ``state``
    replaces ``model.state_dict()`` (the gathered full weights of a sharded model)."""
    from safetensors.torch import save_file

    from moonsearch.utils.io import atomic_path, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    if trained_only:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
        if not state:
            raise ValueError("trained_only: no parameter requires grad, nothing to save")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    atomic_write_json({"format": FORMAT, "moon": model.cfg.to_dict(), "weights": "trained" if trained_only else "all",
                       "meta": meta or {}}, folder / "config.json")
    return folder


def is_checkpoint(folder: Path) -> bool:
    f = folder / "config.json"
    return f.exists() and json.loads(f.read_text()).get("format") == FORMAT


def load_pretrained(folder: str | Path, device: str | None = None, name: str | None = None) -> MoonEncoder:
    from safetensors.torch import load_file

    folder = Path(folder)
    conf = json.loads((folder / "config.json").read_text())
    cfg = MoonConfig.from_dict(conf["moon"])
    model = build_model(cfg)
    weights = folder / "model.safetensors"
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in load_file(str(weights)).items()}
    if conf.get("weights") == "trained":  # the rest comes from the backbone's own weights
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise UserError(f"{weights}: tensors the model does not have: {', '.join(unexpected[:5])}")
    else:
        model.load_state_dict(state, strict=True)
    return MoonEncoder(model, name or f"moon:{folder}", vector_fingerprint(cfg, weights.read_bytes()), device)


def fresh_encoder(cfg: MoonConfig, name: str, device: str | None = None) -> MoonEncoder:
    """An encoder from the backbone's pretrained weights plus seeded new parts (not trained yet)."""
    model = build_model(cfg)
    return MoonEncoder(model, name, "init-" + vector_fingerprint(cfg), device)


def vector_fingerprint(cfg: MoonConfig, weights: bytes = b"") -> str:
    """Everything that changes the vectors: the weights, the effective config (defaults included:
    cropper, crops, pooling, visual block) and the detector head when the detector crops."""
    h = hashlib.sha1(weights)
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    if cfg.visual_product > 0 and (cfg.visual_whitening or cfg.visual_tower):
        from moonsearch.models.visual import VisualBlock

        h.update(VisualBlock(whitening=cfg.visual_whitening, tower=cfg.visual_tower).fingerprint())
    if cfg.use_crops:
        from moonsearch.models.cropping import cropper_fingerprint

        h.update(cropper_fingerprint(cfg.cropper))
    return h.hexdigest()[:16]


__all__ = ["MoonConfig", "MoonModel", "MoonEncoder", "save_pretrained", "load_pretrained"]
