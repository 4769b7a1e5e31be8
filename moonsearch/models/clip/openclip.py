"""The CLIP dual-encoder baseline on open_clip.

Names: ``clip:<arch>/<pretrained tag>`` (e.g. ``clip:ViT-B-32/laion2b_s34b_b79k``: open_clip fetches the
weights from its hub on a machine with internet) or ``clip:<folder>`` holding ``open_clip_config.json``
(with ``model_cfg``) and a ``.safetensors`` checkpoint: the layout open_clip itself publishes. Only
safetensors are accepted from folders, so loading never unpickles a file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from moonsearch.data.images import to_rgb
from moonsearch.models.base import DualEncoder, Fusion
from moonsearch.errors import MissingFile, UserError

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIP saved in open_clip's folder layout, for fast tests of the real loading path."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_MODEL_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


class OpenClipEncoder(DualEncoder):
    def __init__(self, spec: str, device: str | None = None, fusion: Fusion | None = None):
        import open_clip

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.fusion = fusion or Fusion()
        folder = Path(spec)
        if folder.is_dir():
            weights = sorted(folder.glob("*.safetensors"))
            if not (folder / "open_clip_config.json").exists() or not weights:
                raise MissingFile(f"{folder}: a CLIP folder needs open_clip_config.json and a .safetensors "
                                        "checkpoint (pickled .bin/.pt files are refused)")
            model_name, pretrained = f"local-dir:{folder}", None
            self.fingerprint = hashlib.sha1(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]
        elif "/" in spec:
            model_name, pretrained = spec.split("/", 1)
            self.fingerprint = f"{model_name}/{pretrained}"
        else:
            raise UserError(f"clip:{spec}: expected clip:<arch>/<pretrained tag> or clip:<local folder>")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model = self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"clip:{spec}"
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])
        self.semantic_dim = self.dim

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(to_rgb(im)) for im in images[s:s + batch_size]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for s in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[s:s + batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)
