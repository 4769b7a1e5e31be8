"""Load test of `moonsearch serve` on loopback: text, photo and mixed traffic at several concurrencies, a
10,000-request text soak, and traffic during hot reloads. Bounded: each cell stops after --requests requests
or --seconds seconds, whichever comes first.

    python benchmarks/serve.py --index demo/index            # ~6 minutes on 2 cores with clip-mini
    python benchmarks/serve.py --index demo/index --quick    # a minute: fewer requests, no soak

The server runs in its own process (`moonsearch serve`, as users start it) on a copy of the index (the
reload cells delete items from it); the load generator is one asyncio process with httpx. Both share the
machine's cores, so the figures are what one 2-core box does, client included.
Writes bench-out/serve.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TEXTS = ["red sneakers", "leather handbag", "blue denim jeans", "wireless headphones", "ceramic teapot",
         "striped t-shirt", "black boots size 42", "wooden chair", "smartphone 128GB", "pink dotted dress",
         "gold wristwatch", "green backpack", "white table lamp", "knit hoodie", "compact camera", "vase"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def scrape_batches(client) -> tuple[float, int]:
    text = (await client.get("/metrics")).text
    vals = {}
    for line in text.splitlines():
        if line.startswith(("moonsearch_encode_batch_size_sum", "moonsearch_encode_batch_size_count")):
            k, v = line.split()
            vals[k] = float(v)
    return vals.get("moonsearch_encode_batch_size_sum", 0.0), int(vals.get("moonsearch_encode_batch_size_count", 0))


MODE: dict = {}  # extra /search fields (--mode)


async def cell(url: str, kind: str, concurrency: int, max_requests: int, max_seconds: float, photos: list[bytes],
               during=None) -> dict:
    rng = random.Random(f"{kind}-{concurrency}")
    lat, errors, statuses = [], 0, {}
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        b_sum0, b_cnt0 = await scrape_batches(client)
        t_end = time.perf_counter() + max_seconds

        async def one():
            nonlocal sent, errors
            while sent < max_requests and time.perf_counter() < t_end:
                sent += 1
                k = kind if kind != "mixed" else rng.choice(["text", "text", "text", "photo"])
                t0 = time.perf_counter()
                try:
                    if k == "text":
                        r = await client.post("/search", json={"q": rng.choice(TEXTS), "limit": 10, **MODE})
                    else:
                        r = await client.post("/search/image", files={"file": ("q.jpg", rng.choice(photos))},
                                              data={"limit": "10"})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                lat.append(time.perf_counter() - t0)
                statuses[str(code)] = statuses.get(str(code), 0) + 1
                if code != 200:
                    errors += 1

        t0 = time.perf_counter()
        side = asyncio.create_task(during()) if during else None
        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        side_result = await side if side else None
        b_sum1, b_cnt1 = await scrape_batches(client)
    n = len(lat)
    out = {"traffic": kind, "concurrency": concurrency, "requests": n, "seconds": round(wall, 2),
           "qps": round(n / wall, 1), "p50_ms": round(1000 * pct(lat, 50), 1), "p99_ms": round(1000 * pct(lat, 99), 1),
           "mean_batch": round((b_sum1 - b_sum0) / max(1, b_cnt1 - b_cnt0), 2), "errors": errors, "statuses": statuses}
    if side_result is not None:
        out["reloads"] = side_result
    return out


def start_server(index: Path, port: int, extra: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moonsearch")
    cmd = [str(exe) if exe.exists() else "moonsearch", "serve", "--index", str(index), "--port", str(port),
           "--reload-interval", "0.5", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MOONSEARCH_API_KEY": ""})


def stop_server(proc: subprocess.Popen, wait: float = 20) -> None:
    """Ctrl-C, as a user stops it; killed if it has not exited after ``wait`` seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).json() | {"ready_after_s": round(time.time() - t0, 1)}
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not become ready")


