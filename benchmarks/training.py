r"""MOON vs CLIP with the same training budget, plus the ablations: train every preset (resumable; a
finished run is reused), then run the paper's zero-shot tasks on all of them side by side.

    python benchmarks/training.py --preset moon-mini-cpu --preset clip-finetune      # ~45 min on 2 CPU cores
    python benchmarks/training.py --steps 100 --name ablations --preset moon-mini-cpu --preset moon-mini-no-moe \
        --preset moon-mini-unguided --preset moon-mini-no-crops --preset moon-mini-in-batch   # equal smaller budget

Rows: clip-mini as shipped, clip-finetune, untrained moon-mini-base, moon-mini-cpu and its ablations.
Writes bench-out/<name>.{json,md,png} (the zero-shot table) and bench-out/<name>-speed.json
(samples/s and the step split from each run's metrics.jsonl); the demo world must exist
(moonsearch demo-data --out demo).
"""
import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

PRESETS = ["moon-mini-cpu", "clip-finetune", "moon-mini-no-moe", "moon-mini-unguided", "moon-mini-no-crops",
           "moon-mini-in-batch"]


def speed(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r][5:]  # the first steps warm caches
    med = {k: statistics.median(r[k] for r in steps) for k in ("samples_per_s", "data_s", "forward_s",
                                                                "backward_s", "opt_s", "step_s")}
    val = [r for r in rows if "val_recall@10" in r]
    return {**med, "steps": len(steps) + 5, "val_recall@10_first": val[0]["val_recall@10"],
            "val_recall@10_last": val[-1]["val_recall@10"]}


def main() -> None:
    from moonsearch.eval import zero_shot
    from moonsearch.models.base import create_encoder
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import train
    from moonsearch.utils.io import atomic_write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", action="append", help="presets to train and compare (default: all rows)")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--steps", type=int, help="override every preset's steps (a smaller, equal budget)")
    ap.add_argument("--limit", type=int, default=400, help="catalog products in the zero-shot evaluation")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--name", default="training", help="report file stem")
    a = ap.parse_args()
    presets = a.preset or PRESETS
    rows = a.out / "training-rows"  # one evaluated row per model: a rerun skips what is done
    speeds, results = {}, []

    def row(name: str, label: str) -> dict:
        f = rows / f"{label}.json"
        if not f.exists():
            r = zero_shot.evaluate(create_encoder(name), Path(a.data), limit=a.limit)
            r["encoder"] = label
            atomic_write_json(r, f)
            print(f"evaluated {label}", flush=True)
        return json.loads(f.read_text())

    results += [row("clip-mini", "clip-mini"), row("moon-mini-base", "moon-mini-base (untrained)")]
    for p in presets:
        cfg = load_config(p, data=a.data, out=a.runs, steps=a.steps)
        if a.steps:  # a different budget is a different run
            cfg = replace(cfg, run_name=f"{cfg.run_name}-{a.steps}")
        final = Path(cfg.out) / cfg.run_name / "final"
        if not (final / "config.json").exists():
            print(f"training {p} ...", flush=True)
            train(cfg)
        kind = json.loads((final / "config.json").read_text()).get("format", "")
        label = cfg.run_name
        results.append(row(f"clip-mini:{final}" if kind.startswith("moonsearch-clip-mini") else f"moon:{final}", label))
        speeds[label] = speed(final.parent)
    zero_shot.write(results, a.out, a.name)
    atomic_write_json(speeds, a.out / f"{a.name}-speed.json")
    print(zero_shot.table(results))
    print("| run | samples/s | data s | forward s | backward s | optimiser s | val R@10 start -> end |")
    print("|---|---|---|---|---|---|---|")
    for p, s in speeds.items():
        print(f"| {p} | {s['samples_per_s']:.2f} | {s['data_s']:.2f} | {s['forward_s']:.2f} | {s['backward_s']:.2f}"
              f" | {s['opt_s']:.2f} | {s['val_recall@10_first']:.3f} -> {s['val_recall@10_last']:.3f} |")


if __name__ == "__main__":
    main()
