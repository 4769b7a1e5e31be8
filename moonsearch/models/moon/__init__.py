"""MOON encoders: generative MLLM backbones with guided experts and core-product crops."""
from __future__ import annotations

from pathlib import Path

from moonsearch.models.base import register

# moon-mini: EfficientNet-Lite0 + SmolLM2-135M cut to 6 of 30 layers, 4 visual tokens per image, crops,
# guided MoE (category, attribute, 2 general experts, top-1) in every kept layer. See benchmarks/encode.py.
MINI = dict(backbone="composed", source="smollm2-135m", num_layers=6, grid=2, image_size=160)


@register(r"moon-mini", "offline MOON: EfficientNet-Lite0 + SmolLM2-135M (6 layers), guided MoE, crops")
def _moon_mini(device=None):
    from moonsearch.models.moon.encoder import MoonConfig, fresh_encoder

    return fresh_encoder(MoonConfig(**MINI), "moon-mini", device)


@register(r"moon-tiny", "tiny random Qwen2-VL with guided MoE, for tests (built once into the cache folder)")
def _moon_tiny(device=None):
    from moonsearch.models.clip import cache_dir
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl
    from moonsearch.models.moon.encoder import MoonConfig, fresh_encoder

    folder = cache_dir() / "tiny-qwen2-vl"
    if not (folder / "config.json").exists():
        save_tiny_qwen_vl(folder)
    return fresh_encoder(MoonConfig(backbone="qwen-vl", source=str(folder), image_size=56, cropper="centre"),
                         "moon-tiny", device)


@register(r"moon:(.+)", "moon:<checkpoint folder> (config.json + model.safetensors), or moon:<Qwen-VL hub id "
          "or folder> for an untrained MOON on that backbone")
def _moon(spec, device=None):
    from moonsearch.models.moon.encoder import MoonConfig, fresh_encoder, is_checkpoint, load_pretrained

    if Path(spec).is_dir() and is_checkpoint(Path(spec)):
        return load_pretrained(spec, device)
    return fresh_encoder(MoonConfig(backbone="qwen-vl", source=spec, image_size=224), f"moon:{spec}", device)
