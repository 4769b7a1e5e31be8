"""The GPU paths, measured in one prepared run of a few minutes (issue 13):

1. faiss on GPU: IVF-PQ train + add + search over n structured vectors generated on the machine (10M by
   default), QPS at batch 1 / 64 / 1024, recall@10 against exact search, and the CPU build of the same data
   (same factory, same nprobe) for comparison.
2. MOON in bf16 on a Qwen2.5-VL-3B-shaped backbone (random weights, built from its config: no download),
   guided MoE on: products/s at batch 16 / 64 with 2 photos and their 2 crops each, FLOPs per product counted
   by torch's FlopCounterMode, and the share of the bf16 matrix rate measured on the same card; the same for a
   training step (forward + backward, no optimizer step).

    python benchmarks/gpu_check.py prepare --assets .gpucheck          # here: tokenizer + image processor
    python benchmarks/gpu_check.py run --assets .gpucheck --out DIR    # on the GPU machine
    python benchmarks/gpu_check.py run --assets DIR --out DIR --dry-run   # CPU, tiny shapes (the test suite)

faiss's PyPI GPU wheel (faiss-gpu-cu12) is built for CUDA 12; on a machine with only CUDA 13, run it with
benchmarks/gpu_shim (a libcublas.so.12 that forwards faiss's 8 cuBLAS calls to cuBLAS 13): see
benchmarks/README.md, "GPU check". Writes DIR/gpu-check.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 10
D = 256
THREE_B = dict(  # Qwen/Qwen2.5-VL-3B-Instruct config.json
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    image_size=448, batches=(16, 64), train_batch=8, n_general=2)
TINY = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56),
    image_size=112, batches=(2, 4), train_batch=2, n_general=2)


# ---- 1. faiss ---------------------------------------------------------------------------------------
def structured_vectors(n: int, nq: int, seed: int = 0, chunk: int = 1_000_000):
    """Vectors shaped like moonsearch's vectors-only world (category + colour + material centres + noise),
    float32, L2-normalised; queries are perturbed base vectors. Generated with torch on the GPU if there."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    unit = lambda a: a / a.norm(dim=-1, keepdim=True)  # noqa: E731
    cen = [unit(torch.randn(c, D, generator=g, device=dev)) * s for c, s in ((27, 1.0), (12, 0.6), (8, 0.4))]
    xb = np.empty((n, D), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        v = sum(c[torch.randint(len(c), (m,), generator=g, device=dev)] for c in cen)
        v = v + unit(torch.randn(m, D, generator=g, device=dev)) * 0.45
        xb[s:s + m] = unit(v).cpu().numpy()
    rng = np.random.default_rng(seed)
    xq = xb[rng.choice(n, nq, replace=False)] + rng.normal(size=(nq, D)).astype(np.float32) * 0.02
    return xb, (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)


def exact_knn(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.from_numpy(xq).to(dev)
    best_s = torch.full((len(xq), k), -float("inf"), device=dev)
    best_i = torch.full((len(xq), k), -1, dtype=torch.long, device=dev)
    for s in range(0, len(xb), 2_000_000):
        sc = q @ torch.from_numpy(xb[s:s + 2_000_000]).to(dev).T
        ts, ti = sc.topk(min(k, sc.shape[1]), dim=1)
        all_s, all_i = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + s], 1)
        best_s, o = all_s.topk(k, dim=1)
        best_i = all_i.gather(1, o)
    return best_i.cpu().numpy()


