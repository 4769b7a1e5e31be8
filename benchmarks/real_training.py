r"""MOON trained on real artwork beside the demo world, against the shipped moon-mini (issue 9's lever
"real training data beside the synthetic world", for the MOON trainer itself).

    python benchmarks/real_training.py world                          # demo-real/ (~1.5 min)
    moonsearch train --preset moon-mini-real                          # ~30 min on 2 CPU cores
    python benchmarks/real_training.py judge --run runs/moon-mini-real/final

``world`` writes the demo world beside the wide pool's real artwork (``moonsearch.data.real.
write_training_world``: 1,565 drawn products with a listing photo each, queried by name and by other
vendors' drawings; no eval vendor or relative of one, no emoji artwork).

``judge`` serves the run as moon-mini is served (``benchmarks/training.py served_like``: same weights,
the shipped serving settings), then measures it and the shipped moon-mini on
- the real-artwork FIT split (``moonsearch bench real --split fit``'s protocol), with image -> product
  R@10 also per product vendor: streamline-freehand-color is in no training pool, while
  streamline-ultimate-color's pictures are the wide pool's products (its targets are not held out);
  the queries' vendors (tabler, ph) are in no pool;
- the demo world's zero-shot tasks (test split, 400 products), counting the rows where each model is
  ahead of clip-finetune (its row in benchmarks/figures/zero-shot-tower.json, same protocol).
``--eval`` also reads the held-out eval split; use it only for a run that is adopted.
Writes bench-out/<name>.{json,md} and <name>-zero-shot.{json,md,png} (the demo rows as bars).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDORS = "image by product vendor (clean+listing)"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def cmd_world(a) -> None:
    from rich.progress import Progress

    from moonsearch.data.real import write_training_world

    with Progress() as bar:
        def progress(total):
            task = bar.add_task("real products", total=total)
            return lambda: bar.advance(task)

        print(write_training_world(a.out, a.demo, progress=progress))


def real_rows(enc, data) -> dict:
    """bench real's figures for the variants that matter here (its JSON also holds image R@10 per
    product vendor)."""
    from moonsearch.eval import real_bench

    return real_bench.evaluate(enc, data, variants=("clean+listing", "listing", "no photos"))


def ahead(row: dict, ref: dict) -> tuple[int, int, int]:
    """(ahead, level, behind) over the zero-shot table's 21 rows."""
    from training import task_values

    a, b = task_values(row), task_values(ref)
    diffs = [round(a[t] - b[t], 6) for t in b if t in a]
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def cmd_judge(a) -> None:
    from training import served_like, task_values

    from moonsearch.data import real
    from moonsearch.eval import zero_shot
    from moonsearch.models.base import create_encoder
    from moonsearch.models.moon import MINI_CHECKPOINT
    from moonsearch.utils.io import atomic_write_json, atomic_write_text

    judged = served_like(Path(a.run), MINI_CHECKPOINT)
    models = {"moon-mini (shipped)": "moon-mini", f"{a.label}, as served": f"moon:{judged}"}
    if a.clip_run:  # clip-finetune trained with the run's budget: judged the same way, the reference
        models[f"clip-finetune ({a.clip_run.parent.name})"] = f"clip-mini:{a.clip_run}"
    splits = ["fit"] + (["eval"] if a.eval else [])
    sets: dict = {}  # each split drawn once (~1 min), only where a row is missing
    out: dict = {"run": str(a.run), "judged": str(judged), "models": {}}
    cache = a.out / "real-training-rows"  # one file per (vectors, split): a rerun skips what is done
    for label, name in models.items():
        enc = create_encoder(name)
        m = {"fingerprint": enc.fingerprint}
        for s in splits + ["zero-shot"]:
            f = cache / f"{enc.fingerprint}-{s}.json"
            if not f.exists():
                if s != "zero-shot" and s not in sets:
                    sets[s] = real.build(s)
                r = zero_shot.evaluate(enc, Path(a.demo), limit=400) if s == "zero-shot" else real_rows(enc, sets[s])
                atomic_write_json(r, f)
                print(f"{label}: {s} done", flush=True)
            m[s if s == "zero-shot" else f"real {s}"] = json.loads(f.read_text())
        m["zero-shot"]["encoder"] = label
        out["models"][label] = m
    stored = json.loads((ROOT / "benchmarks/figures/zero-shot-tower.json").read_text())  # same protocol
    if a.clip_run:
        ref = out["models"][f"clip-finetune ({a.clip_run.parent.name})"]["zero-shot"]
    else:  # the plain clip-finetune's stored row
        ref = next(r for r in stored if "clip-finetune" in r["encoder"])
    out["reference"] = ref["encoder"]
    shipped_clip = next(r for r in stored if r["encoder"] == "clip-mini")  # the other target: 14 of 21
    for m in out["models"].values():
        m["vs clip-finetune (ahead, level, behind)"] = ahead(m["zero-shot"], ref)
        m["vs shipped clip-mini (ahead, level, behind)"] = ahead(m["zero-shot"], shipped_clip)
    lines = []
    first = next(iter(out["models"].values()))
    for s in splits:
        vendors = list(first[f"real {s}"][VENDORS])
        lines += [f"**Real artwork, {s} split** (R@10; listing: the listing photo alone)", "",
                  "| model | text | image | text+image | image, listing only | photos hurt text | " +
                  " | ".join(f"image, {v} targets" for v in vendors) + " |", "|---" * (6 + len(vendors)) + "|"]
        for label, m in out["models"].items():
            r = m[f"real {s}"]
            cl, li = r["rows"]["clean+listing"], r["rows"]["listing"]
            worse = sum(c["worse"] for c in r["text_rank_change"].values())
            lines.append(f"| {label} | {cl['text']['R@10']:.3f} | {cl['image']['R@10']:.3f} | "
                         f"{cl['text+image']['R@10']:.3f} | {li['image']['R@10']:.3f} | {worse} | " +
                         " | ".join(f"{v['R@10']:.3f} ({v['n']})" for v in r[VENDORS].values()) + " |")
        lines.append("")
    rows = list(task_values(first["zero-shot"]))
    extra = [] if a.clip_run else [out["reference"]]  # the stored reference row, when it is not judged here
    lines += ["**Demo world, zero-shot** (test split, 400 products)", "",
              "| task | " + " | ".join([*out["models"], *extra]) + " |", "|---" * (len(out["models"]) + len(extra) + 1) + "|"]
    for t in rows:
        lines.append(f"| {t} | " + " | ".join(f"{task_values(m['zero-shot'])[t]:.3f}" for m in out["models"].values())
                     + "".join(f" | {task_values(ref)[t]:.3f}" for _ in extra) + " |")
    lines.append("| ahead / level / behind clip-finetune | " +
                 " | ".join("{} / {} / {}".format(*m["vs clip-finetune (ahead, level, behind)"])
                            for m in out["models"].values()) + " |" + " |" * len(extra))
    lines.append("| ahead / level / behind shipped clip-mini | " +
                 " | ".join("{} / {} / {}".format(*m["vs shipped clip-mini (ahead, level, behind)"])
                            for m in out["models"].values()) + " |" + " |" * len(extra))
    table = "\n".join(lines)
    a.out.mkdir(parents=True, exist_ok=True)
    zero_shot.write([m["zero-shot"] for m in out["models"].values()], a.out, f"{a.name}-zero-shot")  # + a bar chart
    atomic_write_json(out, a.out / f"{a.name}.json")
    atomic_write_text(table + "\n", a.out / f"{a.name}.md")
    print(table)


