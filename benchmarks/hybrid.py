"""Hybrid search on the demo world: recall per mode and slice, the convex-fusion alpha fitted on a
validation slice, and what the lexical side costs (latency at 2,000 and 1,000,000 items, build time and
disk beside FAISS's).

    python benchmarks/hybrid.py --index demo/index --index idx-clip        # ~10 minutes on 2 cores
    python benchmarks/hybrid.py --index demo/index --latency-only --million 1000000

Validation = the first 300 rows of the behaviour log's TRAIN split (the test split is never used to fit
alpha). Writes bench-out/hybrid.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ALPHAS = [round(a, 1) for a in np.linspace(0, 1, 11)]
MODES = [("vector", False), ("lexical", True), ("hybrid", False), ("hybrid", True)]


def fit_alpha(svc, data: Path, val: int) -> tuple[float, dict]:
    from moonsearch.eval import recall_bench

    curve = {}
    for a in ALPHAS:
        svc.fusion, svc.alpha = "convex", a
        r = recall_bench.run(svc, data, "train", limit=val, mode="hybrid", understand=True, titles=0)
        curve[a] = r["by_modality"]["text"]["R@10"]
    svc.fusion = "rrf"
    r = recall_bench.run(svc, data, "train", limit=val, mode="hybrid", understand=True, titles=0)
    curve["rrf"] = r["by_modality"]["text"]["R@10"]
    best = max(ALPHAS, key=lambda a: (curve[a], -abs(a - 0.5)))
    return best, curve


def recall_table(svc, data: Path, alpha: float, titles: int) -> list[dict]:
    from moonsearch.eval import recall_bench

    rows = []
    for mode, u in MODES:
        svc.fusion = "rrf"
        rows.append(recall_bench.run(svc, data, "test", mode=mode, understand=u, titles=titles))
    svc.fusion, svc.alpha = "convex", alpha
    r = recall_bench.run(svc, data, "test", mode="hybrid", understand=True, titles=titles)
    r["fusion"] = f"convex:{alpha}"
    rows.append(r)
    svc.fusion = "rrf"
    return rows


def synthetic_titles(n: int, vocab: list[str], seed: int = 0) -> list[str]:
    """n titles of 6 words drawn from ``vocab`` (the demo catalog's title words) plus a product code."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, len(vocab), size=(n, 6))
    codes = rng.integers(0, 10 ** 6, size=n)
    return [" ".join(vocab[j] for j in row) + f" x{c:06d}" for row, c in zip(words, codes)]


def lexical_cost(svc, queries: list[str], million: int, categories: int = 27) -> dict:
    from moonsearch.index.lexical import CategoryTerms, LexicalSet

    out = {}
    # 2,000 items: the demo index's own lexical side, per query, over all categories
    lex = svc.lexical
    times = []
    for q in queries:
        t0 = time.perf_counter()
        lex.search(q, 100)
        times.append(time.perf_counter() - t0)
    faiss_bytes = sum((c.path / "index.faiss").stat().st_size for c in svc.index.categories.values())
    lex_bytes = sum((c.path / "lexical.npz").stat().st_size for c in svc.index.categories.values()
                    if (c.path / "lexical.npz").exists())
    # the whole search beside the vector side alone, the query vector given (encoding is the same in all)
    from moonsearch.models.base import Query

    xq = svc.encoder.encode_queries([Query(text=q) for q in queries])
    per_mode = {}
    for mode, u in (("vector", False), ("hybrid", False), ("hybrid", True), ("lexical", True)):
        ts = []
        for q, v in zip(queries, xq):
            t0 = time.perf_counter()
            svc.search(q, k=10, mode=mode, understand=u, vector=v)
            ts.append(time.perf_counter() - t0)
        per_mode[mode + ("+u" if u else "")] = 1000 * float(np.median(ts))
    out["search_p50_ms"] = per_mode
    out["demo"] = {"items": svc.index.count, "p50_ms": 1000 * float(np.median(times)),
                   "p99_ms": 1000 * float(np.percentile(times, 99)), "lexical_bytes": lex_bytes,
                   "faiss_bytes": faiss_bytes,
                   "faiss_build_s": sum(c.infos.get("build_seconds", 0) for c in svc.index.categories.values())}
    if million:
        from moonsearch.index.lexical import words

        vocab = sorted({w for c in svc.index.categories.values() for t in c.meta.column("title").to_pylist()
                        for w in words(t)})
        titles = synthetic_titles(million, vocab)
        t0 = time.perf_counter()
        per = np.array_split(np.arange(million), categories)
        parts = {f"c{i}": CategoryTerms.build([titles[j] for j in idx]) for i, idx in enumerate(per)}
        build_s = time.perf_counter() - t0
        big = LexicalSet(parts)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            size = 0
            for name, p in parts.items():
                p.save(Path(d) / f"{name}.npz")
                size += (Path(d) / f"{name}.npz").stat().st_size
        rng = np.random.default_rng(1)
        qs = [" ".join(titles[i].split()[:2]) for i in rng.integers(0, million, 200)] + \
             [titles[i].split()[-1] for i in rng.integers(0, million, 100)]
        times = []
        for q in qs:
            t0 = time.perf_counter()
            big.search(q, 100)
            times.append(time.perf_counter() - t0)
        out["synthetic"] = {"items": million, "categories": categories, "build_s": build_s, "bytes": size,
                            "p50_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.percentile(times, 99))}
    return out


def markdown(res: dict) -> str:
    lines = []
    for m in res["models"]:
        lines += [f"### {m['encoder']} (index {m['index']})", "",
                  f"Convex alpha fitted on validation (text R@10 per alpha): "
                  + ", ".join(f"{a}: {v:.3f}" for a, v in m["alpha_curve"].items()) + f" -> alpha {m['alpha']}", "",
                  "| mode | all | text | image | text+image | attribute-bearing | exact title R@1 | search ms/q |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            name = r["mode"] + (" + understanding" if r["understand"] else "") + \
                (f" ({r['fusion']})" if r.get("fusion") else "")
            bm = r["by_modality"]
            lines.append(f"| {name} | {r['all']['R@10']:.3f} | {bm['text']['R@10']:.3f} | {bm['image']['R@10']:.3f} | "
                         f"{bm['text+image']['R@10']:.3f} | {r['slices']['attribute-bearing text']['R@10']:.3f} | "
                         f"{r['slices']['exact title']['R@1']:.3f} | {r['search_ms_per_query']:.1f} |")
        lines.append("")
    c = res.get("cost")
    if c:
        d = c["demo"]
        lines += ["| lexical side | items | p50 ms | p99 ms | build | disk |", "|---|---|---|---|---|---|",
                  f"| demo index (27 categories) | {d['items']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | "
                  f"(in the folder write) | {d['lexical_bytes'] / 1e3:.0f} kB (FAISS: {d['faiss_bytes'] / 1e3:.0f} kB, "
                  f"built in {d['faiss_build_s']:.2f} s) |"]
        if "synthetic" in c:
            s = c["synthetic"]
            lines.append(f"| synthetic titles ({s['categories']} categories) | {s['items']} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {s['build_s']:.1f} s | {s['bytes'] / 1e6:.1f} MB |")
        lines += ["", "Whole search p50 per query, k = 10, query vector given: " +
                  ", ".join(f"{m} {v:.2f} ms" for m, v in c["search_p50_ms"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("demo"))
    ap.add_argument("--index", type=Path, action="append")
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--titles", type=int, default=300)
    ap.add_argument("--million", type=int, default=1_000_000, help="synthetic titles for the lexical cost (0: skip)")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    from moonsearch.search.service import SearchService
    from moonsearch.utils.io import write_report

    res = {"models": []}
    indices = args.index or [args.data / "index"]
    for idx in ([] if args.latency_only else indices):
        svc = SearchService(idx)
        alpha, curve = fit_alpha(svc, args.data, args.val)
        rows = recall_table(svc, args.data, alpha, args.titles)
        res["models"].append({"encoder": svc.index.encoder["name"], "index": str(idx), "alpha": alpha,
                              "alpha_curve": {str(k): v for k, v in curve.items()}, "rows": rows})
        print(markdown({"models": res["models"][-1:]}), flush=True)
    svc = SearchService(indices[0])
    import pyarrow.parquet as pq

    beh = [b["query_text"] for b in pq.read_table(args.data / "behavior.parquet").to_pylist() if b["query_text"]][:300]
    res["cost"] = lexical_cost(svc, beh, args.million)
    write_report(res, markdown(res), args.out, "hybrid")


if __name__ == "__main__":
    main()
