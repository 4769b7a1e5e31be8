"""Fine-tune the visual block's image tower on the wide pool's real artwork, and judge it on held-out vendors.

    python benchmarks/tune_tower.py pack --pack .tune                 # here: render the pool (~2 min)
    python benchmarks/tune_tower.py train --pack .tune --out DIR      # on the GPU machine (~7 min)
    python benchmarks/tune_tower.py judge --tower DIR/NAME.safetensors ... --out benchmarks/figures

``train`` runs the recipes in RECIPES one after another, each for its wall-clock budget, and writes
DIR/NAME.safetensors (fp16 weights, recipe and loss curve in the metadata) and DIR/train.json.
``--dry-run`` trains every recipe for 2 steps at 64 px on the CPU (the test suite runs it).

``judge`` measures each tower as the visual block serves it (each picture's vector summed with its
detector crop's) on the real-artwork FIT split, whose vendors are not in the pool: tabler / ph glyph
queries against streamline colour products (clean picture + listing photo), R@10 and listing-only
R@10, per product vendor (streamline-ultimate-color is in the pool, streamline-freehand-color is not).
The served block (pretrained tower, whitening fitted on fit) is the baseline row. ``--eval`` also
reads the held-out eval split, for the tower that is adopted (once; nothing is chosen on it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moonsearch.training.visual_tower import Recipe  # noqa: E402

RECIPES = [
    Recipe("pairs", seconds=95),
    Recipe("pairs-text", seconds=95, text_weight=0.5),
    Recipe("pairs-text-late", seconds=95, text_weight=0.5, frozen_blocks=8),
]


def cmd_pack(args) -> None:
    from moonsearch.training.visual_tower import pack

    pack(args.pack, vendors=args.vendor or None, max_concepts=args.max_concepts)


def cmd_train(args) -> None:
    import torch

    from moonsearch.training.visual_tower import save_tower, train

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    reports = []
    names = args.recipe or [r.name for r in RECIPES]
    for r in RECIPES:
        if r.name not in names:
            continue
        if args.dry_run:
            r.steps, r.batch = 2, 8
        elif args.seconds:
            r.seconds = args.seconds
        t0 = time.time()
        try:
            def half(state, step, r=r):
                save_tower(state, {"recipe": r.name, "steps": step, "half": True}, args.out / f"{r.name}-half.safetensors")

            state, report = train(args.pack, r, device, frame=64 if args.dry_run else 160, on_half=half)
        except Exception as e:  # one recipe failing must not lose the others' towers
            print(f"{r.name} failed: {type(e).__name__}: {e}", flush=True)
            reports.append({"recipe": r.name, "error": f"{type(e).__name__}: {e}"})
            continue
        save_tower(state, report, args.out / f"{r.name}.safetensors")
        reports.append(report)
        (args.out / "train.json").write_text(json.dumps(reports, indent=1))
        print(f"{r.name}: saved after {time.time() - t0:.0f} s ({report['images_per_s']:.0f} images/s)", flush=True)
    failed = [rep["recipe"] for rep in reports if "error" in rep]
    for rep in reports:
        if "error" not in rep:
            print(f"| {rep['recipe']['name']} | {rep['steps']} steps | {rep['seconds']} s | "
                  f"{rep['images_per_s']} img/s | loss {rep['loss'][0][1]:.3f} -> {rep['loss'][-1][1]:.3f} |")
    if failed:
        sys.exit(f"recipes failed: {', '.join(failed)}")


def served_vectors(embed, images, cuts):
    """As the block serves a picture: n(v(picture) + v(its detector crop))."""
    from moonsearch.models.base import l2_normalize

    return l2_normalize(embed(images) + embed(cuts))


def judge(towers: list[Path], split: str = "fit") -> dict:
    import numpy as np

    from moonsearch.data import real
    from moonsearch.models.base import l2_normalize
    from moonsearch.models.cropping import crop, make_cropper
    from moonsearch.models.towers import ImageTower
    from moonsearch.models.visual import VisualBlock
    from moonsearch.models.visual_tower import load_tuned

    d = real.build(split)
    qs = [q for q in d.queries if q["modality"] == "image"]
    tgt = np.array([d.item_ids.index(q["item_id"]) for q in qs])
    vendor = np.array([d.sources[t] for t in tgt])
    detector = make_cropper("detector")
    parts = {"clean": d.clean, "listing": d.listing, "q": [q["image"] for q in qs]}
    cuts = {k: [crop(im, b) for im, b in zip(ims, detector.boxes(ims))] for k, ims in parts.items()}
    base, tower = VisualBlock(crops=False), ImageTower(160)
    embedders = {"served block (pretrained tower, whitening fitted on fit)": lambda ims: base.pictures(tower, ims)}
    for path in towers:
        embedders[path.stem] = load_tuned(path).vectors
    rows = []
    for name, embed in embedders.items():
        t0 = time.time()
        c, l, q = (served_vectors(embed, ims, cuts[k]) for k, ims in parts.items())
        row = {"tower": name, "queries": int(len(tgt)), **r10_rows(q, l2_normalize(c + l), l, tgt, vendor),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"split": split, "rows": rows}


def r10_rows(q, products, listing, tgt, vendor) -> dict:
    import numpy as np

    def r10(p, rows):
        s = q[rows] @ p.T
        own = s[np.arange(len(s)), tgt[rows]][:, None]
        return round(float(((s > own).sum(1) < 10).mean()), 3)

    out = {"R@10": r10(products, np.arange(len(tgt))), "listing-only R@10": r10(listing, np.arange(len(tgt)))}
    for v in sorted(set(vendor)):
        rows = np.flatnonzero(vendor == v)
        out[f"R@10 {v} ({len(rows)})"] = r10(products, rows)
    return out


def cmd_judge(args) -> None:
    from moonsearch.utils.io import atomic_write_json

    out = {"fit": judge(args.tower, "fit")}
    if args.eval:
        out["eval"] = judge(args.tower, "eval")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, args.out / "tower-tune.json")
    lines = []
    for split, res in out.items():
        keys = [k for k in res["rows"][0] if k not in ("tower", "queries", "seconds")]
        lines += [f"### {split} split ({res['rows'][0]['queries']} drawing queries)", "",
                  "| tower | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + r["tower"] + " | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in res["rows"]]
        lines.append("")
    (args.out / "tower-tune.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--pack", type=Path, default=Path(".tune"))
    p.add_argument("--vendor", action="append", help="only these pool vendors (tests)")
    p.add_argument("--max-concepts", type=int)
    p.set_defaults(fn=cmd_pack)
    t = sub.add_parser("train")
    t.add_argument("--pack", type=Path, default=Path(".tune"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--recipe", action="append")
    t.add_argument("--seconds", type=float)
    t.add_argument("--dry-run", action="store_true")
    t.set_defaults(fn=cmd_train)
    j = sub.add_parser("judge")
    j.add_argument("--tower", type=Path, action="append", default=[])
    j.add_argument("--eval", action="store_true", help="also read the held-out eval split (the adopted tower only)")
    j.add_argument("--out", type=Path, default=Path("bench-out"))
    j.set_defaults(fn=cmd_judge)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
