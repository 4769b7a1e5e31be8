r"""MOON vs CLIP with the same training budget, plus the ablations: train every preset (resumable; a
finished run is reused), then run the paper's zero-shot tasks on all of them side by side.

    python benchmarks/training.py --preset moon-mini-cpu --preset clip-finetune      # ~45 min on 2 CPU cores
    python benchmarks/training.py --steps 100 --name ablations --preset moon-mini-cpu --preset moon-mini-no-moe \
        --preset moon-mini-unguided --preset moon-mini-no-crops --preset moon-mini-in-batch   # equal smaller budget
    ... --seed 0 --seed 1 --seed 2      # each preset once per seed; <name>-seeds.{json,md,png}: mean and spread
    ... --serve-like moon-mini          # judge each trained MOON as moon-mini is served (see served_like)

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

from moonsearch.models.moon import served_as, serving_settings

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


def served_like(final: Path, reference: Path) -> Path:
    """``final`` (a trained MOON checkpoint) with ``reference``'s serving settings (SERVED_FIELDS), as
    ``final``'s sibling ``<name>-served-<hash>``; its weights are the same bytes. An ablation is then judged
    the way the shipped model is served, so what it changes is measured in the vector search uses."""
    import hashlib
    import shutil

    from moonsearch.models.moon.encoder import is_checkpoint
    from moonsearch.utils.io import atomic_path, atomic_write_json

    if not is_checkpoint(final):
        raise ValueError(f"{final} is not a MOON checkpoint")
    conf = json.loads((final / "config.json").read_text())
    conf["moon"] = served_as(conf["moon"], reference)
    conf.setdefault("meta", {})["served_like"] = str(reference)
    tag = hashlib.sha1(json.dumps(conf["moon"], sort_keys=True).encode()).hexdigest()[:8]
    out = final.with_name(f"{final.name}-served-{tag}")
    if not (out / "config.json").exists():  # the weights first: a folder with its config is whole
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "model.safetensors") as tmp:
            shutil.copyfile(final / "model.safetensors", tmp)
        atomic_write_json(conf, out / "config.json")
    return out


def served_base(reference: Path):
    """Untrained moon-mini-base with ``reference``'s serving settings (see served_like)."""
    from moonsearch.models.moon import builtin_config
    from moonsearch.models.moon.encoder import fresh_encoder

    return fresh_encoder(replace(builtin_config("moon-mini-base"), **serving_settings(reference)),
                         "moon-mini-base, as served")


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


def task_values(r: dict) -> dict[str, float]:
    """One zero-shot row's scalars, the 21 rows of the zero-shot table: retrieval R@1, R@10 and MRR@10 per
    task (R@10 alone saturates on text+image), classification accuracy, attribute accuracy."""
    out = {f"{t} {m}": v[m] for t, v in r["retrieval"].items() for m in ("R@1", "R@10", "MRR@10") if m in v}
    out.update({f"classification {t}": v for t, v in r["classification"].items()})
    out.update({f"attribute {t}": v for t, v in r["attributes"].items()})
    return out


def seed_summary(seeded: dict[str, list[dict]]) -> dict:
    """{preset: {"seeds": n, "tasks": {task: {"mean", "sd", "min", "max", "values"}}}} (sd: sample, n - 1)."""
    out = {}
    for preset, rows in seeded.items():
        vals = [task_values(r) for r in rows]
        tasks = {}
        for t in vals[0]:
            xs = [v[t] for v in vals if t in v]
            tasks[t] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                        "min": min(xs), "max": max(xs), "values": xs}
        out[preset] = {"seeds": len(rows), "tasks": tasks}
    return out


