"""What the trainer trains: one small interface over MOON and the CLIP baselines, so that both learn
with the same loop, data, negatives and budget.

    tm = trainable(cfg, device)
    p, aux = tm.products([Product, ...])   # (n, d) unnormalised embeddings with grad, aux loss
    q, aux = tm.queries([Query, ...])
    tm.parameters()                        # what the optimiser updates (cfg.trainable)
    tm.save(folder, meta)                  # a checkpoint the registry loads (see ``spec(folder)``)

- MOON (``moon-mini-base``, ``moon-tiny``, ``moon:<Qwen-VL>`` or a checkpoint): trainable = experts,
  gates, projector (+ LoRA with ``experts+lora``) or ``all``; checkpoint = ``moon:<folder>``.
- clip-mini: the heads W_i, W_t on its frozen towers (its trainable part; the towers' features are
  cached); checkpoint = ``clip-mini:<folder>``.
- open_clip (``clip:...``, ``clip-tiny``): the whole model; checkpoint = ``clip:<folder>`` in open_clip's
  own layout (safetensors).
"""
from __future__ import annotations

import contextlib

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moonsearch.data.images import to_rgb
from moonsearch.models.base import Product, Query, product_text
from moonsearch.trainer.config import TrainConfig
from moonsearch.utils.cache import fill_missing
from moonsearch.errors import UserError


