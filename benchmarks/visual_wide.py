"""Does real training data from MANY vendors teach the visual block to match drawings across styles?

    python benchmarks/visual_wide.py [--out bench-out]   # ~8 min on 2 CPU cores

The wide pool (``moonsearch.data.real.build_wide``): 1,565 colour products (streamline-ultimate-color and
IconPark's multi-colour icons, each with a listing photo) and 4,904 glyph queries by 34 more vendors, none
of them an eval vendor or a set that redraws one (``real.EVAL_RELATIVES``). A linear map 1280 -> 256 on
the GeM features (the visual block's transform, started from the PCA whitening and pulled toward it) is
trained contrastively: each glyph against every product's n(v(clean) + v(listing)), and each listing
photo against every clean picture. Image -> product R@10 of the visual block alone, no crops.

- **Both sides held out**: trained on the streamline products with 29 glyph vendors; judged on the
  IconPark products with 5 other glyph vendors (carbon, bi, hugeicons, game-icons, solar). This is how
  the eval split differs from anything fitted: new product vendor AND new query vendors.
- **Trained on the whole pool, judged on the fit split**: tabler / ph queries (never in the pool) over the
  fit split's products; its streamline-freehand-color targets are a vendor the pool lacks too.
- **Crops**: the visual block's listing-only R@10 on the fit split (the block as served: each picture
  summed with its crop) with no crop, the detector's crop, and the box the product was pasted into
  (the best a cropper could do).
- **Colour queries** (``--part colour``): the outside check's queries are colour drawings, ours are glyphs.
  On the fit split, each streamline-ultimate-color product is also queried with streamline-freehand-color's
  drawing of the same concept and vice versa (356 pairs): raw features against the block with and without
  crops, for these and for the glyph queries.
- **Hub correction** (CSLS, from cross-lingual retrieval): each product's score lowered by beta times
  its mean similarity to its k nearest wide-pool glyphs, so products near every drawing stop crowding the
  top ten. Packaged whitening, fit split.

The eval split is not read: a variant would be checked on it once, only if adopted. Writes
``visual-wide.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from moonsearch.data import real
from moonsearch.models.base import l2_normalize
from moonsearch.models.towers import ImageTower
from moonsearch.models.visual import WHITENING, fit_whitening, load_whitening
from moonsearch.utils.io import atomic_write_json, atomic_write_text
from visual_levers import r10, score  # R@10 of (q, products, targets); R@10 over n(clean + listing) and listing alone

HELD_OUT_GLYPHS = ("carbon", "bi", "hugeicons", "game-icons", "solar")


def gem_features(data: real.RealSet, tower: ImageTower) -> dict[str, np.ndarray]:
    qs = [q for q in data.queries if q["modality"] == "image"]
    out = {p: tower.pooled(ims)[1].numpy() for p, ims in
           (("clean", data.clean), ("listing", data.listing), ("q", [q["image"] for q in qs]))}
    out["tgt"] = np.array([data.item_ids.index(q["item_id"]) for q in qs])
    out["qsrc"] = np.array([q["source"] for q in qs])
    out["psrc"] = np.array(data.sources)
    return out


def subset(f: dict, products: np.ndarray, queries: np.ndarray) -> dict:
    """The products where ``products`` is true, and the queries where ``queries`` is true (targets renumbered)."""
    keep = np.where(products)[0]
    renum = -np.ones(len(products), int)
    renum[keep] = np.arange(len(keep))
    qs = queries & np.isin(f["tgt"], keep)
    return {"clean": f["clean"][keep], "listing": f["listing"][keep], "q": f["q"][qs], "tgt": renum[f["tgt"][qs]],
            "psrc": f["psrc"][keep], "qsrc": f["qsrc"][qs]}


def vectors(f: dict, mean: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(l2_normalize((l2_normalize(f[p]) - mean) @ w) for p in ("clean", "listing", "q"))


def measure(f: dict, mean: np.ndarray, w: np.ndarray, rows: np.ndarray | None = None) -> dict:
    c, l, q = vectors(f, mean, w)
    t = f["tgt"]
    if rows is not None:
        q, t = q[rows], t[rows]
    return {**score(c, l, q, t), "queries": int(len(t))}


def learn_map(f: dict, steps: int = 600, lam: float = 0.1, tau: float = 0.05, seed: int = 0):
    """(mean, whitening w0, learned w) fitted on ``f`` only."""
    mean, w0 = fit_whitening(np.concatenate([f[p] for p in ("clean", "listing", "q")]), 256, 1.0)
    x = {p: torch.tensor(l2_normalize(f[p]) - mean, dtype=torch.float32) for p in ("clean", "listing", "q")}
    tgt = torch.tensor(f["tgt"])
    torch.manual_seed(seed)
    start = torch.tensor(w0)
    w = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-3)
    unit = torch.nn.functional.normalize
    for _ in range(steps):
        c, l = unit(x["clean"] @ w, dim=1), unit(x["listing"] @ w, dim=1)
        qi, li = torch.randint(0, len(tgt), (256,)), torch.randint(0, len(c), (256,))
        loss = (torch.nn.functional.cross_entropy(unit(x["q"][qi] @ w, dim=1) @ unit(c + l, dim=1).T / tau, tgt[qi])
                + torch.nn.functional.cross_entropy(l[li] @ c.T / tau, li)
                + lam * ((w - start) ** 2).sum() / (start ** 2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mean, w0, w.detach().numpy()


def hub_corrected(f: dict, mean, w, ref: np.ndarray, k: int, beta: float) -> dict:
    c, l, q = vectors(f, mean, w)
    r = l2_normalize((l2_normalize(ref) - mean) @ w)
    out = {}
    for key, p in (("R@10", l2_normalize(c + l)), ("listing-only R@10", l)):
        s = q @ p.T - beta * np.sort(p @ r.T, axis=1)[:, -k:].mean(1)[None]
        out[key] = float(((s > s[np.arange(len(f["tgt"])), f["tgt"]][:, None]).sum(1) < 10).mean())
    return out


def crops_on_fit(tower: ImageTower, d: real.RealSet) -> dict:
    """Listing-only R@10 of the served visual block on the fit split by crop, and the clean picture alone."""
    from moonsearch.models.cropping import crop, make_cropper
    from moonsearch.models.visual import VisualBlock
    from moonsearch.vision.croppers import iou

    qs = [q for q in d.queries if q["modality"] == "image"]
    tgt = np.array([d.item_ids.index(q["item_id"]) for q in qs])
    block, detector = VisualBlock(), make_cropper("detector")
    q = block.pictures(tower, [x["image"] for x in qs])
    found = detector.boxes(d.listing)
    out = {"queries": int(len(tgt)), "detector mean IoU": float(np.mean([iou(a, b) for a, b in zip(found, d.listing_boxes)]))}
    for name, boxes in (("whole photo", None), ("detector crop", found), ("ground-truth crop", d.listing_boxes)):
        cuts = None if boxes is None else [crop(im, b) for im, b in zip(d.listing, boxes)]
        out[name] = r10(q, block.pictures(tower, d.listing, cuts), tgt)
    out["clean picture alone"] = r10(q, block.pictures(tower, d.clean), tgt)
    return out


def colour_queries_on_fit(tower: ImageTower, d: real.RealSet) -> dict:
    """Image -> product R@10 on the fit split for colour-drawing queries (the other streamline colour vendor's
    drawing of the product's concept) and for the split's glyph queries, by where the detector crops go."""
    from moonsearch.models.cropping import crop, make_cropper
    from moonsearch.models.visual import VisualBlock

    other = {"streamline-ultimate-color": "streamline-freehand-color",
             "streamline-freehand-color": "streamline-ultimate-color"}
    drawn = {v: real.concepts(v) for v in other}
    colour, colour_tgt = [], []
    for i, (src, title) in enumerate(zip(d.sources, d.titles)):
        c = title.replace(" ", "-")
        name = next((n for k, n in drawn[other[src]].items() if k == c or k.split("-", 1)[-1] == c.split("-", 1)[-1]), None)
        if name:
            colour.append(real.draw(other[src], name, 224))
            colour_tgt.append(i)
    glyphs = [q for q in d.queries if q["modality"] == "image"]
    sets = {"colour drawings": (colour, np.array(colour_tgt)),
            "glyphs": ([q["image"] for q in glyphs], np.array([d.item_ids.index(q["item_id"]) for q in glyphs]))}
    block, bare, detector = VisualBlock(), VisualBlock(crops=False), make_cropper("detector")

    def vectors(images):  # (without crops, with crops)
        return bare.pictures(tower, images), block.pictures(tower, images, [crop(im, b) for im, b in
                                                                            zip(images, detector.boxes(images))])
    c0, c1 = vectors(d.clean)
    l0, l1 = vectors(d.listing)
    raw_c, raw_l = (l2_normalize(tower.pooled(x)[0].numpy()) for x in (d.clean, d.listing))
    out = {}
    for kind, (images, tgt) in sets.items():
        q0, q1 = vectors(images)
        raw_q = l2_normalize(tower.pooled(images)[0].numpy())
        rows = {"raw average-pooled features": (raw_q, raw_c, raw_l), "block, no crops": (q0, c0, l0),
                "block, crops on products only": (q0, c1, l1), "block, crops on queries only": (q1, c0, l0),
                "block, crops everywhere (served)": (q1, c1, l1)}
        out[kind] = {"queries": int(len(tgt)), **{name: score(c, l, q, tgt) for name, (q, c, l) in rows.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--part", choices=["all", "colour"], default="all",
                    help="colour: only the colour-query rows, added to an existing visual-wide.json in --out")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.part == "colour":
        import json

        res = json.loads((a.out / "visual-wide.json").read_text())
        res["colour_queries_on_fit"] = colour_queries_on_fit(ImageTower(160), real.build("fit"))
        atomic_write_json(res, a.out / "visual-wide.json")
        atomic_write_text(markdown(res), a.out / "visual-wide.md")
        print(markdown(res))
        return
    t0 = time.time()
    tower = ImageTower(160)
    wide = gem_features(real.build_wide(), tower)
    fit_set = real.build("fit")
    fit = gem_features(fit_set, tower)
    print(f"features in {time.time() - t0:.0f}s: wide {len(wide['clean'])} products / {len(wide['q'])} glyphs, "
          f"fit {len(fit['clean'])} / {len(fit['q'])}", flush=True)
    pm, pw, _ = load_whitening(WHITENING)
    res: dict = {"wide": {"products": int(len(wide["clean"])), "queries": int(len(wide["q"])),
                          "glyph_vendors": sorted(real.WIDE_GLYPHS), "colour_vendors": ["streamline-ultimate-color",
                                                                                        *real.WIDE_COLOUR]},
                 "steps": a.steps}

    held_q = np.isin(wide["qsrc"], HELD_OUT_GLYPHS)
    train = subset(wide, wide["psrc"] == "streamline-ultimate-color", ~held_q)
    judge = subset(wide, wide["psrc"] == "icon-park", held_q)
    rows = []
    for lam, tau in ((1.0, 0.05), (0.1, 0.05), (0.01, 0.05), (0.1, 0.1)):
        mean, w0, w = learn_map(train, a.steps, lam, tau)
        rows.append({"lambda": lam, "tau": tau, "whitening only": measure(judge, mean, w0),
                     "learned": measure(judge, mean, w)})
        print(rows[-1], flush=True)
    res["both_sides_held_out"] = {"train": {"products": int(len(train["clean"])), "queries": int(len(train["q"]))},
                                  "judge": {"products": int(len(judge["clean"])), "queries": int(len(judge["q"])),
                                            "glyph_vendors": list(HELD_OUT_GLYPHS)},
                                  "packaged whitening": measure(judge, pm, pw), "rows": rows}

    freehand = fit["psrc"][fit["tgt"]] == "streamline-freehand-color"
    mean, w0, w = learn_map(wide, a.steps, 0.1, 0.05)
    res["whole_pool_on_fit"] = {
        name: {"all fit queries": measure(fit, m, x), "freehand targets": measure(fit, m, x, freehand)}
        for name, (m, x) in (("packaged whitening", (pm, pw)), ("pool whitening", (mean, w0)),
                             ("learned on the pool", (mean, w)))}
    print(res["whole_pool_on_fit"], flush=True)
    res["crops_on_fit"] = crops_on_fit(tower, fit_set)
    print(res["crops_on_fit"], flush=True)
    res["colour_queries_on_fit"] = colour_queries_on_fit(tower, fit_set)
    res["hub_correction_on_fit"] = [{"k": k, "beta": b, **hub_corrected(fit, pm, pw, wide["q"], k, b)}
                                    for k in (10, 50) for b in (0.0, 0.5, 1.0)]
    res["seconds"] = round(time.time() - t0)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, a.out / "visual-wide.json")
    atomic_write_text(markdown(res), a.out / "visual-wide.md")
    print(markdown(res))


def markdown(res: dict) -> str:
    b = res["both_sides_held_out"]
    lines = [f"Both sides held out: trained on {b['train']['products']} streamline products / {b['train']['queries']} "
             f"glyphs, judged on {b['judge']['products']} IconPark products / {b['judge']['queries']} glyphs by "
             f"{', '.join(b['judge']['glyph_vendors'])} (packaged whitening: R@10 "
             f"{b['packaged whitening']['R@10']:.3f})", "",
             "| lambda | tau | R@10 whitening only -> learned | listing-only R@10 |", "|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['lambda']} | {r['tau']} | {r['whitening only']['R@10']:.3f} -> {r['learned']['R@10']:.3f} | "
                     f"{r['whitening only']['listing-only R@10']:.3f} -> {r['learned']['listing-only R@10']:.3f} |")
    lines += ["", "Whole pool, judged on the fit split (tabler / ph queries):", "",
              "| transform | R@10 all | listing-only all | R@10 freehand targets |", "|---|---|---|---|"]
    for name, r in res["whole_pool_on_fit"].items():
        lines.append(f"| {name} | {r['all fit queries']['R@10']:.3f} | {r['all fit queries']['listing-only R@10']:.3f} | "
                     f"{r['freehand targets']['R@10']:.3f} ({r['freehand targets']['queries']} queries) |")
    c = res["crops_on_fit"]
    lines += ["", f"Listing-only R@10 of the served block on the fit split ({c['queries']} queries; detector mean IoU "
              f"{c['detector mean IoU']:.3f}): whole photo {c['whole photo']:.3f}, detector crop {c['detector crop']:.3f}, "
              f"ground-truth crop {c['ground-truth crop']:.3f}; the clean picture alone {c['clean picture alone']:.3f}"]
    if "colour_queries_on_fit" in res:
        lines += ["", "Fit split, colour-drawing queries vs glyph queries, by where the detector crops go:", "",
                  "| visual vector | colour R@10 | colour listing-only | glyph R@10 | glyph listing-only |",
                  "|---|---|---|---|---|"]
        cq, gq = res["colour_queries_on_fit"]["colour drawings"], res["colour_queries_on_fit"]["glyphs"]
        for name in (k for k in cq if k != "queries"):
            lines.append(f"| {name} | {cq[name]['R@10']:.3f} | {cq[name]['listing-only R@10']:.3f} | "
                         f"{gq[name]['R@10']:.3f} | {gq[name]['listing-only R@10']:.3f} |")
        lines.append(f"\n({cq['queries']} colour queries, {gq['queries']} glyph queries.)")
    lines += ["", "Hub correction on the fit split (packaged whitening):", "",
              "| k | beta | R@10 | listing-only R@10 |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['beta']} | {r['R@10']:.3f} | {r['listing-only R@10']:.3f} |"
              for r in res["hub_correction_on_fit"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
