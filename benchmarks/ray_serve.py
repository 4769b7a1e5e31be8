"""Serving through Ray Serve vs plain `moonsearch serve`, on the same machine and index, one run.

    python benchmarks/ray_serve.py --index demo/index     # ~8 minutes on 2 cores with moon-mini

Three servers, started one after the other as users start them (`moonsearch serve`, `moonsearch serve
--ray auto --shards 1`, `moonsearch serve --ray auto --shards 2`), each loaded with the same bounded
cells of benchmarks/serve.py (text at concurrency 1 / 8 / 32, mixed text + photo at 8; each cell stops
after --requests requests or --seconds seconds). Before the load, each server's top-10 for every test
text is compared with the plain server's. Writes bench-out/ray-serve.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import TEXTS, cell, free_port, start_server, stop_server, wait_ready  # noqa: E402

SETUPS = {"moonsearch serve": [], "serve --ray, 1 shard": ["--ray", "auto", "--shards", "1"],
          "serve --ray, 2 shards": ["--ray", "auto", "--shards", "2"]}


def top10(url: str) -> dict[str, list[str]]:
    return {q: [h["item_id"] for h in httpx.post(url + "/search", json={"q": q, "limit": 10}, timeout=60).json()["hits"]]
            for q in TEXTS}


def rss_mib() -> dict[str, float]:
    """Resident memory of this machine's moonsearch / Ray Serve processes, by process title."""
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            rss = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS")).split()[1]) / 1024
        except (OSError, StopIteration):
            continue
        for key in ("Encoder", "Shard0", "Shard1", "Router", "ProxyActor", "ServeController", "moonsearch serve"):
            if key in cmd and "benchmarks/ray_serve.py" not in cmd:
                out[key] = round(out.get(key, 0.0) + rss, 1)
                break
    return out


async def run_setup(name: str, extra: list[str], served: Path, args, photos) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = start_server(served, port, ["--reload-interval", "0", *extra])
    try:
        health = wait_ready(url, proc, timeout=600)
        ready = round(time.time() - t0, 1)
        print(f"{name}: ready after {ready} s")
        tops = top10(url)
        rows = []
        for kind, c in (("text", 1), ("text", 8), ("text", 32), ("mixed", 8)):
            r = await cell(url, kind, c, args.requests, args.seconds, photos)
            print(name, r)
            rows.append(r)
        return {"setup": name, "ready_after_s": ready, "items": health["items"], "rows": rows, "top10": tops,
                "rss_mib": rss_mib()}
    finally:
        stop_server(proc, 60)
        if extra:  # the Ray cluster the server started
            subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


async def main_async(args) -> dict:
    from moonsearch.index.index_set import IndexSet

    work = Path(tempfile.mkdtemp(prefix="moonsearch-ray-serve-bench-"))
    served = work / "index"
    shutil.copytree(args.index, served, ignore=shutil.ignore_patterns("embeddings"))
    photos = []
    for c in IndexSet.load(served).categories.values():
        for imgs in c.meta.column("images").to_pylist():
            if imgs and Path(imgs[0]).is_file() and len(photos) < 64:
                photos.append(Path(imgs[0]).read_bytes())
    try:
        results = [await run_setup(n, extra, served, args, photos) for n, extra in SETUPS.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[0]["top10"]
    for r in results:
        r["same_top10_as_plain"] = sum(r["top10"][q] == base[q] for q in base)
        r["queries"] = len(base)
    return {"index": str(args.index), "cpus": os.cpu_count(), "requests": args.requests, "seconds": args.seconds,
            "results": results}


def markdown(res: dict) -> str:
    lines = [f"Index {res['index']}, {res['cpus']} cores shared by the server(s) and the load generator; each cell "
             f"at most {res['requests']} requests / {res['seconds']} s.", "",
             "| server | traffic | concurrency | QPS | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for s in res["results"]:
        for r in s["rows"]:
            lines.append(f"| {s['setup']} | {r['traffic']} | {r['concurrency']} | {r['qps']} | {r['p50_ms']} | "
                         f"{r['p99_ms']} | {r['errors']} |")
    lines += ["", "| server | ready after s | same top-10 as plain serve | resident memory, MiB |", "|---|---|---|---|"]
    for s in res["results"]:
        mem = ", ".join(f"{k} {v:.0f}" for k, v in s["rss_mib"].items())
        lines.append(f"| {s['setup']} | {s['ready_after_s']} | {s['same_top10_as_plain']} / {s['queries']} | {mem} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("demo/index"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the local cluster listens on loopback only
    res = asyncio.run(main_async(args))
    from moonsearch.utils.io import atomic_write_json, atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, args.out / "ray-serve.json")
    atomic_write_text(markdown(res), args.out / "ray-serve.md")
    print(markdown(res))


if __name__ == "__main__":
    main()
