"""CLIP-family dual encoders: the open_clip baseline, the offline default clip-mini, a tiny random CLIP."""
from __future__ import annotations


from moonsearch.models.base import register
from moonsearch.paths import cache_dir


@register(r"clip-mini(?::(.+))?", "offline default: EfficientNet-Lite0 + MiniLM towers with fitted heads "
          "(clip-mini:<heads.safetensors> for other heads)")
def _clip_mini(heads=None, device=None):
    from moonsearch.models.clip.mini import ClipMini

    return ClipMini(heads, device)


@register(r"clip-tiny", "tiny random open_clip model for tests (built once into the cache folder)")
def _clip_tiny(device=None):
    from moonsearch.models.clip.openclip import OpenClipEncoder, save_tiny_clip
    from moonsearch.utils.io import build_folder_once

    folder = build_folder_once(cache_dir() / "clip-tiny", "open_clip_model.safetensors", save_tiny_clip)
    enc = OpenClipEncoder(str(folder), device)
    enc.name = "clip-tiny"
    return enc


@register(r"clip:(.+)", "open_clip model: clip:<arch>/<pretrained tag> or clip:<folder with safetensors>")
def _clip(spec, device=None):
    from moonsearch.models.clip.openclip import OpenClipEncoder

    return OpenClipEncoder(spec, device)
