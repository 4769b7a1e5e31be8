"""MOON encoders: generative MLLM backbones with guided experts and core-product crops."""
from __future__ import annotations

from pathlib import Path

from moonsearch.models.base import register
from moonsearch.errors import MissingFile

ASSETS = Path(__file__).parent / "assets"
MINI_CHECKPOINT = ASSETS / "moon-mini"  # trained weights only (experts, gates, projector, LoRA): a few MB

# moon-mini-base: EfficientNet-Lite0 + SmolLM2-135M cut to 6 of 30 layers, 4 visual tokens per image, crops,
# guided MoE (category, attribute, 2 general experts, top-1; rank-32 experts on the shared pretrained FFN)
# in every kept layer. See benchmarks/encode.py. The shipped moon-mini keeps 9 layers (its checkpoint's
# config says so; preset moon-mini-deep), the deepest cut that indexes the demo in under 5 minutes here.
# Pooling and the visual block as measured on the real-artwork fit split (benchmarks/README.md): text and
# image positions pooled apart, the text first, whitened EfficientNet features beside the pooled vector.
MINI = dict(backbone="composed", source="smollm2-135m", num_layers=6, grid=2, image_size=160, pool="split",
            text_first=True, visual_product=0.7071, text_block=0.55, visual_tower="real-pool-v1")
MINI_MOE = dict(low_rank=32)

# MoonConfig fields that only say how a trained model is served, not what training changed: pooling (the
# shipped moon-mini trains with split pooling and serves blocks) and the fixed visual and text blocks
SERVED_FIELDS = ("pool", "text_pool_weight", "image_to_text_weight", "text_block", "visual_product",
                 "visual_image_query", "visual_text_image_query", "visual_whitening", "visual_crops", "visual_tower")


def serving_settings(checkpoint: Path) -> dict:
    """SERVED_FIELDS as the MOON checkpoint folder ``checkpoint`` has them (a field it lacks is served
    at MoonConfig's default)."""
    import json

    ref = json.loads((Path(checkpoint) / "config.json").read_text())["moon"]
    return {k: ref[k] for k in SERVED_FIELDS if k in ref}


def served_as(moon: dict, checkpoint: Path) -> dict:
    """A checkpoint config's ``moon`` section with ``checkpoint``'s serving settings: its SERVED_FIELDS
    copied, and the ones it lacks dropped (so both get the default)."""
    kept = serving_settings(checkpoint)
    return {**{k: v for k, v in moon.items() if k not in SERVED_FIELDS}, **kept}


def builtin_config(name: str):
    """The MoonConfig behind a builtin untrained name (``moon-mini-base``, ``moon-tiny``) or a Qwen-VL
    id/folder (``moon:<id>``); None for checkpoints and other encoders."""
    from moonsearch.models.moon.encoder import MoonConfig, is_checkpoint
    from moonsearch.models.moon.moe import MoEConfig

    if name == "moon-mini-base":
        return MoonConfig(**MINI, moe=MoEConfig(**MINI_MOE))
    if name == "moon-tiny":
        return MoonConfig(backbone="qwen-vl", source=str(_tiny_folder()), image_size=56, cropper="centre")
    if name.startswith("moon:") and not (Path(name[5:]).is_dir() and is_checkpoint(Path(name[5:]))):
        return MoonConfig(backbone="qwen-vl", source=name[5:], image_size=224)
    return None


def _tiny_folder() -> Path:
    from moonsearch.paths import cache_dir
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl
    from moonsearch.utils.io import build_folder_once

    # its last file marks it finished: spawned ranks that ask at once never load a half-written folder
    return build_folder_once(cache_dir() / "tiny-qwen2-vl", "preprocessor_config.json", save_tiny_qwen_vl)


@register(r"moon-mini", "offline MOON, trained: EfficientNet-Lite0 + SmolLM2-135M (9 layers), guided MoE, crops "
          "(weights from 'moonsearch train --preset moon-mini-deep', committed)")
def _moon_mini(device=None):
    from moonsearch.models.moon.encoder import load_pretrained

    if not (MINI_CHECKPOINT / "config.json").exists():
        raise MissingFile(f"moon-mini's trained weights are missing ({MINI_CHECKPOINT}); rebuild them with "
                                "'moonsearch train --preset moon-mini-deep --publish'")
    return load_pretrained(MINI_CHECKPOINT, device, name="moon-mini")


@register(r"moon-mini-base", "moon-mini before training (pretrained towers, upcycled experts, seeded projector)")
def _moon_mini_base(device=None):
    from moonsearch.models.moon.encoder import fresh_encoder

    return fresh_encoder(builtin_config("moon-mini-base"), "moon-mini-base", device)


@register(r"moon-tiny", "tiny random Qwen2-VL with guided MoE, for tests (built once into the cache folder)")
def _moon_tiny(device=None):
    from moonsearch.models.moon.encoder import fresh_encoder

    return fresh_encoder(builtin_config("moon-tiny"), "moon-tiny", device)


@register(r"moon:(.+)", "moon:<checkpoint folder> (config.json + model.safetensors), or moon:<Qwen-VL hub id "
          "or folder> for an untrained MOON on that backbone")
def _moon(spec, device=None):
    from moonsearch.models.moon.encoder import fresh_encoder, is_checkpoint, load_pretrained

    if Path(spec).is_dir() and is_checkpoint(Path(spec)):
        return load_pretrained(spec, device)
    return fresh_encoder(builtin_config(f"moon:{spec}"), f"moon:{spec}", device)