def faiss_section(n: int, nq: int, cpu_deadline_s: float, log=print, save=lambda d: None) -> dict:
    import faiss

    from moonsearch.eval.metrics import ann_recall
    from moonsearch.index import faiss_backend as fb

    out: dict = {"faiss": faiss.__version__, "n": n, "dim": D, "gpus": faiss.get_num_gpus() if hasattr(
        faiss, "get_num_gpus") else 0}
    t0 = time.perf_counter()
    xb, xq = structured_vectors(n, nq)
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    t = time.perf_counter()
    exact = exact_knn(xb, xq, K)
    out["exact_s"] = round(time.perf_counter() - t, 2)
    factory = fb.choose_factory(n, D, fb.IndexParams(flat_below=0, ivfpq_from=0))
    nlist = int(factory.split(",")[0][3:])
    out["factory"], out["nprobe"] = factory, 32
    rng = np.random.default_rng(1)
    train = xb[np.sort(rng.choice(n, min(n, 39 * nlist), replace=False))]
    out["train_points"] = len(train)
    log(f"faiss {faiss.__version__}: {n:,} x {D}, {factory}, exact top-{K} in {out['exact_s']} s")

    def train_and_add(index, name):
        t = time.perf_counter()
        index.train(train)
        out[f"{name}_train_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        for s in range(0, n, 1_000_000):
            index.add(xb[s:s + 1_000_000])
        out[f"{name}_add_s"] = round(time.perf_counter() - t, 2)

    def qps(search) -> dict:
        """Queries/s at batch 1 (200 queries) / 64 / 1024, after one warm-up batch."""
        row = {}
        for bs in (1, 64, 1024):
            qs = xq[:200] if bs == 1 else xq
            search(qs[:bs])
            t = time.perf_counter()
            for s in range(0, len(qs), bs):
                search(qs[s:s + bs])
            row[f"qps_batch{bs}"] = round(len(qs) / (time.perf_counter() - t), 1)
        return row

    def measure(index, name, params):
        row = qps(lambda q: index.search(q, K, params=params))
        _, found = index.search(xq, K, params=params)
        row["recall10"] = round(ann_recall(found, exact), 4)
        _, short = index.search(xq, K * 8, params=params)  # the moonsearch path: exact re-rank of 8k
        sc = np.einsum("qd,qcd->qc", xq, xb[np.maximum(short, 0)])
        sc[short < 0] = -np.inf
        rr = np.take_along_axis(short, np.argsort(-sc, axis=1)[:, :K], 1)
        row["recall10_rerank8"] = round(ann_recall(rr, exact), 4)
        log(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        return row, found

    if out["gpus"] > 0:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # float16 lookup tables: 64 sub-quantisers exceed shared memory in float32
        cpu_ix = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        gix = faiss.index_cpu_to_gpu(res, 0, cpu_ix, co)
        train_and_add(gix, "gpu")
        out["gpu"], gpu_found = measure(gix, "gpu", faiss.SearchParametersIVF(nprobe=32))
        del gix
        save(out)
    import torch

    if torch.cuda.is_available():  # exact search on the GPU: float16 base, one matrix product + top-k per batch
        base = torch.from_numpy(xb).to("cuda", torch.float16)
        out["torch_gpu_exact_bytes_per_vector"] = 2 * D

        def gpu_exact(q):
            sc = torch.from_numpy(q).to("cuda", torch.float16) @ base.T
            return sc.topk(K, dim=1).indices.cpu().numpy()

        row = qps(gpu_exact)
        row["recall10"] = round(ann_recall(np.concatenate([gpu_exact(xq[s:s + 100]) for s in range(0, nq, 100)]),
                                       exact), 4)
        out["torch_gpu_exact_fp16"] = row
        log(f"  torch GPU exact (fp16): {row}")
        del base
        torch.cuda.empty_cache()
        save(out)
    if time.perf_counter() - t0 < cpu_deadline_s:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        ix = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        train_and_add(ix, "cpu")
        out["cpu_threads"] = faiss.omp_get_max_threads()
        out["cpu"], cpu_found = measure(ix, "cpu", faiss.SearchParametersIVF(nprobe=32))
        if "gpu" in out:
            out["gpu_cpu_top10_overlap"] = round(ann_recall(gpu_found, cpu_found), 4)
    else:
        out["cpu"] = "skipped: past the deadline"
    return out


# ---- 2. MOON on a Qwen2.5-VL-3B-shaped backbone -------------------------------------------------------
def prepare(assets: Path) -> None:
    """Tokenizer (MiniLM's WordPiece + the vision tokens) and a Qwen2-VL image processor that keeps 448 px."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from moonsearch.models.moon.backbones import VISION_TOKENS
    from moonsearch.models.towers import minilm_path

    assets.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.save_pretrained(assets)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448).save_pretrained(assets)


def build_moon(assets: Path, shape: dict, device: str, dtype):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel

    from moonsearch.models.moon import moe as moe_mod
    from moonsearch.models.moon.adapters import QwenVLAdapter
    from moonsearch.models.moon.backbones import VISION_TOKENS
    from moonsearch.models.moon.encoder import MoonConfig, MoonModel

    tok = AutoTokenizer.from_pretrained(assets)
    ids = tok.convert_tokens_to_ids(VISION_TOKENS)
    text = dict(shape["text"])
    text.setdefault("vocab_size", len(tok))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=shape["vision"], image_token_id=ids[2],
                           video_token_id=ids[3], vision_start_token_id=ids[0], vision_end_token_id=ids[1])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLModel(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    adapter = QwenVLAdapter(model, tok, AutoImageProcessor.from_pretrained(assets), image_size=shape["image_size"])
    mcfg = MoonConfig(backbone="qwen-vl", source=str(assets), use_crops=False, image_size=shape["image_size"],
                      moe=moe_mod.MoEConfig(n_general=shape["n_general"], top_k=1))
    moon = MoonModel(mcfg, adapter)  # the experts are copied on the device; the gates move with .to()
    return moon.to(device=device, dtype=dtype)


def products(n: int, size: int, seed: int = 0):
    """n products, each 2 photos + their 2 centre crops (the crops the detector would add), title, path,
    attributes."""
    from PIL import Image

    from moonsearch.models.moon.tokens import product_segments

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photos = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
        crops = [p.crop((size // 8, size // 8, size - size // 8, size - size // 8)) for p in photos]
        out.append(product_segments(f"men's leather running sneakers model {i} with cushioned sole, red",
                                    ["apparel", "shoes", "sneakers"],
                                    {"colour": "red", "material": "leather", "brand": "acme", "size": "42"},
                                    photos, crops))
    return out


def sdpa_flop_mapping() -> dict:
    """FLOPs of torch's fused attention kernels that also accept grouped-query shapes (Qwen's 16 query heads
    over 2 key/value heads), which torch's own counter refuses: 2*b*h*s*t*(d + dv) forward, twice that backward."""
    import torch

    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        b, h, s, d = q
        return 2 * b * h * s * k[-2] * (d + v[-1])

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return 2 * fwd(q, k, v)

    out = {}
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            out[getattr(aten, name)] = fwd
        if hasattr(aten, name + "_backward"):
            out[getattr(aten, name + "_backward")] = bwd
    return out


def moon_section(assets: Path, dry: bool, log=print) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from moonsearch.models.moon.tokens import PAD

    dev = "cpu" if dry else "cuda"
    shape = TINY if dry else THREE_B
    dtype = torch.bfloat16
    out: dict = {"shape": "tiny (dry run)" if dry else "Qwen2.5-VL-3B", "dtype": "bfloat16",
                 "attention": "sdpa (vision windows batched: moonsearch.models.moon.adapters.batch_vision_windows)",
                 "pictures_per_product": 4, "image_size": shape["image_size"]}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    if not dry:  # the ceiling: a large bf16 matrix product on this card
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        b = torch.randn(8192, 8192, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        out["matmul_tflops"] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12, 1)
        del a, b
    moon = build_moon(assets, shape, dev, dtype)
    out["params_b"] = round(sum(p.numel() for p in moon.parameters()) / 1e9, 3)
    out["moe_layers"] = len(moon.moe_layers)

    def forward(inputs):
        tt = inputs["token_types"]
        for m in moon.moe_layers:
            m.token_types = tt
        hidden = moon.adapter.run(inputs)
        aux = sum(m.aux_loss for m in moon.moe_layers)
        return moon.pool(hidden, tt), aux

    def timed(fn, reps):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def flops(fn):
        try:
            with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as fc:
                fn()
            return fc.get_total_flops()
        except Exception as e:  # the timing still counts; the share of peak is then unknown
            log(f"  FLOP count failed: {e!r}")
            return float("nan")

    rows = []
    for bs in shape["batches"]:
        inputs = moon.adapter.prepare(products(bs, shape["image_size"]))
        out.setdefault("tokens_per_product", int((inputs["token_types"] != PAD).sum()) // bs)
        with torch.inference_mode():
            f = flops(lambda: forward(inputs))
            s = timed(lambda: forward(inputs), 2 if dry else 5)
        row = dict(step="encode", batch=bs, products_per_s=round(bs / s, 2), gflop_per_product=round(f / bs / 1e9, 2),
                   achieved_tflops=round(f / s / 1e12, 4))
        rows.append(row)
        log(f"  encode batch {bs}: {row}")
        del inputs
    moon.train()
    for p in moon.adapter.model.visual.parameters():
        p.requires_grad_(False)
    bs = shape["train_batch"]
    inputs = moon.adapter.prepare(products(bs, shape["image_size"]))

    def step():
        pooled, aux = forward(inputs)
        (pooled.float().pow(2).mean() + 0.01 * aux).backward()
        for p in moon.parameters():
            p.grad = None

    f = flops(step)
    s = timed(step, 2 if dry else 4)
    row = dict(step="train fwd+bwd", batch=bs, products_per_s=round(bs / s, 2), gflop_per_product=round(f / bs / 1e9, 2),
               achieved_tflops=round(f / s / 1e12, 4))
    rows.append(row)
    log(f"  train batch {bs}: {row}")
    if dev == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
    for r in rows:
        if "matmul_tflops" in out:
            r["share_of_measured_bf16_matmul"] = round(r["achieved_tflops"] / out["matmul_tflops"], 3)
            r["share_of_989_tflops_datasheet"] = round(r["achieved_tflops"] / 989, 3)
    out["rows"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run", "faiss"])
    ap.add_argument("--assets", type=Path, default=Path(".gpucheck"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu"))
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--cpu-deadline", type=float, default=200.0, help="skip the CPU faiss build after this many s")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, not the GPU")
    ap.add_argument("--skip", action="append", default=[], choices=["faiss", "moon"])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "prepare":
        prepare(a.assets)
        return
    if a.what == "faiss":  # a child process: a faiss GPU failure cannot take the MOON part down with it
        save = lambda d: (a.out / "faiss.json").write_text(json.dumps(d, indent=1))  # noqa: E731
        res = faiss_section(5_000 if a.dry_run else a.n, min(a.queries, 200) if a.dry_run else a.queries,
                            a.cpu_deadline, save=save)
        (a.out / "faiss.json").write_text(json.dumps(res, indent=1))
        return
    import torch

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "dry_run": a.dry_run}
    import transformers

    report["transformers"] = transformers.__version__
    path = a.out / "gpu-check.json"
    if "moon" not in a.skip:  # first: the faiss half has a deadline of its own
        t = time.time()
        try:
            report["moon"] = moon_section(a.assets, a.dry_run)
        except Exception as e:  # report what broke; the faiss half still runs
            import traceback

            report["moon"] = {"error": repr(e), "trace": traceback.format_exc()[-3000:]}
            print(report["moon"]["trace"])
        report["moon_wall_s"] = round(time.time() - t, 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path.write_text(json.dumps(report, indent=1))
    if "faiss" not in a.skip:
        t = time.time()
        cmd = [sys.executable, __file__, "faiss", "--out", str(a.out), "--n", str(a.n), "--queries", str(a.queries),
               "--cpu-deadline", str(a.cpu_deadline)] + (["--dry-run"] if a.dry_run else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(p.stdout[-4000:])
        if p.returncode == 0:
            report["faiss"] = json.loads((a.out / "faiss.json").read_text())
        else:
            part = a.out / "faiss.json"
            report["faiss"] = {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:],
                               "partial": json.loads(part.read_text()) if part.exists() else None}
            print(p.stderr[-3000:])
        report["faiss_wall_s"] = round(time.time() - t, 1)
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
