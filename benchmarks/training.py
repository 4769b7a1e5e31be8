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


def data_hash(folder: Path) -> str:
    """The training / evaluation data's identity: the bytes of its catalog and behaviour log."""
    import hashlib

    h = hashlib.sha1()
    for f in ("catalog.parquet", "behavior.parquet"):
        h.update((Path(folder) / f).read_bytes())
    return h.hexdigest()[:10]


def config_key(cfg, data: str) -> str:
    """A finished run is reused only for the same effective config on the same data."""
    import hashlib

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "run_name", "data")}
    return hashlib.sha1(json.dumps([d, data], sort_keys=True, default=str).encode()).hexdigest()[:8]


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

    data = data_hash(Path(a.data))

    def row(name: str, label: str) -> dict:
        # reused only for the same vectors (encoder fingerprint), the same data and the same options
        enc = create_encoder(name)
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        f = rows / f"{slug}-{enc.fingerprint}-{data}-limit{a.limit}.json"
        if not f.exists():
            r = zero_shot.evaluate(enc, Path(a.data), limit=a.limit)
            r.update(encoder=label, fingerprint=enc.fingerprint, data=data, limit=a.limit)
            atomic_write_json(r, f)
            print(f"evaluated {label}", flush=True)
        return json.loads(f.read_text())

    results += [row("clip-mini", "clip-mini"), row("moon-mini-base", "moon-mini-base (untrained)")]
    for p in presets:
        cfg = load_config(p, data=a.data, out=a.runs, steps=a.steps)
        # a run folder per (preset, effective config, data): a changed recipe or world never reuses a stale run
        cfg = replace(cfg, run_name=f"{cfg.run_name}-{config_key(cfg, data)}")
        final = Path(cfg.out) / cfg.run_name / "final"
        if not (final / "config.json").exists():
            print(f"training {p} ...", flush=True)
            train(cfg)
        kind = json.loads((final / "config.json").read_text()).get("format", "")
        label = p + (f" ({a.steps} steps)" if a.steps else "")
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
