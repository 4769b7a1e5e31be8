"""Which lexical engine: our numpy/scipy BM25 (moonsearch/index/lexical.py) vs bm25s vs tantivy, on the
same titles. Build time, query p50 / p99 (top 100, one thread, one query at a time) and whether the
top-10 agree with ours, at 2,000 (the demo catalog) and N synthetic titles.

    python benchmarks/lexical_libs.py --index demo/index --n 1000000     # ~3 minutes on 2 cores

bm25s and tantivy are measured here only (pip install bm25s tantivy); moonsearch does not depend on them.
Writes bench-out/lexical_libs.{json,md}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def timed(fn, queries):
    out, ts = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        ts.append(time.perf_counter() - t0)
    return out, 1000 * float(np.median(ts)), 1000 * float(np.percentile(ts, 99))


def run(texts: list[str], queries: list[str]) -> dict:
    from moonsearch.index.lexical import CategoryTerms, LexicalSet, analyse

    res = {"items": len(texts)}
    t0 = time.perf_counter()
    ours = LexicalSet({"all": CategoryTerms.build(texts)})
    res["moonsearch"] = {"build_s": time.perf_counter() - t0}
    top_ours, p50, p99 = timed(lambda q: [r for _, _, r in ours.search(q, 100)], queries)
    res["moonsearch"].update(p50_ms=p50, p99_ms=p99)

    import bm25s

    t0 = time.perf_counter()
    ret = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ret.index([analyse(t) for t in texts], show_progress=False)
    res["bm25s"] = {"build_s": time.perf_counter() - t0}

    def b_search(q):
        toks = analyse(q)
        if not toks:
            return []
        s = ret.get_scores(toks)
        top = np.argpartition(-s, min(100, len(s) - 1))[:100]
        return [int(i) for i in top[np.argsort(-s[top], kind="stable")] if s[i] > 0]

    top_b, p50, p99 = timed(b_search, queries)
    res["bm25s"].update(p50_ms=p50, p99_ms=p99)

    import tantivy

    t0 = time.perf_counter()
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field("row", stored=True, fast=True)
    sb.add_text_field("body", stored=False, tokenizer_name="en_stem")
    index = tantivy.Index(sb.build())
    w = index.writer(heap_size=256_000_000, num_threads=1)
    for i, t in enumerate(texts):
        w.add_document(tantivy.Document(row=i, body=t))
    w.commit()
    w.wait_merging_threads()
    index.reload()
    searcher = index.searcher()
    res["tantivy"] = {"build_s": time.perf_counter() - t0}

    def t_search(q):
        toks = " ".join(analyse(q))  # same terms; tantivy stems again (idempotent on stems)
        if not toks:
            return []
        hits = searcher.search(index.parse_query(toks, ["body"]), 100).hits
        return [searcher.doc(addr)["row"][0] for _, addr in hits]

    top_t, p50, p99 = timed(t_search, queries)
    res["tantivy"].update(p50_ms=p50, p99_ms=p99)
    for name, tops in (("bm25s", top_b), ("tantivy", top_t)):
        agree = [len(set(a[:10]) & set(b[:10])) / max(1, min(10, len(a))) for a, b in zip(top_ours, tops) if a]
        res[name]["top10_overlap_with_ours"] = float(np.mean(agree)) if agree else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("demo/index"))
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hybrid import synthetic_titles

    from moonsearch.index.index_set import IndexSet
    from moonsearch.index.lexical import meta_texts, words
    from moonsearch.utils.io import write_report

    idx = IndexSet.load(args.index)
    texts = [t for c in idx.categories.values() for t in meta_texts(c.meta)]
    rng = np.random.default_rng(0)
    queries = [" ".join(texts[i].split()[1:3]) for i in rng.integers(0, len(texts), 300)]
    rows = [run(texts, queries)]
    if args.n:
        vocab = sorted({w for t in texts for w in words(t)})
        big = synthetic_titles(args.n, vocab)
        qs = [" ".join(big[i].split()[:2]) for i in rng.integers(0, args.n, 200)]
        rows.append(run(big, qs))
    lines = ["| items | engine | build s | p50 ms | p99 ms | top-10 overlap with ours |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("moonsearch", "bm25s", "tantivy"):
            e = r[name]
            ov = e.get("top10_overlap_with_ours")
            lines.append(f"| {r['items']} | {name} | {e['build_s']:.2f} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | "
                         f"{'-' if ov is None and name == 'moonsearch' else f'{ov:.3f}' if ov is not None else '-'} |")
    write_report(rows, "\n".join(lines) + "\n", args.out, "lexical_libs")


if __name__ == "__main__":
    main()
