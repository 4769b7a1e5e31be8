"""Recall@k of an encoder + index on a behaviour log, per query modality and per top-level category.

Used by ``benchmarks/recall.py`` and ``moonsearch bench recall``. Writes ``<out>/<name>.json``,
``<name>.md`` (a markdown table) and ``<name>.png`` (recall@k curves per modality).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moonsearch.data.images import load_image
from moonsearch.eval.metrics import first_hit_ranks, summarize
from moonsearch.models.base import Query
from moonsearch.search.service import SearchService
from moonsearch.utils.io import atomic_write_json, atomic_write_text

KS = (1, 5, 10, 50)


def load_queries(data: Path, split: str = "test", limit: int | None = None) -> list[dict]:
    rows = [b for b in pq.read_table(data / "behavior.parquet").to_pylist() if b["split"] == split]
    return rows[:limit] if limit else rows


def run(svc: SearchService, data: Path, split: str = "test", route: int | None = None, limit: int | None = None,
        batch: int = 64, progress=None) -> dict:
    rows = load_queries(data, split, limit)
    cat = {r["item_id"]: r["category"] for r in pq.read_table(data / "catalog.parquet",
                                                              columns=["item_id", "category"]).to_pylist()}
    ranked, enc_s, search_s = [], 0.0, 0.0
    tick = progress(len(rows)) if progress else None
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        qs = [Query(b["query_text"], load_image(b["query_image"], data) if b["query_image"] else None) for b in part]
        t0 = time.perf_counter()
        xq = svc.encoder.encode_queries(qs)
        t1 = time.perf_counter()
        hits = svc.search_vectors(xq, k=max(KS), route=route)
        search_s += time.perf_counter() - t1
        enc_s += t1 - t0
        ranked.extend([h.item_id for h in hs] for hs in hits)
        if tick:
            tick(len(part))
    ranks = first_hit_ranks(ranked, [{b["item_id"]} for b in rows])
    result = {"encoder": svc.index.encoder["name"], "index": str(svc.index.root), "split": split, "route": route,
              "queries": len(rows), "encode_ms_per_query": 1000 * enc_s / max(1, len(rows)),
              "search_ms_per_query": 1000 * search_s / max(1, len(rows)),
              "all": summarize(ranks, KS), "by_modality": {}, "by_top_category": {}}
    for m in ("text", "image", "text+image"):
        sel = np.array([b["modality"] == m for b in rows])
        if sel.any():
            result["by_modality"][m] = summarize(ranks[sel], KS)
    tops = sorted({(cat.get(b["item_id"]) or ["?"])[0] for b in rows})
    for t in tops:
        sel = np.array([(cat.get(b["item_id"]) or ["?"])[0] == t for b in rows])
        result["by_top_category"][t] = summarize(ranks[sel], KS)
    return result


def markdown(results: list[dict]) -> str:
    cols = [f"R@{k}" for k in KS] + ["MRR@10", "n"]
    lines = []
    for res in results:
        lines.append(f"### {res['encoder']} (split {res['split']}, route {res['route']}, "
                     f"encode {res['encode_ms_per_query']:.1f} ms/q, search {res['search_ms_per_query']:.2f} ms/q)\n")
        lines.append("| slice | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        rows = [("all", res["all"])] + [(f"modality: {k}", v) for k, v in res["by_modality"].items()] + \
            [(f"category: {k}", v) for k, v in res["by_top_category"].items()]
        for name, r in rows:
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c != "n" else str(r[c]) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        for m, r in [("all", res["all"])] + list(res["by_modality"].items()):
            route = f" route {res['route']}" if res["route"] else ""
            ax.plot(KS, [r[f"R@{k}"] for k in KS], marker="o", label=f"{res['encoder']}{route} {m}",
                    linestyle="--" if route else "-")
    ax.set_xscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("recall@k on the behaviour log")
    fig.tight_layout()
    from moonsearch.utils.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write(results: list[dict], out: Path, name: str = "recall") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    atomic_write_json(results, paths["json"])
    atomic_write_text(markdown(results), paths["md"])
    plot(results, paths["png"])
    return paths
