"""Token types: the map that tells the guided experts (and the pooling) what each position is."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

PAD, PROMPT, TEXT, CATEGORY, ATTRIBUTE, IMAGE, CROP = range(7)
NAMES = {PAD: "pad", PROMPT: "prompt", TEXT: "text", CATEGORY: "category", ATTRIBUTE: "attribute",
         IMAGE: "image", CROP: "crop"}
POOLED = (TEXT, CATEGORY, ATTRIBUTE, IMAGE, CROP)  # prompt boilerplate and padding are not pooled
TEXT_KINDS = (TEXT, CATEGORY, ATTRIBUTE)
IMAGE_KINDS = (IMAGE, CROP)


@dataclass
class Segment:
    """One piece of an input sequence: text of a kind, or an image (kind IMAGE or CROP)."""

    kind: int
    text: str | None = None
    image: Image.Image | None = None


def product_segments(title: str, category: list[str], attributes: dict[str, str], images: list[Image.Image],
                     crops: list[Image.Image] | None, text_first: bool = False) -> list[Segment]:
    """``Product: <img><crop>... <title> Category: <a > b > c> Attributes: <k: v, ...>``; with
    ``text_first`` the images follow the text, so (causal attention) the text positions' states are
    exactly those of the product without photos."""
    segs = [Segment(PROMPT, "Product:")]
    pics = []
    for i, img in enumerate(images):
        pics.append(Segment(IMAGE, image=img))
        if crops is not None and crops[i] is not None:
            pics.append(Segment(CROP, image=crops[i]))
    if not text_first:
        segs += pics
    if title:
        segs.append(Segment(TEXT, " " + title))
    if category:
        segs += [Segment(PROMPT, " Category:"), Segment(CATEGORY, " " + " > ".join(category))]
    if attributes:
        segs += [Segment(PROMPT, " Attributes:"),
                 Segment(ATTRIBUTE, " " + ", ".join(f"{k}: {v}" for k, v in attributes.items()))]
    return segs + pics if text_first else segs


def query_segments(text: str | None, image: Image.Image | None, crop: Image.Image | None = None) -> list[Segment]:
    """``Query: <img><crop> <text>``: queries carry no category or attribute spans."""
    segs = [Segment(PROMPT, "Query:")]
    if image is not None:
        segs.append(Segment(IMAGE, image=image))
        if crop is not None:
            segs.append(Segment(CROP, image=crop))
    if text:
        segs.append(Segment(TEXT, " " + text))
    return segs
