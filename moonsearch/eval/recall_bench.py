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
        batch: int = 64, progress=None, mode: str = "vector", understand: bool = False, titles: int = 300) -> dict:
    """Recall per slice for one search ``mode`` (vector / lexical / hybrid; see SearchService.search).
    Slices: query modality, top-level category, text queries that name an attribute value (colour,
    brand ...: the 'attribute-bearing' slice), and exact-title queries (``titles`` catalog titles, each
    should find its own product)."""
    rows = load_queries(data, split, limit)
    catalog = pq.read_table(data / "catalog.parquet", columns=["item_id", "title", "category"]).to_pylist()
    cat = {r["item_id"]: r["category"] for r in catalog}
    plain = mode == "vector" and not understand
    ranked, enc_s, search_s = [], 0.0, 0.0
    tick = progress(len(rows) + min(titles, len(catalog))) if progress else None

    def ranked_for(qs: list[Query]) -> list[list[str]]:
        nonlocal enc_s, search_s
        t0 = time.perf_counter()
        xq = svc.encoder.encode_queries(qs) if (mode != "lexical" or any(q.image is not None for q in qs)) else None
        t1 = time.perf_counter()
        if plain:
            hits = svc.search_vectors(xq, k=max(KS), route=route)
        else:
            hits = [svc.search(q.text, q.image, k=max(KS), mode=mode if (q.text or mode != "lexical") else "vector",
                               understand=understand, vector=None if xq is None else xq[i], route=route).hits
                    for i, q in enumerate(qs)]
        search_s += time.perf_counter() - t1
        enc_s += t1 - t0
        return [[h.item_id for h in hs] for hs in hits]

    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        ranked.extend(ranked_for([Query(b["query_text"], load_image(b["query_image"], data) if b["query_image"]
                                        else None) for b in part]))
        if tick:
            tick(len(part))
    ranks = first_hit_ranks(ranked, [{b["item_id"]} for b in rows])
    result = {"encoder": svc.index.encoder["name"], "index": str(svc.index.root), "split": split, "route": route,
              "mode": mode, "understand": understand, "fusion": svc.fusion if mode == "hybrid" else None,
              "queries": len(rows), "encode_ms_per_query": 1000 * enc_s / max(1, len(rows)),
              "search_ms_per_query": 1000 * search_s / max(1, len(rows)),
              "all": summarize(ranks, KS), "by_modality": {}, "by_top_category": {}, "slices": {}}
    for m in ("text", "image", "text+image"):
        sel = np.array([b["modality"] == m for b in rows])
        if sel.any():
            result["by_modality"][m] = summarize(ranks[sel], KS)
    gaz = svc.gazetteer

    def names_a_value(text):
        u = gaz.parse(text) if text else None
        return bool(u) and (any(k != "category" for k in u.filters) or bool(u.boosts))

    bearing = np.array([names_a_value(b["query_text"]) for b in rows])
    if bearing.any():
        result["slices"]["attribute-bearing text"] = summarize(ranks[bearing], KS)
    tops = sorted({(cat.get(b["item_id"]) or ["?"])[0] for b in rows})
    for t in tops:
        sel = np.array([(cat.get(b["item_id"]) or ["?"])[0] == t for b in rows])
        result["by_top_category"][t] = summarize(ranks[sel], KS)
    if titles:
        rng = np.random.default_rng(0)
        pick = [catalog[i] for i in sorted(rng.choice(len(catalog), min(titles, len(catalog)), replace=False))]
        t_ranked = []
        for s in range(0, len(pick), batch):
            t_ranked.extend(ranked_for([Query(r["title"]) for r in pick[s:s + batch]]))
            if tick:
                tick(len(pick[s:s + batch]))
        result["slices"]["exact title"] = summarize(first_hit_ranks(t_ranked, [{r["item_id"]} for r in pick]), KS)
    return result


def markdown(results: list[dict]) -> str:
    cols = [f"R@{k}" for k in KS] + ["MRR@10", "n"]
    lines = []
    for res in results:
        lines.append(f"### {res['encoder']}, mode {res.get('mode', 'vector')}"
                     f"{' + understanding' if res.get('understand') else ''} (split {res['split']}, route {res['route']}, "
                     f"encode {res['encode_ms_per_query']:.1f} ms/q, search {res['search_ms_per_query']:.2f} ms/q)\n")
        lines.append("| slice | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        rows = [("all", res["all"])] + [(f"modality: {k}", v) for k, v in res["by_modality"].items()] + \
            [(k, v) for k, v in res.get("slices", {}).items()] + \
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
            how = res.get("mode", "vector") + ("+u" if res.get("understand") else "")
            ax.plot(KS, [r[f"R@{k}"] for k in KS], marker="o", label=f"{res['encoder']} {how}{route} {m}",
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