def seed_table(summary: dict) -> str:
    names = list(summary)
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in summary[names[0]]["tasks"]:
        cells = [f"{summary[n]['tasks'][t]['mean']:.3f} ± {summary[n]['tasks'][t]['sd']:.3f}" for n in names]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_seed_report(summary: dict, out: Path, stem: str) -> None:
    """``stem``.md (mean ± sd per task and preset) and ``stem``.png (bars with the sd as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from moonsearch.utils.io import atomic_path, atomic_write_text

    atomic_write_text(seed_table(summary), out / f"{stem}.md")
    names = list(summary)
    tasks = list(summary[names[0]]["tasks"])
    fig, ax = plt.subplots(figsize=(max(7, len(tasks) * 0.8), 4.6))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        m = [summary[n]["tasks"][t]["mean"] for t in tasks]
        sd = [summary[n]["tasks"][t]["sd"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * w, m, w, yerr=sd, capsize=2, label=f"{n} ({summary[n]['seeds']} seeds)")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(names) - 1) / 2, tasks, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("zero-shot, mean and sd over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=3)  # above: never over bars
    fig.tight_layout()
    with atomic_path(out / f"{stem}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


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
    ap.add_argument("--seed", type=int, action="append",
                    help="train each preset once per seed (default: the preset's seed); with several, the report "
                         "adds each preset's mean and spread over seeds")
    ap.add_argument("--serve-like", metavar="CHECKPOINT",
                    help="judge each trained MOON with this checkpoint's serving settings (pooling, visual and "
                         "text blocks; 'moon-mini': the shipped one) instead of the settings it trained with")
    a = ap.parse_args()
    if a.serve_like == "moon-mini":
        from moonsearch.models.moon import MINI_CHECKPOINT

        a.serve_like = str(MINI_CHECKPOINT)
    presets = a.preset or PRESETS
    rows = a.out / "training-rows"  # one evaluated row per model: a rerun skips what is done
    speeds, results = {}, []

    data = data_hash(Path(a.data))

    def row(name: str, label: str, enc=None) -> dict:
        # reused only for the same vectors (encoder fingerprint), the same data and the same options
        enc = enc or create_encoder(name)
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        f = rows / f"{slug}-{enc.fingerprint}-{data}-limit{a.limit}.json"
        if not f.exists():
            r = zero_shot.evaluate(enc, Path(a.data), limit=a.limit)
            r.update(encoder=label, fingerprint=enc.fingerprint, data=data, limit=a.limit)
            atomic_write_json(r, f)
            print(f"evaluated {label}", flush=True)
        return json.loads(f.read_text())

    results.append(row("clip-mini", "clip-mini"))
    if a.serve_like:  # what training adds is then measured in the served vector too
        results.append(row("", "moon-mini-base (untrained), as served", served_base(Path(a.serve_like))))
    else:
        results.append(row("moon-mini-base", "moon-mini-base (untrained)"))
    seeded: dict[str, list[dict]] = {}
    for p in presets:
        for seed in a.seed or [None]:
            cfg = load_config(p, data=a.data, out=a.runs, steps=a.steps, seed=seed)
            # a run folder per (preset, effective config, data): a changed recipe or world never reuses a stale run
            cfg = replace(cfg, run_name=f"{cfg.run_name}-{config_key(cfg, data)}")
            final = Path(cfg.out) / cfg.run_name / "final"
            if not (final / "config.json").exists():
                print(f"training {p} (seed {cfg.seed}) ...", flush=True)
                train(cfg)
            kind = json.loads((final / "config.json").read_text()).get("format", "")
            label = p + (f" ({a.steps} steps)" if a.steps else "") + (f" seed {seed}" if seed is not None else "")
            judged = final
            if a.serve_like and kind.startswith("moonsearch-moon"):
                judged = served_like(final, Path(a.serve_like))
                label += ", as served"
            results.append(row(f"clip-mini:{judged}" if kind.startswith("moonsearch-clip-mini") else f"moon:{judged}",
                               label))
            seeded.setdefault(p + (f" ({a.steps} steps)" if a.steps else "") + (", as served" if judged != final else ""),
                              []).append(results[-1])
            speeds[label] = speed(final.parent)
    zero_shot.write(results, a.out, a.name)
    atomic_write_json(speeds, a.out / f"{a.name}-speed.json")
    if a.seed and len(a.seed) > 1:
        summary = seed_summary(seeded)
        atomic_write_json(summary, a.out / f"{a.name}-seeds.json")
        write_seed_report(summary, a.out, f"{a.name}-seeds")
        print(seed_table(summary))
    print(zero_shot.table(results))
    print("| run | samples/s | data s | forward s | backward s | optimiser s | val R@10 start -> end |")
    print("|---|---|---|---|---|---|---|")
    for p, s in speeds.items():
        print(f"| {p} | {s['samples_per_s']:.2f} | {s['data_s']:.2f} | {s['forward_s']:.2f} | {s['backward_s']:.2f}"
              f" | {s['opt_s']:.2f} | {s['val_recall@10_first']:.3f} -> {s['val_recall@10_last']:.3f} |")


if __name__ == "__main__":
    main()
