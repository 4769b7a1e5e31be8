"""Backbone adapters: one per model family, one interface.

``adapter.forward(batch)`` takes a batch of segment lists (see tokens.py) and returns
``(hidden (B, T, H), token_types (B, T))``: the last hidden states of ONE forward pass over images,
crops and text together, and the type of every position (PAD where padded). ``decoder_layers()`` gives
the layers whose ``.mlp`` the guided MoE may replace.

- ``QwenVLAdapter``: Qwen2-VL / Qwen2.5-VL through transformers, with their own vision tower and merger.
  Token ids are built here (text pieces tokenised separately, so every token's type is known); each
  image becomes ``<vision_start> <image_pad> x n <vision_end>`` with n = t*h*w / merge^2 from the image
  processor's grid, and ``mm_token_type_ids`` is always passed (Qwen2-VL refuses to run without it,
  Qwen2.5-VL silently drops the image positions).
- ``ComposedAdapter``: a vision tower (EfficientNet-Lite0 feature map pooled to a g x g grid) + an MLP
  projector + any Hugging Face causal LM, optionally cut to its first ``num_layers`` decoder layers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from moonsearch.data.images import to_rgb
from moonsearch.models.moon.tokens import PAD, Segment


class BackboneAdapter(ABC, nn.Module):
    hidden_size: int

    @abstractmethod
    def prepare(self, batch: Sequence[Sequence[Segment]]) -> dict:
        """Model inputs for the batch plus ``token_types`` (B, T)."""

    @abstractmethod
    def run(self, inputs: dict) -> torch.Tensor:
        """Last hidden states (B, T, H) of one forward pass over ``prepare``'s inputs."""

    def forward(self, batch: Sequence[Sequence[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (B, T, H), token_types (B, T)."""
        inputs = self.prepare(batch)
        return self.run(inputs), inputs["token_types"]

    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """Decoder layers (each with an ``.mlp``)."""

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_right(seqs: list[torch.Tensor], value) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T, *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def _uniform_window_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen-VL vision attention over equal-length chunks (every window of same-sized pictures is as long as
    the next) as ONE batched SDPA call; transformers' non-flash path runs one call per window, thousands per
    layer for a batch of products. Any other case goes to the original forward."""
    import sys

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n, total = len(lengths), hidden_states.shape[0]
    rotate = getattr(sys.modules[type(self).__module__], "apply_rotary_pos_emb_vision", None)
    if (position_embeddings is None or rotate is None or n == 0 or total % n
            or not bool((lengths == total // n).all())):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    L, H = total // n, self.num_heads
    q, k, v = self.qkv(hidden_states).reshape(total, 3, H, -1).permute(1, 0, 2, 3).unbind(0)  # (total, H, d)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)
    q, k, v = (t.reshape(n, L, H, -1).transpose(1, 2) for t in (q, k, v))  # (n, H, L, d)
    out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(total, -1))


def batch_vision_windows(model: nn.Module) -> int:
    """Route the vision attention of a Qwen2-VL / Qwen2.5-VL model (not under flash attention, which
    handles variable-length chunks itself) through ``_uniform_window_forward``; returns modules patched."""
    import types

    done = 0
    for mod in model.modules():
        name = type(mod).__name__
        if name in ("Qwen2_5_VLVisionAttention", "VisionAttention") and hasattr(mod, "qkv") \
                and "flash" not in str(getattr(mod.config, "_attn_implementation", "") or ""):
            mod.forward = types.MethodType(_uniform_window_forward, mod)
            done += 1
    return done


# a gated MLP's tensors that carry its hidden width, and the dimension that does
_MLP_WIDTH_DIMS = (("gate_proj.weight", 0), ("gate_proj.bias", 0), ("up_proj.weight", 0), ("up_proj.bias", 0),
                   ("down_proj.weight", 1))


def _fit(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``t`` at ``width`` along ``dim``: cut, or widened with zeros."""
    if t.shape[dim] >= width:
        return t.narrow(dim, 0, width).clone()
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def _mlp_state_unpadded(mod, state, prefix, local_metadata) -> None:
    """state_dict hook: write a padded MLP at its own width, so checkpoints never see the padding."""
    for name, dim in _MLP_WIDTH_DIMS:
        if prefix + name in state:
            state[prefix + name] = _fit(state[prefix + name], dim, mod._moonsearch_width)


def _mlp_state_padded(mod, state, prefix, *args) -> None:
    """load_state_dict pre-hook: widen an MLP written at its own width with zeros to the padded width."""
    for name, dim in _MLP_WIDTH_DIMS:
        if prefix + name in state and state[prefix + name].shape[dim] == mod._moonsearch_width:
            state[prefix + name] = _fit(state[prefix + name], dim, mod.gate_proj.out_features)


def _resize_mlp(mod: nn.Module, width: int) -> None:
    """Set a gated MLP's hidden width: new rows of ``gate_proj`` / ``up_proj`` and columns of ``down_proj``
    are zeros, and a smaller width drops the last ones."""
    with torch.no_grad():
        for lin, dim in ((mod.gate_proj, 0), (mod.up_proj, 0), (mod.down_proj, 1)):
            lin.weight = nn.Parameter(_fit(lin.weight, dim, width), requires_grad=lin.weight.requires_grad)
            if dim == 0 and lin.bias is not None:
                lin.bias = nn.Parameter(_fit(lin.bias, 0, width), requires_grad=lin.bias.requires_grad)
    mod.gate_proj.out_features = mod.up_proj.out_features = mod.down_proj.in_features = width
    if hasattr(mod, "intermediate_size"):
        mod.intermediate_size = width


def pad_mlp_width(model: nn.Module, multiple: int = 64, frozen_only: bool = False) -> int:
    """Widen every gated MLP (``gate_proj`` / ``up_proj`` / ``down_proj``) whose hidden width is not a multiple
    of ``multiple`` with zero rows and columns; returns the MLPs padded.

    The output is unchanged (a zero gate and up row gives act(0) * 0 = 0, and its zero down column adds
    nothing), and training leaves the padding at zero (no gradient reaches it). But the matrix products get
    aligned shapes: Qwen2.5-VL's vision MLP is 3,420 wide, a row of 3,420 bf16 values is not a multiple of
    16 bytes, and cuBLAS then falls back to slow sm80 kernels (``..._align2``). On an H200 padding it to
    3,456 lifted a 3B MOON's encoding from 21.1 to 26.3 products/s and its training step (vision frozen)
    from 11.7 to 13.4 (benchmarks/README, "GPU check").
    ``state_dict`` still writes the MLPs at their own width and ``load_state_dict`` accepts either width, so
    checkpoints never see the padding. ``frozen_only`` pads only MLPs none of whose weights train (what the
    trainer pads: optimizer state then never meets the padding)."""
    done = 0
    for mod in model.modules():
        g, u, d = (getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if not all(isinstance(x, nn.Linear) for x in (g, u, d)) or g.out_features % multiple == 0:
            continue
        if frozen_only and any(p.requires_grad for p in mod.parameters()):
            continue
        if not hasattr(mod, "_moonsearch_width"):
            mod._moonsearch_width = g.out_features
            mod._moonsearch_hooks = (mod.register_state_dict_post_hook(_mlp_state_unpadded),
                                     mod.register_load_state_dict_pre_hook(_mlp_state_padded))
        _resize_mlp(mod, -(-g.out_features // multiple) * multiple)
        done += 1
    return done


def unpad_mlp_width(model: nn.Module) -> int:
    """Undo ``pad_mlp_width`` (the trainer trains at the checkpoint's own shapes, padding again only the
    frozen MLPs, so its optimizer state and sharded saves never meet the padding); returns the MLPs
    restored."""
    done = 0
    for mod in model.modules():
        if getattr(mod, "_moonsearch_width", None) is None:
            continue
        _resize_mlp(mod, mod._moonsearch_width)
        for h in mod._moonsearch_hooks:
            h.remove()
        del mod._moonsearch_width, mod._moonsearch_hooks
        done += 1
    return done


COMPILED_PARTS = ("norm1", "norm2", "mlp", "input_layernorm", "post_attention_layernorm")


def _compiled_parts(model: nn.Module):
    for mod in model.modules():
        for attr in COMPILED_PARTS:
            sub = getattr(mod, attr, None)
            if isinstance(sub, nn.Module) and type(sub).__name__ != "GuidedMoE":
                yield sub
        if type(mod).__name__ == "GuidedMoE":
            yield from mod.experts


def compile_for_inference(model: nn.Module) -> int:
    """torch.compile the norms and MLPs of a MOON model in place (``Module.compile``, so parameter names and
    checkpoints stay as they are): fused element-wise work. The guided MoE's routing stays eager, its experts
    are compiled with dynamic shapes (their token counts change every batch). On an H200, with the MLPs
    padded, this took a 3B MOON's encoding from 26.3 to 31.7 products/s (47% of the bf16 rate) after 17 s
    of compiling, and gpu_check's training step from 13.4 to 15.4. ``MOONSEARCH_COMPILE=1`` turns it on in
    ``MoonEncoder`` on CUDA; the trainer undoes it, as it has not run with LoRA, gradient checkpointing and
    the feature cache on a GPU. Returns the modules compiled."""
    done = 0
    for sub in _compiled_parts(model):
        if sub._compiled_call_impl is None:
            sub.compile(dynamic=True)
            done += 1
    return done


def uncompile(model: nn.Module) -> int:
    """Undo ``compile_for_inference``; returns the modules restored."""
    done = 0
    for sub in _compiled_parts(model):
        if sub._compiled_call_impl is not None:
            sub._compiled_call_impl = None
            done += 1
    return done


class QwenVLAdapter(BackboneAdapter):
    """Qwen2-VL / Qwen2.5-VL (``model`` is the transformers ``*VLModel`` without the LM head)."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, image_size: int = 224):
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        cfg = model.config
        self.hidden_size = cfg.text_config.hidden_size if hasattr(cfg, "text_config") else cfg.hidden_size
        self.image_size = image_size
        self.merge = cfg.vision_config.spatial_merge_size
        self.ids = dict(image=cfg.image_token_id, start=cfg.vision_start_token_id, end=cfg.vision_end_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch_vision_windows(model)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.language_model.layers)

    def prepare(self, batch):
        ids, types, mm, images = [], [], [], []
        for segs in batch:
            i_, t_, m_ = [], [], []
            for seg in segs:
                if seg.image is not None:
                    img = to_rgb(seg.image).resize((self.image_size, self.image_size))
                    images.append(img)
                    proc = self.image_processor(images=[img], return_tensors="pt")
                    n = int(proc["image_grid_thw"][0].prod()) // self.merge ** 2
                    i_ += [self.ids["start"]] + [self.ids["image"]] * n + [self.ids["end"]]
                    t_ += [seg.kind] * (n + 2)
                    m_ += [0] + [1] * n + [0]
                else:
                    tok = self._text_ids(seg.text)
                    i_ += tok
                    t_ += [seg.kind] * len(tok)
                    m_ += [0] * len(tok)
            ids.append(torch.tensor(i_))
            types.append(torch.tensor(t_))
            mm.append(torch.tensor(m_))
        input_ids = _pad_right(ids, self.pad_id)
        token_types = _pad_right(types, PAD)
        attention = (token_types != PAD).long()
        kw = {}
        if images:
            proc = self.image_processor(images=images, return_tensors="pt")
            kw = dict(pixel_values=proc["pixel_values"].to(self.model.dtype), image_grid_thw=proc["image_grid_thw"])
        dev = self.model.device
        return dict(input_ids=input_ids.to(dev), attention_mask=attention.to(dev),
                    mm_token_type_ids=_pad_right(mm, 0).to(dev), token_types=token_types,
                    **{k: v.to(dev) for k, v in kw.items()})

    def run(self, inputs):
        kw = {k: v for k, v in inputs.items() if k != "token_types"}
        return self.model(**kw).last_hidden_state


class ComposedAdapter(BackboneAdapter):
    """Vision tower + MLP projector + causal LM decoder (``lm`` is the base model, e.g. ``LlamaModel``)."""

    def __init__(self, vision: nn.Module, vision_dim: int, lm: nn.Module, tokenizer, grid: int = 2,
                 image_size: int = 160, num_layers: int | None = None):
        super().__init__()
        self.vision, self.lm, self.tokenizer = vision, lm, tokenizer
        self.grid, self.image_size = grid, image_size
        if num_layers is not None and num_layers < len(lm.layers):
            lm.layers = nn.ModuleList(list(lm.layers)[:num_layers])  # a shallower LLM for small machines
            lm.config.num_hidden_layers = num_layers
            if hasattr(lm.config, "layer_types") and lm.config.layer_types is not None:
                lm.config.layer_types = lm.config.layer_types[:num_layers]
        self.hidden_size = lm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(vision_dim, self.hidden_size), nn.GELU(),
                                       nn.Linear(self.hidden_size, self.hidden_size))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # image content hash -> pooled features; used while the vision tower is frozen (the trainer
        # turns it on: every epoch and every validation sees the same photos again)
        self.feature_cache: dict[str, torch.Tensor] | None = None

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.lm.layers)

    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_frozen():
            self.vision.eval()  # a frozen tower keeps its batch-norm statistics
        return self

    def _pooled(self, images) -> torch.Tensor:
        from moonsearch.models import efficientnet_lite as eff
        from moonsearch.models.towers import feature_map, pil_to_tensor

        x = pil_to_tensor(images, self.image_size, eff.MEAN, eff.STD).to(self.projector[0].weight.device)
        fmap = feature_map(self.vision, x)  # (n, 1280, h, w); shared with the visual block and detector
        return nn.functional.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # (n, g*g, 1280)

    def visual_tokens(self, images) -> torch.Tensor:
        """(n, grid*grid, H): the feature map pooled to a grid, projected into the LM's space."""
        if not self.vision_frozen():
            return self.projector(self._pooled(images))
        with torch.no_grad():
            if self.feature_cache is None:
                pooled = self._pooled(images)
            else:
                from moonsearch.data.images import content_key
                from moonsearch.utils.cache import fill_missing

                keys = [f"{content_key(im)}{im.size}{im.mode}" for im in images]
                pooled = torch.stack(fill_missing(self.feature_cache, keys, images, self._pooled))
        return self.projector(pooled)

    def prepare(self, batch):
        emb = self.lm.get_input_embeddings()
        dev = emb.weight.device
        images = [seg.image for segs in batch for seg in segs if seg.image is not None]
        vis = self.visual_tokens(images) if images else None  # (n_img, g*g, H)
        seqs, types, k = [], [], 0
        for segs in batch:
            parts, t_ = [], []
            for seg in segs:
                if seg.image is not None:
                    parts.append(vis[k])
                    t_ += [seg.kind] * vis.shape[1]
                    k += 1
                else:
                    tok = torch.tensor(self._text_ids(seg.text), dtype=torch.long, device=dev)
                    parts.append(emb(tok))
                    t_ += [seg.kind] * len(tok)
            seqs.append(torch.cat(parts))
            types.append(torch.tensor(t_))
        T = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), T, self.hidden_size, dtype=seqs[0].dtype, device=dev)
        for i, s in enumerate(seqs):
            x[i, :len(s)] = s
        token_types = _pad_right(types, PAD)
        return dict(inputs_embeds=x, attention_mask=(token_types != PAD).long().to(dev), token_types=token_types)

    def run(self, inputs):
        return self.lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).last_hidden_state
