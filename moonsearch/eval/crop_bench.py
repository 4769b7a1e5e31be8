"""Core-product cropper evaluation: mean IoU and hit rate (IoU >= 0.5) against ground-truth boxes.

Held-out noisy listing photos (a seed the demo and clip-mini's fitting never use), in two sets:
real photographic backgrounds only (scikit-image's photos), and the listing mix; and a third set of
real artwork (``real_split``: the real-artwork check's listing photos, a real drawing pasted into a
real photograph beside two drawings of the same vendor, with the box it was pasted into). Baselines:
no crop (the whole image) and a centre crop.
"""
from __future__ import annotations

import numpy as np

from moonsearch.data.render import render
from moonsearch.data.synthetic import sample_specs
from moonsearch.models.cropping import cropper_names, make_cropper
from moonsearch.vision.croppers import iou


class NoCrop:
    name = "no crop"

    def box(self, image, title=""):
        return 0, 0, *image.size


def evaluate(n: int = 300, seed: int = 777, size: int = 160, croppers=None, real_split: str | None = "fit") -> list[dict]:
    croppers = croppers or [NoCrop(), *(make_cropper(name) for name in cropper_names(offline=True))]

    def synthetic(bg):
        rng = np.random.default_rng(seed)
        return lambda: [render(s, rng, size, "listing", bg) for s in sample_specs(n, seed)]

    def artwork():
        from moonsearch.data import real

        data = real.build(real_split, max_products=n)
        return list(zip(data.listing, data.listing_boxes))[:n]

    sets = [("photographic backgrounds", synthetic([0, 0, 0, 1.0])), ("listing mix", synthetic(None))]
    if real_split:
        sets.append((f"real artwork ({real_split} split)", artwork))
    rows = []
    for label, make in sets:
        samples = make()
        for c in croppers:
            scores = np.array([iou(c.box(img), box) for img, box in samples])
            rows.append({"set": label, "cropper": c.name, "images": len(samples), "mean_iou": float(scores.mean()),
                         "hit_rate@0.5": float((scores >= 0.5).mean())})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| set | cropper | images | mean IoU | hit rate (IoU>=0.5) |", "|---|---|---|---|---|"]
    out += [f"| {r['set']} | {r['cropper']} | {r['images']} | {r['mean_iou']:.3f} | {r['hit_rate@0.5']:.3f} |"
            for r in rows]
    return "\n".join(out) + "\n"
