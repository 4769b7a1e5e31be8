"""More levers for the visual block, measured on the real-artwork FIT split (never eval for choosing).

    python benchmarks/visual_levers.py [--out benchmarks/figures]   # ~9 min on 2 CPU cores

Image -> product R@10 of the visual block alone (GeM, PCA-whitened 256-d, fitted on the fit split as
``moonsearch fit-visual`` does), for:

- input transforms before EfficientNet-Lite0: greyscale, an edge map, a binary ink silhouette, and
  sums of per-transform vectors (do line glyphs and colour drawings meet in a shared rendering?);
- intermediate stages of the network (GeM of the 112-, 192-, 320-channel stage outputs) alone and
  concatenated with the head's features, at 160 and 224 px;
- a linear map trained contrastively on the fit split's cross-vendor pairs (drawing query <-> clean
  picture, listing photo <-> clean picture), started from the whitening and pulled toward it; validated
  on a quarter of the fit queries held out by product. The eval split is read once, for this row only,
  to say whether a gain on fit carries over to vendors the map never saw. The variant best on fit is
  checked on eval the same way (once, after choosing; nothing is chosen on eval).

Writes ``visual-levers.json`` / ``.md``. ``--part scales``: the block as served (with its detector crops)
at 160 px, 224 px and both sizes summed, on fit (``visual-scales.json`` / ``.md``). Products carry their clean picture and listing photo
(``n(v(clean) + v(listing))``); no crops here, so the baseline row is the block without crops.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from moonsearch.data import real
from moonsearch.models import efficientnet_lite as effnet
from moonsearch.models.base import l2_normalize
from moonsearch.models.towers import GEM_P, ImageTower, pil_to_tensor
from moonsearch.models.visual import fit_whitening
from moonsearch.utils.io import atomic_write_json, atomic_write_text

STAGES = (112, 192, 320)  # output widths of the stages whose GeM features are tried


def grey(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def edges(im: Image.Image) -> Image.Image:
    e = ImageOps.grayscale(im).filter(ImageFilter.GaussianBlur(1)).filter(ImageFilter.FIND_EDGES)
    return ImageOps.invert(ImageOps.autocontrast(e)).convert("RGB")


def ink(im: Image.Image) -> Image.Image:
    a = np.asarray(ImageOps.grayscale(im))
    return Image.fromarray(np.where(a < 235, 32, 255).astype(np.uint8)).convert("RGB")


TRANSFORMS = {"orig": lambda im: im, "grey": grey, "edges": edges, "ink": ink}


@torch.inference_mode()
def features(model, images: list, size: int) -> dict[str, np.ndarray]:
    """GeM (p = 3) of the head's feature map and of each stage in STAGES: {"head" | "112" | ...: (n, C)}."""
    def gem(fm):
        return fm.float().abs().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1 / GEM_P)

    last = {b._project_conv.out_channels: i for i, b in enumerate(model._blocks)}
    out: dict[str, list] = {str(c): [] for c in STAGES} | {"head": []}
    for s in range(0, len(images), 32):
        x = pil_to_tensor(images[s:s + 32], size, effnet.MEAN, effnet.STD)
        h = torch.nn.functional.relu6(model._bn0(model._conv_stem(x)))
        for i, block in enumerate(model._blocks):
            h = block(h)
            for c in STAGES:
                if last[c] == i:
                    out[str(c)].append(gem(h))
        out["head"].append(gem(torch.nn.functional.relu6(model._bn1(model._conv_head(h)))))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def split_features(split: str, tower: ImageTower) -> dict:
    d = real.build(split)
    qs = [q for q in d.queries if q["modality"] == "image"]
    parts = {"clean": d.clean, "listing": d.listing, "q": [q["image"] for q in qs]}
    out: dict = {"tgt": np.array([d.item_ids.index(q["item_id"]) for q in qs])}
    for size in (160, 224):
        for part, ims in parts.items():
            for k, v in features(tower.model, ims, size).items():
                out[(size, "orig", part, k)] = v
    for t in ("grey", "edges", "ink"):
        for part, ims in parts.items():
            out[(160, t, part, "head")] = features(tower.model, [TRANSFORMS[t](im) for im in ims], 160)["head"]
    return out


def r10(q: np.ndarray, p: np.ndarray, tgt: np.ndarray) -> float:
    s = q @ p.T
    return float(((s > s[np.arange(len(tgt)), tgt][:, None]).sum(1) < 10).mean())