async def main_async(args) -> dict:
    from moonsearch.index.index_set import IndexSet

    work = Path(tempfile.mkdtemp(prefix="moonsearch-serve-bench-"))
    served = work / "index"
    shutil.copytree(args.index, served, ignore=shutil.ignore_patterns("embeddings"))
    catalog = IndexSet.load(served)
    photos = []
    for c in catalog.categories.values():
        for imgs in c.meta.column("images").to_pylist():
            if imgs and Path(imgs[0]).is_file() and len(photos) < 64:
                photos.append(Path(imgs[0]).read_bytes())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(served, port, ["--max-wait-ms", str(args.max_wait_ms)])
    try:
        health = wait_ready(url, proc)
        print(f"server ready after {health['ready_after_s']} s: {health}")
        rows = []
        for kind in ("text", "photo", "mixed"):
            for c in args.concurrency:
                r = await cell(url, kind, c, args.requests, args.seconds, photos)
                print(r)
                rows.append(r)
        if args.soak:
            r = await cell(url, "text", 32, args.soak, 3600, photos)
            r["traffic"] = "text soak"
            print(r)
            rows.append(r)

        ids = [i for c in catalog.categories.values() for i in c.meta.column("item_id").to_pylist()]

        async def reloads():
            done = 0
            for k in range(args.reloads):  # real deletes: category folders rewritten, manifest swapped
                await asyncio.sleep(1.0)
                await asyncio.to_thread(IndexSet.load(served).delete, {ids[k]})
                done += 1
            await asyncio.sleep(1.5)
            return done

        r = await cell(url, "text", 8, 10 ** 9, args.reloads * 1.0 + 3, photos, during=reloads)
        r["traffic"] = "text during reloads"
        after = httpx.get(url + "/health").json()["items"]
        r["items_before_after"] = [health["items"], after]
        print(r)
        rows.append(r)
        return {"index": str(args.index), "encoder": health["encoder"], "items": health["items"],
                "text_mode": MODE or "server default (hybrid + understanding)",
                "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(), "rows": rows}
    finally:
        stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict) -> str:
    lines = [f"Server: `moonsearch serve` ({res['encoder']}, {res['items']} items, max wait {res['max_wait_ms']} ms), "
             f"{res['cpus']} cores shared with the load generator; text queries: {res.get('text_mode')}.", "",
             "| traffic | concurrency | requests | QPS | p50 ms | p99 ms | mean batch | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['traffic']} | {r['concurrency']} | {r['requests']} | {r['qps']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['mean_batch']} | {r['errors']} |")
    text = [r for r in res["rows"] if r["traffic"] == "text"]
    by_c = {r["concurrency"]: r["qps"] for r in text}
    if 1 in by_c and 32 in by_c:
        lines += ["", f"Text QPS at concurrency 32 / concurrency 1: {by_c[32] / by_c[1]:.2f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("demo/index"))
    ap.add_argument("--concurrency", type=int, action="append")
    ap.add_argument("--requests", type=int, default=600, help="most requests per cell")
    ap.add_argument("--seconds", type=float, default=30.0, help="most seconds per cell")
    ap.add_argument("--soak", type=int, default=10000, help="text requests at concurrency 32 (0: none)")
    ap.add_argument("--reloads", type=int, default=5, help="index changes during the reload cell")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="100 requests / 10 s per cell, no soak")
    ap.add_argument("--mode", choices=["vector", "lexical", "hybrid"], help="text queries' search mode (default: "
                    "the server's, hybrid with query understanding; vector also turns understanding off)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    args.concurrency = args.concurrency or [1, 8, 32]
    if args.mode:
        MODE.update({"mode": args.mode} | ({"understand": False} if args.mode == "vector" else {}))
    if args.quick:
        args.requests, args.seconds, args.soak, args.reloads = 100, 10.0, 0, 2
    import gc

    gc.collect()
    gc.freeze()  # the load generator is Python too: keep its collector from stalling the measurement
    res = asyncio.run(main_async(args))
    from moonsearch.utils.io import write_report

    write_report(res, markdown(res), args.out, "serve")


if __name__ == "__main__":
    main()
