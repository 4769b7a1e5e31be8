"""A memory estimate per rank for a training config, before any weight is loaded (``train --dry-run``).

Parameter counts come from the backbone's shape (its ``config.json`` when the source is a local folder
or already in the Hugging Face cache, else the shapes below for the named Qwen-VL releases) and from
the MOON additions (guided-MoE experts: full FFN copies or rank-r deltas; gates; LoRA). Bytes:

- weights: float32 (the trainer keeps float32 parameters and runs bf16 autocast on CUDA); with
  ``strategy: fsdp`` every parameter tensor is sharded over the ranks;
- gradients (float32) + AdamW's two moments (float32) for the trainable parameters only;
- activations of one micro-batch (global batch / ranks / grad_accum queries, as many products, plus as
  many hard negatives) at the sequence length of a product with its photos and crops: with gradient
  checkpointing one decoder layer's activations plus every layer's input, else every layer's
  (Korthikanti et al.'s 34 s b h + 5 a s^2 b bytes per layer in 16-bit).

It is an estimate (allocator slack, the vision tower's activations and the CUDA context come on top,
counted as a fixed 10% + 2 GB); the point is to see a 9.7B-expert config fail on paper, not on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3

# text decoder and vision tower shapes of the released checkpoints (their config.json values)
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2,
                                        vocab=151936, v_hidden=1280, v_intermediate=3420, v_depth=32),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                                        vocab=152064, v_hidden=1280, v_intermediate=3420, v_depth=32),
    "Qwen/Qwen2-VL-2B-Instruct": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                                      vocab=151936, v_hidden=1280, v_intermediate=5120, v_depth=32, v_gated=False),
}


@dataclass
class Estimate:
    params_backbone: int
    params_experts: int
    params_trainable: int
    seq_len: int
    micro_batch: int
    gb: dict  # component -> GB per rank

    @property
    def total_gb(self) -> float:
        return sum(self.gb.values())


def shape_of(source: str) -> dict:
    """The backbone's shape from its config.json (local folder or HF cache), else KNOWN_SHAPES."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # not local: the released shapes we know
        if source in KNOWN_SHAPES:
            return KNOWN_SHAPES[source]
        from moonsearch.errors import UserError

        raise UserError(f"{source}: no local config.json and not one of {', '.join(KNOWN_SHAPES)}; "
                        "download the model folder first, or give a local folder") from None
    t = getattr(c, "text_config", c)
    v = getattr(c, "vision_config", None)
    return dict(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers,
                heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, vocab=t.vocab_size,
                v_depth=getattr(v, "depth", 0) if v else 0, **_vision_width(v))


def _vision_width(v) -> dict:
    """Qwen2-VL's vision config names the ViT width ``embed_dim`` (``hidden_size`` is the merger's output)
    and has a plain GELU MLP of ``mlp_ratio``; Qwen2.5-VL's has ``hidden_size`` and a gated MLP."""
    if v is None:
        return dict(v_hidden=0, v_intermediate=0, v_gated=True)
    if getattr(v, "model_type", "").startswith("qwen2_vl") or hasattr(v, "embed_dim"):
        return dict(v_hidden=v.embed_dim, v_intermediate=int(v.embed_dim * v.mlp_ratio), v_gated=False)
    return dict(v_hidden=v.hidden_size, v_intermediate=v.intermediate_size, v_gated=True)


def backbone_params(s: dict) -> int:
    """Decoder (embeddings, attention with biases on q/k/v, gated FFN, norms) + vision tower (attention,
    FFN, merger), as in Qwen2-VL / Qwen2.5-VL, without the LM head (MOON pools hidden states)."""
    h, i, L, kv = s["hidden"], s["intermediate"], s["layers"], s["kv_heads"] * (s["hidden"] // s["heads"])
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    layer = attn + 3 * h * i + 2 * h
    text = s["vocab"] * h + L * layer + h  # MOON holds the *VLModel: no LM head, tied or not
    vh, vi = s["v_hidden"], s["v_intermediate"]
    vision = 0
    if vh:
        mlp = 3 * vh * vi if s.get("v_gated", True) else 2 * vh * vi + vi + vh
        vision = s["v_depth"] * (4 * vh * vh + 4 * vh + mlp + 4 * vh) + 3 * 14 * 14 * 2 * vh
        vision += (4 * vh) * (4 * vh) + (4 * vh) * h  # patch merger
    return text + vision


def estimate(tc, world: int = 1, gradient_checkpointing: bool | None = None, images: int = 2,
             text_tokens: int = 96) -> Estimate:
    """Per-rank memory of TrainConfig ``tc`` on ``world`` ranks (see the module docstring)."""
    from moonsearch.models.moon import builtin_config
    from moonsearch.trainer.models import _with_options

    mc = builtin_config(tc.model)
    if mc is None:
        from moonsearch.errors import UserError

        raise UserError(f"{tc.model}: the dry-run estimate covers untrained MOON models (moon-mini-base, moon:<Qwen-VL>)")
    if tc.model_options:
        mc = _with_options(mc, tc.model_options)
    if mc.backbone == "qwen-vl":
        s = shape_of(mc.source)
    else:  # composed: SmolLM2-135M cut to num_layers (EfficientNet tower frozen, ~4.6M)
        s = dict(hidden=576, intermediate=1536, layers=mc.num_layers or 30, heads=9, kv_heads=3, vocab=49152,
                 v_hidden=0, v_intermediate=0, v_depth=0)
    h, i, L = s["hidden"], s["intermediate"], s["layers"]
    moe_layers = len(mc.moe.layers) if mc.moe.layers is not None else L
    n_experts = 2 + mc.moe.n_general  # category, attribute, general ones
    per_expert = 2 * h * mc.moe.low_rank if mc.moe.low_rank else 3 * h * i
    experts = (moe_layers * (n_experts * per_expert + h * mc.moe.n_general)) if mc.use_moe else 0
    lora_rank = tc.lora_rank if tc.trainable == "experts+lora" else 0
    kvd = s["kv_heads"] * (h // s["heads"])
    lora = L * lora_rank * ((h + h) * 2 + (h + kvd) * 2) if lora_rank else 0
    backbone = backbone_params(s)
    trainable = backbone + experts + lora if tc.trainable == "all" else experts + lora
    total = backbone + experts + lora
    shard = world if tc.strategy == "fsdp" else 1
    micro = max(1, tc.batch_size // max(1, world) // max(1, tc.grad_accum))
    crops = 2 if mc.use_crops else 1
    # visual tokens per picture: Qwen-VL merges 2x2 patches of 14 px; the composed backbone has grid^2
    image_tokens = (mc.image_size // 14) ** 2 // 4 if mc.backbone == "qwen-vl" else mc.grid ** 2
    seq = images * crops * image_tokens + text_tokens
    seqs = micro * (3 if tc.hard_negatives else 2)  # queries, products, hard negatives (upper bound: all long)
    ckpt = gradient_checkpointing if gradient_checkpointing is not None else tc.gradient_checkpointing
    per_layer = seq * seqs * h * 34 + 5 * s["heads"] * seq * seq * seqs
    acts = (L * seq * seqs * h * 2 + per_layer) if ckpt else L * per_layer
    gb = {"weights (fp32)": 4 * total / shard / GB, "gradients (fp32)": 4 * trainable / shard / GB,
          "AdamW moments (fp32)": 8 * trainable / shard / GB, "activations (bf16)": acts / GB}
    gb["slack (10% + 2 GB)"] = 0.1 * sum(gb.values()) + 2.0
    return Estimate(backbone, experts, trainable, seq, micro, gb)