class Trainable:
    encoder = None  # an Encoder (encode_queries / encode_products) sharing the trained weights
    module: nn.Module  # every tensor that belongs to the run's state
    dim: int

    def products(self, products: Sequence[Product]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def queries(self, queries: Sequence[Query]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # ---- served_loss: the loss scores the vector search serves -----------------------------------
    served = False  # set by the subclass from cfg.served_loss
    _frame_cache: dict

    def _serve(self, vec: torch.Tensor, inputs: list, key, frames) -> torch.Tensor:
        """[f0 * n(vec), fixed blocks]: the served vector, with the gradient flowing through the trained
        part only. ``frames(inputs)`` -> (n, 1 + fixed) from the encoder's ``frame`` (the fixed blocks
        are frozen, so each distinct input, by ``key(input)``, gets its frame once per run)."""
        if not self.served:
            return vec
        cache = self.__dict__.setdefault("_frame_cache", {})
        rows = fill_missing(cache, [key(x) for x in inputs], inputs, lambda todo: list(torch.from_numpy(frames(todo))))
        f = torch.stack(rows).to(vec.device)
        return torch.cat([f[:, :1] * F.normalize(vec.float(), dim=-1), f[:, 1:]], 1)

    def served_dim(self, trained_dim: int) -> int:
        return self.encoder.dim if self.served else trained_dim

    def new_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that start from scratch rather than from pretrained weights."""
        return []

    distills = False  # has a distillation term (cfg.distill_weight)

    def distill(self, products: Sequence[Product], queries: Sequence[Query], temperature: float,
                extra: Sequence[str] = ()) -> torch.Tensor:
        """The distillation term (cfg.distill_weight), for the models that have one (``distills``)."""
        raise NotImplementedError

    def distill_images(self, products: Sequence[Product], queries: Sequence[Query], temperature: float) -> torch.Tensor:
        """The image distillation term (cfg.distill_image_weight), for the models that have one (``distills``)."""
        raise NotImplementedError

    def warm(self, products: Sequence[Product], queries: Sequence[Query]) -> None:
        """Work that is data preparation rather than the model's forward (timed as data)."""

    def save(self, folder: Path, meta: dict, state: dict | None = None) -> str:
        """Write the checkpoint (``state``: the full weights when the module is sharded); returns the
        registry name that loads it."""
        raise NotImplementedError


def _product_key(p: Product) -> tuple:
    from moonsearch.data.images import content_key

    return ("product", p.title, tuple(p.category), tuple(sorted(p.attributes.items())),
            tuple(content_key(im) for im in p.images))


def _query_images(queries) -> list[list]:
    return [[q.image] if q.image is not None else [] for q in queries]


def _query_key(q: Query) -> tuple:
    from moonsearch.data.images import content_key

    return ("query", q.text, content_key(q.image) if q.image is not None else None)


# ---- MOON ---------------------------------------------------------------------------------------
class MoonTrainable(Trainable):
    def __init__(self, cfg: TrainConfig, device: str):
        from moonsearch.models.base import create_encoder
        from moonsearch.models.moon import builtin_config
        from moonsearch.models.moon.encoder import MoonEncoder, apply_lora, fresh_encoder

        base = builtin_config(cfg.model)
        if base is not None:
            if cfg.model_options:
                base = _with_options(base, cfg.model_options)
            if cfg.trainable == "experts+lora" and cfg.lora_rank:
                base = replace(base, lora_rank=cfg.lora_rank)  # in the config, so checkpoints reload
            self.encoder = fresh_encoder(base, cfg.model, device)
        else:
            if cfg.model_options:
                raise UserError(f"{cfg.model}: model_options apply to untrained builtin models only")
            self.encoder = create_encoder(cfg.model, device)
            if not isinstance(self.encoder, MoonEncoder):
                raise UserError(f"{cfg.model}: not a MOON encoder")
            if cfg.trainable == "experts+lora" and cfg.lora_rank and not self.encoder.cfg.lora_rank:
                apply_lora(self.encoder.model, cfg.lora_rank)
                self.encoder.model.cfg = self.encoder.cfg = replace(self.encoder.cfg, lora_rank=cfg.lora_rank)
        from moonsearch.models.moon.adapters import pad_mlp_width, uncompile, unpad_mlp_width

        unpad_mlp_width(self.encoder.model)  # trained at the checkpoint's own shapes (the encoder pads on GPUs)
        # MOONSEARCH_COMPILE stays for encoding: it now speeds up gpu_check's training step too (+15% on an
        # H200), but has not run with LoRA, gradient checkpointing and the trainer's feature cache on a GPU
        uncompile(self.encoder.model)
        self.module = self.encoder.model.to(device)
        self.served = cfg.served_loss
        self.dim = self.served_dim(self.module.dim)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.module)
        self.trainable = cfg.trainable
        if hasattr(self.module.adapter, "feature_cache"):
            self.module.adapter.feature_cache = {}  # frozen vision features, reused across steps
        if cfg.trainable != "all":
            self.module.requires_grad_(False)
            self.module.unfreeze_added()
            if cfg.trainable == "experts+lora":
                for n, p in self.module.named_parameters():
                    if "lora_" in n:
                        p.requires_grad_(True)
        elif self.encoder.cfg.freeze_vision:
            vision = getattr(self.module.adapter, "vision", None) or getattr(self.module.adapter.model, "visual")
            vision.requires_grad_(False)
        if torch.device(device).type == "cuda" and cfg.strategy != "fsdp":
            # frozen MLPs (Qwen2.5-VL's 3,420-wide vision MLP) get the encoder's aligned width back: no optimizer
            # state to meet the padding, and a 3B training step with a frozen vision tower ran 14% faster with it
            # on an H200 (benchmarks/README, "GPU check"); trainable ones stay at the checkpoint's own shapes
            pad_mlp_width(self.module, frozen_only=True)

    def new_parameters(self):
        return [p for m in self.module.new_modules() for p in m.parameters() if p.requires_grad]

    def warm(self, products, queries):
        if self.encoder.cfg.use_crops:
            n = self.encoder.cfg.max_images
            ims = [(im, p.title) for p in products for im in p.images[:n]]
            if self.encoder.cfg.crop_queries:
                ims += [(q.image, q.text or "") for q in queries if q.image is not None]
            if ims:
                self.encoder._boxes([im for im, _ in ims], [t for _, t in ims])

    def products(self, products):
        pooled, aux, _ = self.module(self.encoder.product_batch(products))
        n = self.encoder.cfg.max_images
        return self._serve(pooled, products, _product_key, lambda ps: self.encoder.frame(
            [p.title for p in ps], [list(p.images[:n]) for p in ps], [product_text(p) for p in ps], True)), aux

    def queries(self, queries):
        pooled, aux, _ = self.module(self.encoder.query_batch(queries))
        return self._serve(pooled, queries, _query_key, lambda qs: self.encoder.frame(
            [q.text for q in qs], _query_images(qs), [q.text for q in qs], False)), aux

    distills = True

    def distill(self, products, queries, temperature, extra=()):
        """KL of the batch's text similarities, MOON's toward MiniLM's: every distinct text of the step (the
        products' texts as the text block reads them, encoded as text-only products so category and
        attribute tokens meet their experts; the queries' texts; ``extra`` outside texts, as queries) once.
        A lever of issue 9: MOON's text side learned words from a few thousand synthetic pairs, MiniLM
        from a billion sentence pairs."""
        from moonsearch.models.towers import MiniLMTextTower
        from moonsearch.training.losses import similarity_kl

        texts = {}
        for p in products:
            texts.setdefault(product_text(p), ("p", Product(p.title, list(p.category), dict(p.attributes), [])))
        for t in [q.text for q in queries] + list(extra):
            if t and t.strip():
                texts.setdefault(t, ("q", Query(t, None)))
        keys = list(texts)
        prods = [x for kind, x in texts.values() if kind == "p"]
        qs = [x for kind, x in texts.values() if kind == "q"]
        parts = []
        if prods:
            parts.append(self.module(self.encoder.product_batch(prods))[0])
        if qs:
            parts.append(self.module(self.encoder.query_batch(qs))[0])
        student = F.normalize(torch.cat(parts).float(), dim=-1)
        if getattr(self, "_teacher", None) is None:
            self._teacher = self.encoder.text_tower or MiniLMTextTower(self.encoder.device)
            self._teacher_cache: dict[str, torch.Tensor] = {}
        t = fill_missing(self._teacher_cache, keys, keys, lambda todo: list(self._teacher.embed(todo)))
        return similarity_kl(student, torch.stack(t), temperature)

    def distill_images(self, products, queries, temperature):
        """KL of the batch's picture similarities, MOON's toward the visual block's tower (EfficientNet-Lite0,
        the tuned one where the block names it): the step's distinct pictures once (the products' main
        pictures and the query photos), each encoded alone as a photo query, its core-product crop beside
        it as search encodes photos. The image half of issue 9's distillation lever: MOON's image side learned
        from a few thousand synthetic pairs, the tower from ImageNet and real artwork. A product gives its
        main (first) picture only, which keeps the extra forward to about 37 pictures a step instead of 70."""
        from moonsearch.data.images import content_key
        from moonsearch.models.cropping import crop
        from moonsearch.training.losses import similarity_kl

        pics = {}
        for im in [p.images[0] for p in products if p.images] + [q.image for q in queries if q.image is not None]:
            pics.setdefault(content_key(im), im)
        keys, ims = list(pics), list(pics.values())
        if len(ims) < 2:  # no batch geometry to match
            return torch.zeros((), device=self.encoder.device)
        student = F.normalize(self.module(self.encoder.query_batch([Query(None, im) for im in ims]))[0].float(), dim=-1)
        cache = self.__dict__.setdefault("_picture_teacher", {})

        def teach(todo):
            crops = [crop(im, b) for im, b in zip(todo, self.encoder._boxes(todo, [""] * len(todo)))] \
                if self.encoder.cropper is not None else None
            return list(torch.from_numpy(self.encoder.visual.pictures(self.encoder.image_tower, todo, crops)))

        t = fill_missing(cache, keys, ims, teach)
        return similarity_kl(student, torch.stack(t), temperature)

    def save(self, folder, meta, state=None):
        from moonsearch.models.moon.encoder import save_pretrained

        # untrained builtin bases rebuild from packaged weights: store only what training changed
        save_pretrained(self.module, folder, meta=meta, trained_only=self.trainable != "all", state=state)
        return f"moon:{folder}"


def enable_checkpointing(model) -> None:
    """Hugging Face gradient checkpointing on the decoder (Qwen-VL's language model or the composed LM);
    non-reentrant, so frozen inputs with trainable experts inside still get their gradients."""
    adapter = model.adapter
    lm = getattr(adapter, "lm", None) or getattr(getattr(adapter, "model", None), "language_model", None)
    if lm is None or not hasattr(lm, "gradient_checkpointing_enable"):
        raise UserError("gradient_checkpointing: this backbone has no Hugging Face decoder to checkpoint")
    moes = list(getattr(model, "moe_layers", []))

    def context_fn():
        # the guided experts read their batch's token-type map from an attribute; a layer recomputed in
        # backward runs after later forwards (queries after products) replaced it: restore this batch's
        saved = [m.token_types for m in moes]

        @contextlib.contextmanager
        def recompute():
            current = [m.token_types for m in moes]
            for m, t in zip(moes, saved):
                m.token_types = t
            try:
                yield
            finally:
                for m, t in zip(moes, current):
                    m.token_types = t

        return contextlib.nullcontext(), recompute()

    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    lm.train()


def _with_options(base, options: dict):
    from moonsearch.models.moon.moe import MoEConfig

    opts = dict(options)
    moe = opts.pop("moe", None)
    unknown = set(opts) - set(base.to_dict())
    if unknown:
        raise UserError(f"unknown model_options: {', '.join(sorted(unknown))}")
    out = replace(base, **opts)
    if moe:
        out = replace(out, moe=replace(out.moe, **moe) if isinstance(out.moe, MoEConfig) else MoEConfig(**moe))
    return out


# ---- CLIP baselines -----------------------------------------------------------------------------
class _DualTrainable(Trainable):
    """Fusion as in DualEncoder: normalise(w_i * normalise(mean image embs) + w_t * text emb)."""

    def __init__(self, cfg: TrainConfig, device: str, trained_part):
        from moonsearch.models.base import create_encoder

        self.encoder = create_encoder(cfg.model, device)
        self.module = trained_part(self.encoder).train()  # every weight of it learns
        self.module.requires_grad_(True)
        self.served = cfg.served_loss
        # training shapes the semantic block; the visual one is fixed (and, with served_loss, scored too)
        self.dim = self.served_dim(self.encoder.semantic_dim)

    def _images(self, images) -> torch.Tensor:  # (n, d) normalised, with grad
        raise NotImplementedError

    def _texts(self, texts) -> torch.Tensor:
        raise NotImplementedError

    def _fuse(self, texts: list[str | None], image_groups: list[list]) -> torch.Tensor:
        from moonsearch.models.base import fuse

        flat = [im for g in image_groups for im in g]
        img = self._images(flat) if flat else None
        t_idx = [i for i, t in enumerate(texts) if t]
        txt = self._texts([texts[i] for i in t_idx]) if t_idx else None
        return fuse(img, [len(g) for g in image_groups], txt, [bool(t) for t in texts], self.encoder.fusion)

    def _product_texts(self, products) -> list[str | None]:
        f = self.encoder.fusion
        return [product_text(p, f.with_category, f.with_attributes) or None for p in products]

    def products(self, products):
        sem = self._fuse(self._product_texts(products), [list(p.images) for p in products])
        return self._serve(sem, products, _product_key, lambda ps: self.encoder.frame(
            self._product_texts(ps), [list(p.images) for p in ps], True)), torch.zeros(())

    def queries(self, queries):
        sem = self._fuse([q.text for q in queries], _query_images(queries))
        return self._serve(sem, queries, _query_key, lambda qs: self.encoder.frame(
            [q.text for q in qs], _query_images(qs), False)), torch.zeros(())


class ClipMiniTrainable(_DualTrainable):
    """clip-mini's heads on its frozen towers; tower outputs are cached by image content and text."""

    def __init__(self, cfg: TrainConfig, device: str):
        super().__init__(cfg, device, lambda enc: enc.heads)
        self._img: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._txt: dict[str, torch.Tensor] = {}

    def _images(self, images):
        from moonsearch.data.images import content_key

        def towers(ims):
            feats, logits = self.encoder.image_tower.features(ims)
            return list(zip(feats, logits))

        keys = [f"{content_key(im)}{im.size}{im.mode}" for im in images]
        f, lg = zip(*fill_missing(self._img, keys, images, towers))
        dev = self.encoder.device
        return self.module.image(torch.stack(f).to(dev), torch.stack(lg).to(dev))

    def _texts(self, texts):
        t = fill_missing(self._txt, texts, texts, lambda todo: list(self.encoder.text_tower.embed(todo)))
        return self.module.text(torch.stack(t).to(self.encoder.device))

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]  # w_i, w_t (class_text is a buffer)

    def save(self, folder, meta, state=None):
        from moonsearch.models.clip.mini import save_heads
        from moonsearch.utils.io import atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        save_heads(self.module, folder / "heads.safetensors", meta=meta)
        atomic_write_json({"format": "moonsearch-clip-mini/1", "meta": meta}, folder / "config.json")
        return f"clip-mini:{folder}"