def block(fit: dict, data: dict, keys: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit (clean, listing, query) vectors: per key, whitened on fit; keys of one transform are
    concatenated (layers), keys of different transforms summed."""
    by_t: dict[str, list] = {}
    for size, t, layer in keys:
        f = np.concatenate([fit[(size, t, p, layer)] for p in ("clean", "listing", "q")])
        mean, proj = fit_whitening(f, min(256, f.shape[1]), 1.0)
        by_t.setdefault(t, []).append([l2_normalize((l2_normalize(data[(size, t, p, layer)]) - mean) @ proj)
                                      for p in ("clean", "listing", "q")])
    summed = [sum(l2_normalize(np.concatenate([v[i] for v in layers], 1)) for layers in by_t.values())
              for i in range(3)]
    return tuple(l2_normalize(x) for x in summed)


def score(c, l, q, tgt) -> dict:
    return {"R@10": r10(q, l2_normalize(c + l), tgt), "listing-only R@10": r10(q, l, tgt)}


def learned_map(fit: dict, data_eval: dict, steps: int = 400, lam: float = 1.0, tau: float = 0.05) -> dict:
    """Contrastive linear map on fit pairs; R@10 on held-out fit queries and on eval, before and after."""
    key = (160, "orig")
    f = np.concatenate([fit[(*key, p, "head")] for p in ("clean", "listing", "q")])
    mean, proj = fit_whitening(f, 256, 1.0)

    def x(d, p):
        return torch.tensor(l2_normalize(d[(*key, p, "head")]) - mean, dtype=torch.float32)

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tgt = fit["tgt"]
    perm = rng.permutation(len(tgt))
    val, train = perm[: len(tgt) // 4], perm[len(tgt) // 4:]
    train_items = np.setdiff1d(np.arange(len(fit[(*key, "clean", "head")])), tgt[val])
    fc, fl, fq = x(fit, "clean"), x(fit, "listing"), x(fit, "q")
    w0 = torch.tensor(proj)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-3)

    def unit(v, m):
        return torch.nn.functional.normalize(v @ m, dim=1)

    def measure(m, d, rows=None) -> dict:
        c, l, q = (unit(x(d, p), m).detach().numpy() for p in ("clean", "listing", "q"))
        t = d["tgt"]
        if rows is not None:
            q, t = q[rows], t[rows]
        return score(c, l, q, t)

    before = {"fit held-out queries": measure(w0, fit, val), "eval": measure(w0, data_eval)}
    for _ in range(steps):
        qi = torch.tensor(rng.choice(train, min(128, len(train)), replace=False))
        ii = torch.tensor(rng.choice(train_items, 256, replace=False))
        labels_q, labels_i = torch.arange(len(qi)), torch.arange(len(ii))
        loss = (torch.nn.functional.cross_entropy(unit(fq[qi], w) @ unit(fc[tgt[qi]], w).T / tau, labels_q)
                + torch.nn.functional.cross_entropy(unit(fl[ii], w) @ unit(fc[ii], w).T / tau, labels_i)
                + lam * ((w - w0) ** 2).sum() / (w0 ** 2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {"fit held-out queries": measure(w.detach(), fit, val), "eval": measure(w.detach(), data_eval)}
    return {"steps": steps, "lambda": lam, "tau": tau, "train queries": int(len(train)),
            "held-out fit queries": int(len(val)), "before": before, "after": after}


def scales_as_served(split: str = "fit") -> dict:
    """The block AS SERVED (each picture summed with its detector crop) at 160 px (the packaged
    transform), at 224 px, and both scales summed (one whitening fitted on the split's pictures at both
    sizes): does a second, larger pass of the tower pay once the crops are in? R@10 per variant."""
    from moonsearch.models.cropping import crop, make_cropper
    from moonsearch.models.visual import WHITENING, load_whitening

    towers = {160: ImageTower(160), 224: ImageTower(224)}
    detector = make_cropper("detector")
    d = real.build(split)
    qs = [q for q in d.queries if q["modality"] == "image"]
    parts = {"clean": d.clean, "listing": d.listing, "q": [q["image"] for q in qs]}
    f = {}
    for part, ims in parts.items():
        cuts = [crop(im, b) for im, b in zip(ims, detector.boxes(ims))]
        for size, tower in towers.items():
            f[(size, part, "picture")], f[(size, part, "crop")] = (tower.pooled(x)[1].numpy() for x in (ims, cuts))
    whiten = {(160,): load_whitening(WHITENING)[:2]}
    for sizes in ((224,), (160, 224)):
        whiten[sizes] = fit_whitening(np.concatenate([f[(z, p, "picture")] for z in sizes for p in parts]), 256, 1.0)
    tgt = np.array([d.item_ids.index(q["item_id"]) for q in qs])
    rows = []
    for sizes, (mean, proj) in whiten.items():
        for views in (("picture", "crop"), ("picture",)):
            c, l, q = (l2_normalize(sum(l2_normalize((l2_normalize(f[(z, p, v)]) - mean) @ proj)
                                        for z in sizes for v in views)) for p in parts)
            rows.append({"sizes": list(sizes), "crops": len(views) == 2, **score(c, l, q, tgt)})
            print(rows[-1], flush=True)
    return {"split": split, "queries": int(len(tgt)), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--part", choices=["all", "scales"], default="all",
                    help="scales: only the served block at 160 / 224 / both px (visual-scales.json / .md, ~5 min)")
    a = ap.parse_args()
    if a.part == "scales":
        res = scales_as_served("fit")
        lines = [f"The visual block as served (picture + detector crop) by tower input size, {res['split']} split, "
                 f"{res['queries']} drawing queries:", "", "| sizes | crops | R@10 | listing-only R@10 |", "|---|---|---|---|"]
        lines += [f"| {' + '.join(map(str, r['sizes']))} px | {'yes' if r['crops'] else 'no'} | {r['R@10']:.3f} | "
                  f"{r['listing-only R@10']:.3f} |" for r in res["rows"]]
        a.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(res, a.out / "visual-scales.json")
        atomic_write_text("\n".join(lines) + "\n", a.out / "visual-scales.md")
        print("\n".join(lines))
        return
    tower = ImageTower(160)
    fit = split_features("fit", tower)
    rows = []
    variants = {
        "GeM head, 160 px (the block without crops)": [(160, "orig", "head")],
        "greyscale input": [(160, "grey", "head")],
        "edge-map input": [(160, "edges", "head")],
        "ink-silhouette input": [(160, "ink", "head")],
        "sum: original + edge map": [(160, "orig", "head"), (160, "edges", "head")],
        "sum: greyscale + edge map": [(160, "grey", "head"), (160, "edges", "head")],
        "sum: original + greyscale + edge map": [(160, "orig", "head"), (160, "grey", "head"), (160, "edges", "head")],
    }
    for size in (160, 224):
        for layers in (["320"], ["192"], ["112"], ["head", "192"], ["head", "112"], ["head", "192", "112"],
                       ["320", "192", "112"]):
            variants[f"{size} px, stages {'+'.join(layers)}"] = [(size, "orig", layer) for layer in layers]
    variants["224 px, head"] = [(224, "orig", "head")]
    for name, keys in variants.items():
        rows.append({"variant": name, **score(*block(fit, fit, keys), fit["tgt"])})
        print(rows[-1])
    data_eval = split_features("eval", tower)
    best = max(rows, key=lambda r: r["R@10"])
    check = {"variant": best["variant"], "fit": {k: best[k] for k in ("R@10", "listing-only R@10")},
             "eval": score(*block(fit, data_eval, variants[best["variant"]]), data_eval["tgt"]),
             "eval, the block without crops": score(*block(fit, data_eval, variants[rows[0]["variant"]]),
                                                     data_eval["tgt"])}
    learned = learned_map(fit, data_eval)
    print(check, learned)
    res = {"split": "fit", "queries": int(len(fit["tgt"])), "rows": rows, "best_on_fit_checked_on_eval": check,
           "learned_map": learned}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, a.out / "visual-levers.json")
    lines = ["| visual vector of a picture (fit split) | R@10 | listing-only R@10 |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['R@10']:.3f} | {r['listing-only R@10']:.3f} |" for r in rows]
    lm = learned
    lines += ["", f"Best on fit ({check['variant']}) checked once on the held-out eval split: R@10 "
              f"{check['eval, the block without crops']['R@10']:.3f} (the block without crops) -> {check['eval']['R@10']:.3f}, "
              f"listing-only {check['eval, the block without crops']['listing-only R@10']:.3f} -> "
              f"{check['eval']['listing-only R@10']:.3f}"]
    lines += ["", f"Learned linear map ({lm['train queries']} training queries, {lm['steps']} steps): "
              f"held-out fit queries R@10 {lm['before']['fit held-out queries']['R@10']:.3f} -> "
              f"{lm['after']['fit held-out queries']['R@10']:.3f}; eval split R@10 {lm['before']['eval']['R@10']:.3f}"
              f" -> {lm['after']['eval']['R@10']:.3f}, listing-only {lm['before']['eval']['listing-only R@10']:.3f}"
              f" -> {lm['after']['eval']['listing-only R@10']:.3f}"]
    atomic_write_text("\n".join(lines) + "\n", a.out / "visual-levers.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