def cmd_textgap(a) -> None:
    """How far each model's TRAINED text side (text-only pooled vector, without the fixed MiniLM block
    beside it) is from MiniLM's similarities, on texts no run trained on: the real-artwork fit split's
    product names and the demo world's test-split query texts, in batches of 48 as a training step sees
    them. What the distillation term pulls on, measured where it was not applied."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from moonsearch.data import real
    from moonsearch.models.base import Query, create_encoder
    from moonsearch.models.towers import MiniLMTextTower
    from moonsearch.training.losses import similarity_kl
    from moonsearch.utils.io import atomic_write_json

    names = real.fit_product_names()
    beh = pq.read_table(Path(a.demo) / "behavior.parquet").to_pylist()
    queries = sorted({b["query_text"] for b in beh if b["split"] == "test" and b["query_text"]})
    rng = np.random.default_rng(0)
    sets = {"real fit-split names": [names[i] for i in sorted(rng.choice(len(names), min(480, len(names)), replace=False))],
            "demo test-split query texts": queries[:480]}
    tower = MiniLMTextTower()
    teacher = {label: tower.embed(texts) for label, texts in sets.items()}
    out: dict = {"texts": {k: len(v) for k, v in sets.items()}, "batch": 48, "models": {}}
    for run in a.run:
        name = "moon-mini (shipped)" if str(run) == "moon-mini" else run.parent.name
        enc = create_encoder("moon-mini" if str(run) == "moon-mini" else f"moon:{run}")
        row = {}
        for label, texts in sets.items():
            with torch.no_grad():
                pooled = enc._run([enc.query_batch([Query(t, None) for t in texts[s:s + 48]])
                                   for s in range(0, len(texts), 48)])
            text_dims = enc.model.dim // (2 if enc.cfg.pool == "blocks" else 1)  # blocks: [text, image]
            student = F.normalize(torch.from_numpy(pooled[:, :text_dims]), dim=-1)
            t = teacher[label]
            kl = [similarity_kl(student[s:s + 48], t[s:s + 48], 0.05).item() for s in range(0, len(texts), 48)]
            off = ~torch.eye(len(texts), dtype=torch.bool)
            corr = torch.corrcoef(torch.stack([(student @ student.T)[off], (t @ t.T)[off]]))[0, 1].item()
            row[label] = {"KL (mean over batches)": float(np.mean(kl)), "similarity correlation": corr}
        out["models"][name] = row
        print(name, json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, a.out / f"{a.name}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("world", help="write the demo world beside the wide pool's real artwork")
    w.add_argument("--out", type=Path, default=Path("demo-real"))
    w.add_argument("--demo", type=Path, default=Path("demo"))
    j = sub.add_parser("judge", help="the run as served vs the shipped moon-mini, real fit split + demo world")
    j.add_argument("--run", type=Path, required=True, help="a trained MOON checkpoint (runs/<run>/final)")
    j.add_argument("--label", default="moon-mini-real")
    j.add_argument("--clip-run", type=Path, help="clip-finetune trained with the same budget (runs/<run>/final): "
                   "judged too and counted against (default: the plain clip-finetune's stored row)")
    j.add_argument("--demo", type=Path, default=Path("demo"))
    j.add_argument("--eval", action="store_true", help="also read the held-out eval split (an adopted run only)")
    j.add_argument("--out", type=Path, default=Path("bench-out"))
    j.add_argument("--name", default="real-training")
    g = sub.add_parser("textgap", help="each run's trained text side vs MiniLM, on texts no run trained on")
    g.add_argument("--run", type=Path, action="append", required=True,
                   help="runs/<run>/final, or moon-mini for the shipped weights (repeatable)")
    g.add_argument("--demo", type=Path, default=Path("demo"))
    g.add_argument("--out", type=Path, default=Path("bench-out"))
    g.add_argument("--name", default="text-gap")
    a = ap.parse_args()
    {"world": cmd_world, "judge": cmd_judge, "textgap": cmd_textgap}[a.cmd](a)


if __name__ == "__main__":
    main()