class OpenClipTrainable(_DualTrainable):
    """Every weight of an open_clip model (towers and projections)."""

    def __init__(self, cfg: TrainConfig, device: str):
        super().__init__(cfg, device, lambda enc: enc.model)
        self.source = cfg.model

    def _images(self, images):
        x = torch.stack([self.encoder.preprocess(to_rgb(im)) for im in images]).to(self.encoder.device)
        return F.normalize(self.module.encode_image(x).float(), dim=-1)

    def _texts(self, texts):
        tok = self.encoder.tokenizer(list(texts)).to(self.encoder.device)
        return F.normalize(self.module.encode_text(tok).float(), dim=-1)

    def save(self, folder, meta, state=None):
        from safetensors.torch import save_file

        from moonsearch.utils.io import atomic_path, atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        spec = self.source.split(":", 1)[1] if self.source.startswith("clip:") else None
        src = Path(spec) if spec and Path(spec).is_dir() else None
        if self.source == "clip-tiny":
            from moonsearch.paths import cache_dir

            src = cache_dir() / "clip-tiny"
        if src is not None:
            conf = json.loads((src / "open_clip_config.json").read_text())
        else:
            import open_clip

            conf = {"model_cfg": open_clip.get_model_config(spec.split("/", 1)[0])}
        conf["moonsearch"] = meta
        atomic_write_json(conf, folder / "open_clip_config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        with atomic_path(folder / "open_clip_model.safetensors") as tmp:
            save_file(state, str(tmp))
        return f"clip:{folder}"


def trainable(cfg: TrainConfig, device: str) -> Trainable:
    clip = cfg.model in ("clip-mini", "clip-tiny") or cfg.model.startswith(("clip-mini:", "clip:"))
    if clip and cfg.model_options:
        raise UserError(f"{cfg.model}: model_options configure MOON models (clear them with model_options: {{}})")
    if cfg.model == "clip-mini" or cfg.model.startswith("clip-mini:"):
        return ClipMiniTrainable(cfg, device)
    if cfg.model == "clip-tiny" or cfg.model.startswith("clip:"):
        return OpenClipTrainable(cfg, device)
    return MoonTrainable(cfg, device)
