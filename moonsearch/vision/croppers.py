"""Core-product croppers: image (+ title) -> box -> crop.

- ``CentreCropper``: the central 70% (a baseline).
- ``SaliencyCropper``: classical and offline; estimates the background from the border pixels and
  boxes the pixels that differ from it (robust percentiles, so specks of clutter do not stretch it).
- ``GroundingCropper``: the paper's way; asks a Qwen2-VL / Qwen2.5-VL model for the box of the product
  named by the title. Its answer is parsed by ``parse_box``; a malformed, empty or out-of-range answer
  falls back to another cropper instead of failing.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the given image.
"""
from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from moonsearch.data.images import to_rgb
from moonsearch.errors import UserError
from moonsearch.models.cropping import Box, Cropper, crop, make_cropper, register_cropper  # noqa: F401 (re-exported)


class CentreCropper:
    name = "centre"

    def __init__(self, share: float = 0.7):
        self.share = share

    def box(self, image, title=""):
        w, h = image.size
        m = (1 - self.share) / 2
        return int(w * m), int(h * m), int(w * (1 - m)), int(h * (1 - m))


class SaliencyCropper:
    name = "saliency"

    def __init__(self, side: int = 96, low: float = 3, high: float = 97):
        self.side, self.low, self.high = side, low, high

    def box(self, image, title=""):
        w, h = image.size
        a = np.asarray(to_rgb(image).resize((self.side, self.side)), np.float32)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (4*side, 3)
        bg = np.median(border, axis=0)
        dist = np.linalg.norm(a - bg, axis=-1)  # (side, side)
        thr = max(30.0, float(np.percentile(np.linalg.norm(border - bg, axis=-1), 90)))
        ys, xs = np.nonzero(dist > thr)
        if len(xs) < 0.01 * self.side ** 2:
            return CentreCropper().box(image)
        sx, sy = w / self.side, h / self.side
        x0, x1 = np.percentile(xs, [self.low, self.high])
        y0, y1 = np.percentile(ys, [self.low, self.high])
        return int(x0 * sx), int(y0 * sy), int(min(w, (x1 + 1) * sx)), int(min(h, (y1 + 1) * sy))


_NUM = r"-?\d+(?:\.\d+)?"


def parse_box(answer: str, width: int, height: int, min_area: float = 0.01) -> Box | None:
    """A box from a grounding answer, or None when the answer is unusable.

    Understands Qwen2.5-VL's JSON (``[{"bbox_2d": [x0, y0, x1, y1], ...}]``, absolute pixels),
    Qwen2-VL's ``<|box_start|>(x0,y0),(x1,y1)<|box_end|>`` (0-1000 scale) and a bare list of four
    numbers (pixels; 0-1 values are taken as fractions). Out-of-range corners are clipped when the
    overshoot is small; reversed, degenerate, tiny or far-outside boxes are rejected.
    """
    if not answer:
        return None
    nums, scale = None, None
    m = re.search(r"<\|box_start\|>\s*\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)\s*,\s*\(\s*(" + _NUM +
                  r")\s*,\s*(" + _NUM + r")\s*\)", answer)
    if m:
        nums, scale = [float(v) for v in m.groups()], (width / 1000, height / 1000)
    if nums is None:
        jm = re.search(r"\[\s*\{.*\}\s*\]|\{.*\}", answer, re.S)
        if jm:
            try:
                obj = json.loads(jm.group(0))
                obj = obj[0] if isinstance(obj, list) and obj else obj
                cand = obj.get("bbox_2d") or obj.get("bbox") or obj.get("box") if isinstance(obj, dict) else None
                if isinstance(cand, list) and len(cand) == 4 and all(isinstance(v, (int, float)) for v in cand):
                    nums = [float(v) for v in cand]
            except (json.JSONDecodeError, AttributeError, TypeError):
                nums = None
    if nums is None:
        m = re.search(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]",
                      answer)
        if m:
            nums = [float(v) for v in m.groups()]
    if nums is None:
        return None
    if scale is None:
        scale = (width, height) if all(0 <= v <= 1 for v in nums) else (1.0, 1.0)
    x0, y0, x1, y1 = nums[0] * scale[0], nums[1] * scale[1], nums[2] * scale[0], nums[3] * scale[1]
    tol_x, tol_y = 0.1 * width, 0.1 * height
    if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
        return None
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < min_area * width * height:
        return None
    return int(x0), int(y0), int(round(x1)), int(round(y1))


class GroundingCropper:
    """Asks a Qwen-VL model (``Qwen2_5_VLForConditionalGeneration`` or Qwen2-VL) for the product's box."""

    name = "grounding"
    PROMPT = ("Locate the main product for sale in this image: \"{title}\". "
              "Output its bbox coordinates in JSON format.")

    def __init__(self, model, processor, fallback: Cropper | None = None, max_new_tokens: int = 64):
        self.model, self.processor = model, processor
        self.fallback = fallback or SaliencyCropper()
        self.max_new_tokens = max_new_tokens
        self.fallbacks = 0  # how often the answer was unusable

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu", **kw) -> "GroundingCropper":
        """A Qwen2-VL / Qwen2.5-VL generative model (hub id or local folder) and its processor."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source).to(device).eval()
        if model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise UserError(f"{source}: grounding needs a Qwen2-VL or Qwen2.5-VL model, not {model.config.model_type!r}")
        return cls(model, processor, **kw)

    def answer(self, image: Image.Image, title: str) -> str:
        import torch

        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.PROMPT.format(title=title)}]}]
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:  # a processor saved without its template: Qwen-VL's own chat layout
            prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                      f"{self.PROMPT.format(title=title)}<|im_end|>\n<|im_start|>assistant\n")
        inputs = self.processor(text=[prompt], images=[image], return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=False)[0]

    def box(self, image, title=""):
        try:
            text = self.answer(image, title)
        except Exception:  # a generation failure must not stop indexing; the fallback box is used
            text = ""
        b = parse_box(text, *image.size)
        if b is None:
            self.fallbacks += 1
            return self.fallback.box(image, title)
        return b


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _detector():
    from moonsearch.vision.detector import DetectorCropper

    return DetectorCropper()


def _detector_head() -> bytes:
    from moonsearch.vision.detector import HEAD_FILE

    return HEAD_FILE.read_bytes() if HEAD_FILE.exists() else b""


register_cropper("centre", CentreCropper)
register_cropper("saliency", SaliencyCropper)
register_cropper("detector", _detector, _detector_head)
register_cropper("grounding", GroundingCropper.from_pretrained, needs_source=True)
