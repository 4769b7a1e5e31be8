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
    vision=dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=64, patch_size=14,
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


def faiss_measure(search, xq: np.ndarray, xb: np.ndarray, exact: np.ndarray, name: str, log=print):
    """QPS at batch 1 (200 queries) / 64 / 1024 after one warm-up batch, recall@10 against exact search, and
    recall@10 after moonsearch's exact re-rank of the top 8k. ``search(q, k) -> ids``."""
    from moonsearch.eval.metrics import ann_recall

    row = {}
    for bs in (1, 64, 1024):
        qs = xq[:200] if bs == 1 else xq
        search(qs[:bs], K)
        t = time.perf_counter()
        for s in range(0, len(qs), bs):
            search(qs[s:s + bs], K)
        row[f"qps_batch{bs}"] = round(len(qs) / (time.perf_counter() - t), 1)
    found = search(xq, K)
    row["recall10"] = round(ann_recall(found, exact), 4)
    for depth in (8, 32):  # the moonsearch path: exact re-rank of the top 8k (32k above 5M vectors)
        short = search(xq, K * depth)
        sc = np.einsum("qd,qcd->qc", xq, xb[np.maximum(short, 0)])
        sc[short < 0] = -np.inf
        rr = np.take_along_axis(short, np.argsort(-sc, axis=1)[:, :K], 1)
        row[f"recall10_rerank{depth}"] = round(ann_recall(rr, exact), 4)
    log(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return row, found


def cpu_build(data: Path, factory: str, out: Path, threads: int) -> None:
    """The CPU build of the same data (a child process, so that a deadline can stop it): train on the same
    points, add in 1M chunks, then search like the GPU index. Writes out (JSON) after each phase and the
    found ids next to it."""
    import faiss

    faiss.omp_set_num_threads(threads)
    xb, xq = np.load(data / "xb.npy", mmap_mode="r"), np.load(data / "xq.npy")
    exact, train = np.load(data / "exact.npy"), np.load(data / "train.npy")
    res: dict = {"threads": threads}
    ix = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    ix.train(train)
    res["train_s"] = round(time.perf_counter() - t, 2)
    out.write_text(json.dumps(res))
    t = time.perf_counter()
    for s in range(0, len(xb), 1_000_000):
        ix.add(np.ascontiguousarray(xb[s:s + 1_000_000]))
        res["added"] = min(len(xb), s + 1_000_000)
        res["add_s"] = round(time.perf_counter() - t, 2)
        out.write_text(json.dumps(res))
    params = faiss.SearchParametersIVF(nprobe=32)
    row, found = faiss_measure(lambda q, k: ix.search(q, k, params=params)[1], xq, np.asarray(xb), exact, "cpu")
    res.update(row)
    np.save(out.with_suffix(".npy"), found)
    out.write_text(json.dumps(res))


def faiss_section(n: int, nq: int, cpu_deadline_s: float, log=print, save=lambda d: None) -> dict:
    """GPU build (when faiss sees a GPU) and, in a child process started at once on all but 4 of the cores,
    the CPU build of the same data, stopped at ``cpu_deadline_s`` after the data exists."""
    import shutil
    import tempfile

    import faiss
    import torch

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
    need = 1.2 * (xb.nbytes + train.nbytes)
    shm = next((d for d in (Path("/dev/shm"), Path(tempfile.gettempdir()))
                if d.is_dir() and shutil.disk_usage(d).free > need), Path(tempfile.gettempdir()))
    data = Path(tempfile.mkdtemp(prefix="moonsearch-gpucheck-", dir=shm))
    for name, arr in (("xb", xb), ("xq", xq), ("exact", exact), ("train", train)):
        np.save(data / f"{name}.npy", arr)
    threads = max(1, (os.cpu_count() or 1) - (4 if out["gpus"] else 0))
    cpu_json = data / "cpu.json"
    child = subprocess.Popen([sys.executable, __file__, "faiss-cpu", "--assets", str(data), "--out", str(cpu_json),
                              "--factory", factory, "--threads", str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu_started = time.perf_counter()
    gpu_found = None
    if out["gpus"] > 0:
        try:
            free0 = torch.cuda.mem_get_info()[0]
            res = faiss.StandardGpuResources()
            scratch = 1 << 30
            res.setTempMemory(scratch)
            co = faiss.GpuClonerOptions()
            co.useFloat16 = True  # float16 lookup tables: 64 sub-quantisers exceed shared memory in float32
            gix = faiss.index_cpu_to_gpu(res, 0, faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT), co)
            t = time.perf_counter()
            gix.train(train)
            out["gpu_train_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            for s in range(0, n, 1_000_000):
                gix.add(xb[s:s + 1_000_000])
            out["gpu_add_s"] = round(time.perf_counter() - t, 2)
            gix.nprobe = 32  # GpuParameterSpace left it at 1 (recall 0.35 on the first run)
            out["gpu_nprobe"] = int(gix.nprobe)
            out["gpu"], gpu_found = faiss_measure(lambda q, k: gix.search(q, k)[1], xq, xb, exact, "gpu", log)
            # device memory the filled index holds: free memory before the build minus after, less the
            # fixed scratch space given to faiss (codes are 64 B and ids 8 B per vector)
            out["gpu"]["bytes_per_vector_on_device"] = round((free0 - torch.cuda.mem_get_info()[0] - scratch) / n, 1)
            cix = faiss.index_gpu_to_cpu(gix)  # the same trained index and codes, searched by the CPU code
            prm = faiss.SearchParametersIVF(nprobe=32)
            out["gpu_built_searched_on_cpu"], cfound = faiss_measure(
                lambda q, k: cix.search(q, k, params=prm)[1], xq, xb, exact, "GPU-built, CPU search", log)
            out["same_index_gpu_vs_cpu_top10_overlap"] = round(ann_recall(gpu_found, cfound), 4)
            del gix, cix
        except Exception as e:  # report it; the CPU build and the torch exact search still run
            out["gpu_error"] = repr(e)[-1500:]
            log(f"  faiss GPU failed: {e!r}")
        save(out)
    if torch.cuda.is_available():  # exact search on the GPU: float16 base, one matrix product + top-k per batch
        base = torch.from_numpy(xb).to("cuda", torch.float16)
        out["torch_gpu_exact_bytes_per_vector"] = 2 * D

        def gpu_exact(q, k):
            sc = torch.from_numpy(q).to("cuda", torch.float16) @ base.T
            return sc.topk(k, dim=1).indices.cpu().numpy()

        out["torch_gpu_exact_fp16"], _ = faiss_measure(
            lambda q, k: np.concatenate([gpu_exact(q[s:s + 128], k) for s in range(0, len(q), 128)]),
            xq, xb, exact, "torch GPU exact (fp16)", log)
        del base
        torch.cuda.empty_cache()
        save(out)
    try:
        child.wait(timeout=max(1.0, cpu_deadline_s - (time.perf_counter() - cpu_started)))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    cpu = json.loads(cpu_json.read_text()) if cpu_json.exists() else {}
    if child.returncode == 0:
        out["cpu"] = cpu
        cpu_found = np.load(cpu_json.with_suffix(".npy"))
        if gpu_found is not None:
            out["gpu_cpu_top10_overlap"] = round(ann_recall(gpu_found, cpu_found), 4)
    else:
        out["cpu"] = {"not finished": f"stopped at the {cpu_deadline_s:.0f} s deadline" if child.returncode in (-9, 137)
                      else f"exit {child.returncode}: {child.stderr.read()[-1500:]}", **cpu}
    shutil.rmtree(data, ignore_errors=True)
    return out


# ---- 1b. moonsearch's own large-set build on the GPU -------------------------------------------------
def stream_build(data: Path, out: Path, gpu: bool) -> None:
    """A child process: ``moonsearch index --vectors`` (the shared layout) of the world in ``data``, with the
    GPU switched off when ``gpu`` is False; writes out/build.json (seconds, and any fallback warning)."""
    import warnings

    from moonsearch.index import faiss_backend as fb
    from moonsearch.index.stream import build_from_vectors

    if not gpu:
        fb.gpu_available = lambda: False
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_from_vectors(data / "catalog.parquet", data / "vectors.npy", out, log=lambda m: None)
    (out / "build.json").write_text(json.dumps({"build_s": round(time.perf_counter() - t, 2), "gpu_used": gpu and fb.gpu_available(),
                                               "warnings": [str(w.message)[:300] for w in caught]}))


def stream_section(n: int, nq: int, cpu_deadline_s: float, log=print) -> dict:
    """``moonsearch index --vectors`` on n vectors of the vectors-only world, once on the GPU (where faiss
    sees one) and once on the CPU (stopped at ``cpu_deadline_s``): build seconds, recall@10 of an unrouted
    search against exact, its p50, and the top-10 overlap of the two builds."""
    import shutil
    import tempfile

    from moonsearch.data.synthetic import generate_vectors
    from moonsearch.eval.metrics import ann_recall
    from moonsearch.index import faiss_backend as fb
    from moonsearch.index.index_set import IndexSet
    from moonsearch.index.multi import multi_search

    root = Path(tempfile.mkdtemp(prefix="moonsearch-stream-"))
    out: dict = {"n": n, "queries": nq}
    try:
        t = time.perf_counter()
        generate_vectors(root / "w", n, dim=D, n_queries=nq)
        out["generate_s"] = round(time.perf_counter() - t, 1)
        xb, xq = np.load(root / "w" / "vectors.npy", mmap_mode="r"), np.load(root / "w" / "queries.npy")
        exact = exact_knn(np.array(xb), xq, K)  # a writable copy for torch
        found = {}
        for name in (["gpu"] if fb.gpu_available() else []) + ["cpu"]:
            cmd = [sys.executable, __file__, "stream-build", "--assets", str(root / "w"), "--out", str(root / name)]
            try:
                p = subprocess.run(cmd + (["--dry-run"] if name == "cpu" else []), capture_output=True, text=True,
                                   timeout=cpu_deadline_s if name == "cpu" else None)
            except subprocess.TimeoutExpired:
                out[name] = {"not finished": f"stopped at the {cpu_deadline_s:.0f} s deadline"}
                continue
            if p.returncode:
                out[name] = {"error": p.stderr[-1500:]}
                continue
            row = json.loads((root / name / "build.json").read_text())
            iset = IndexSet.load(root / name)
            cats = [iset.categories[c] for c in sorted(iset.categories)]
            ids = [np.array([int(x[1:]) for x in c.meta.column("item_id").to_pylist()]) for c in cats]
            multi_search(cats, xq[:10], K)  # warm
            times, hits = [], []
            for q in xq:
                t = time.perf_counter()
                h = multi_search(cats, q[None], K)[0]
                times.append(time.perf_counter() - t)
                hits.append([ids[c][r] for _, c, r in h] + [-1] * (K - len(h)))
            found[name] = np.array(hits)
            row.update(recall10=round(ann_recall(found[name], exact), 4), p50_ms=round(1e3 * float(np.median(times)), 3))
            out[name] = row
            log(f"  moonsearch index --vectors, {name}: {row}")
        if len(found) == 2:
            out["gpu_cpu_top10_overlap"] = round(ann_recall(found["gpu"], found["cpu"]), 4)
    finally:
        shutil.rmtree(root, ignore_errors=True)
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


VARIANTS = ("pad", "compile", "compile-vision", "looped-moe")


def moon_forward(moon, inputs: dict):
    """One forward over ``adapter.prepare``'s inputs: (pooled vectors, the MoE's load-balancing loss)."""
    tt = inputs["token_types"]
    for m in moon.moe_layers:
        m.token_types = tt
    hidden = moon.adapter.run(inputs)
    return moon.pool(hidden, tt), sum(m.aux_loss for m in moon.moe_layers)


def looped_moe_forward(self, x):
    """The guided MoE's dispatch as it was until 2026-11-27, kept here for the A/B (``looped-moe``): a boolean
    mask and a ``nonzero`` (a host sync) per expert and per layer, gathers and scatters by advanced indexing."""
    import torch

    from moonsearch.models.moon.tokens import ATTRIBUTE, CATEGORY

    B, T, H = x.shape
    flat, types = x.reshape(-1, H), self.token_types.reshape(-1).to(x.device)
    out = torch.zeros_like(flat)
    for e, kind in ((0, CATEGORY), (1, ATTRIBUTE)):
        idx = (types == kind).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = self.experts[e](flat[idx]).to(out.dtype)
    gidx = ((types != CATEGORY) & (types != ATTRIBUTE)).nonzero(as_tuple=True)[0]
    xs = flat[gidx]
    probs = self.gate(xs).float().softmax(-1)
    w, sel = probs.topk(self.cfg.top_k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(xs.dtype)
    acc = torch.zeros_like(xs)
    for j in range(self.cfg.n_general):
        hit = sel == j
        rows = hit.any(-1).nonzero(as_tuple=True)[0]
        if len(rows):
            acc[rows] += (w[rows] * hit[rows]).sum(-1, keepdim=True) * self.experts[2 + j](xs[rows])
    out[gidx] = acc.to(out.dtype)
    frac = torch.stack([(sel == j).any(-1).float().mean() for j in range(self.cfg.n_general)])
    self.aux_loss = self.cfg.n_general * (frac * probs.mean(0)).sum()
    return out.reshape(B, T, H)


def set_variant(moon, spec: str) -> str:
    """Bring the model to one set of speed changes, all of which keep its output; ``spec`` joins them by
    '+' ("as built": none). ``pad`` widens the vision MLP (3,420) to an aligned width with zeros
    (``pad_mlp_width``); ``compile`` runs the norms, the vision blocks' MLPs and the experts' MLPs through
    torch.compile in place (``compile_for_inference``, what ``MOONSEARCH_COMPILE=1`` does); ``compile-vision``
    compiles the vision tower's alone (frozen in training, so it runs forward only there, as in encoding);
    ``looped-moe`` puts back the MoE dispatch of before 2026-11-27 (``looped_moe_forward``)."""
    from types import MethodType

    from moonsearch.models.moon.adapters import compile_for_inference, pad_mlp_width, uncompile, unpad_mlp_width

    parts = set() if spec == "as built" else set(spec.split("+"))
    unknown = parts - set(VARIANTS)
    if unknown or {"compile", "compile-vision"} <= parts:
        raise ValueError(f"unknown or clashing variant {spec!r} (known: {', '.join(VARIANTS)})")
    said = []
    unpad_mlp_width(moon.adapter.model)  # back to the model as built, then the set's changes
    uncompile(moon)
    if "pad" in parts:
        said.append(f"{pad_mlp_width(moon.adapter.model)} MLPs padded")
    if "compile" in parts or "compile-vision" in parts:
        root = moon if "compile" in parts else moon.adapter.model.visual
        said.append(f"{compile_for_inference(root)} modules compiled")
    for m in moon.moe_layers:
        if "looped-moe" in parts:
            m.forward = MethodType(looped_moe_forward, m)
        else:
            m.__dict__.pop("forward", None)
    if "looped-moe" in parts:
        said.append(f"{len(moon.moe_layers)} MoE layers looped")
    return ", ".join(said) or "none"


def time_split(moon, forward, inputs, timed, dry: bool) -> dict:
    """Seconds of one whole forward, and of its vision tower alone, on the same batch."""
    vis = moon.adapter.model.visual
    whole = timed(lambda: forward(inputs), 1 if dry else 3)
    tower = timed(lambda: vis(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]), 1 if dry else 3)
    return {"forward_s": round(whole, 4), "vision_s": round(tower, 4), "vision_share": round(tower / whole, 3)}


KERNEL_KINDS = (("matrix product", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "sm80_", "addmm", "aten::mm", "bmm")),
                ("attention", ("flash", "fmha", "attention", "attn")),
                ("copy / gather / scatter", ("copy", "index", "gather", "scatter", "cat", "nonzero")),
                ("element-wise / reduction", ("elementwise", "reduce", "vectorized", "softmax", "norm", "triton")))


def kernel_profile(fn, dev: str, sync) -> dict:
    """torch.profiler over one call: the device kernels by total time (the top 25 and a summary by kind), the
    device's busy time against the wall time. On CPU (the dry run) the CPU operators stand in."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t
    rows = []
    for e in prof.key_averages():
        on_dev = dev == "cuda" and str(getattr(e, "device_type", "")).endswith("CUDA")
        if dev == "cuda" and not on_dev:
            continue
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if on_dev \
            else e.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key[:140], "calls": e.count, "ms": round(us / 1e3, 3)})
    rows.sort(key=lambda r: -r["ms"])
    busy = sum(r["ms"] for r in rows)
    kinds: dict[str, float] = {}
    for r in rows:
        low = r["kernel"].lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in low for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + r["ms"]
    return {"wall_ms_profiled": round(wall * 1e3, 1), "busy_ms": round(busy, 1),
            "summary": {k: round(v / busy, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} if busy else {},
            "top": rows[:25], "kernels": len(rows), "launches": sum(r["calls"] for r in rows)}



def moon_section(assets: Path, dry: bool, log=print, variants: tuple[str, ...] = (), profile: bool = False,
                 variant_deadline_s: float = 150.0, train_batches: tuple[int, ...] = (), save=lambda d: None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from moonsearch.models.moon.tokens import PAD

    started = time.perf_counter()
    dev = "cpu" if dry else "cuda"
    shape = TINY if dry else THREE_B
    train_batches = train_batches or (shape["train_batch"],)
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

    forward = lambda inputs: moon_forward(moon, inputs)  # noqa: E731

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

    rows, prepared = [], {}
    for bs in shape["batches"]:
        inputs = prepared[bs] = moon.adapter.prepare(products(bs, shape["image_size"]))
        out.setdefault("tokens_per_product", int((inputs["token_types"] != PAD).sum()) // bs)
        with torch.inference_mode():
            f = flops(lambda: forward(inputs))
            s = timed(lambda: forward(inputs), 2 if dry else 5)
        row = dict(step="encode", batch=bs, variant="as built", products_per_s=round(bs / s, 2),
                   gflop_per_product=round(f / bs / 1e9, 2), achieved_tflops=round(f / s / 1e12, 4))
        rows.append(row)
        log(f"  encode batch {bs}: {row}")
    big, small = prepared[shape["batches"][-1]], prepared[shape["batches"][0]]
    enc_flops = rows[-1]["gflop_per_product"] * 1e9 * shape["batches"][-1]
    if profile:
        with torch.inference_mode():
            out["split"] = time_split(moon, forward, big, timed, dry)
            out["profile"] = kernel_profile(lambda: forward(small), dev, sync)
        log(f"  split: {out['split']}; profile: {out['profile']['summary']}")
    moon.train()
    for p in moon.adapter.model.visual.parameters():
        p.requires_grad_(False)
    train_inputs = {tb: moon.adapter.prepare(products(tb, shape["image_size"])) for tb in train_batches}

    def step(inputs):
        pooled, aux = forward(inputs)
        (pooled.float().pow(2).mean() + 0.01 * aux).backward()
        for p in moon.parameters():
            p.grad = None

    train_flops = {}

    def train_row(tb: int, seconds: float, spec: str) -> dict:
        f = train_flops[tb]
        return dict(step="train fwd+bwd", batch=tb, variant=spec, products_per_s=round(tb / seconds, 2),
                    gflop_per_product=round(f / tb / 1e9, 2), achieved_tflops=round(f / seconds / 1e12, 4))

    for tb, inputs in list(train_inputs.items()):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            train_flops[tb] = flops(lambda: step(inputs))
            s = timed(lambda: step(inputs), 2 if dry else 4)
        except torch.OutOfMemoryError as e:  # a batch too big for the card is reported, not fatal
            del train_inputs[tb]
            out.setdefault("train_errors", {})[tb] = repr(e)[:300]
            log(f"  train batch {tb}: out of memory")
            for p in moon.parameters():
                p.grad = None
            torch.cuda.empty_cache()
            continue
        row = train_row(tb, s, "as built")
        if dev == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
        rows.append(row)
        log(f"  train batch {tb}: {row}")
    save(dict(out, rows=rows))
    applied: list[str] = []
    bsz = shape["batches"][-1]
    for spec in variants:  # each a set of changes, measured from the model as built
        t0 = time.perf_counter()
        if t0 - started > variant_deadline_s:
            applied.append(f"{spec}: skipped ({variant_deadline_s:.0f} s deadline)")
            log(f"  variant {spec} skipped: past the deadline")
            continue
        try:
            applied.append(f"{spec}: " + set_variant(moon, spec))
        except Exception as e:  # a variant that cannot run is reported, the rest still measured
            applied.append(f"{spec}: failed {e!r}")
            log(f"  variant {spec} failed: {e!r}")
            continue
        moon.eval()
        with torch.inference_mode():
            timed(lambda: forward(big), 1)  # compiles (if any) outside the timing
            s = timed(lambda: forward(big), 2 if dry else 4)
        r = dict(step="encode", batch=bsz, variant=spec, products_per_s=round(bsz / s, 2),
                 gflop_per_product=rows[0]["gflop_per_product"], achieved_tflops=round(enc_flops / s / 1e12, 4),
                 setup_s=round(time.perf_counter() - t0, 1))
        rows.append(r)
        log(f"  variant {spec}: encode {r}")
        moon.train()
        for tb, inputs in train_inputs.items():
            timed(lambda: step(inputs), 1)
            rt = train_row(tb, timed(lambda: step(inputs), 2 if dry else 4), spec)
            rows.append(rt)
            log(f"  variant {spec}: train {rt}")
        save(dict(out, rows=rows, variants=applied))
        if profile and spec == variants[-1]:
            moon.eval()
            with torch.inference_mode():
                out["split_" + spec] = time_split(moon, forward, big, timed, dry)
                out["profile_" + spec] = kernel_profile(lambda: forward(small), dev, sync)
            log(f"  profile after {spec}: {out['profile_' + spec]['summary']}")
    out["variants"] = applied
    if dev == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
    for r in rows:
        if "matmul_tflops" in out:
            r["share_of_measured_bf16_matmul"] = round(r["achieved_tflops"] / out["matmul_tflops"], 3)
            r["share_of_989_tflops_datasheet"] = round(r["achieved_tflops"] / 989, 3)
    out["rows"] = rows
    return out


# ---- 3. encoder actors sharing one GPU (issue 14) ----------------------------------------------------------
def actor(assets: Path, out: Path, barrier: Path, n: int, batch: int, reps: int, dry: bool, variants=()) -> None:
    """One encoder process, as a Ray actor with ``num_gpus=1/n`` would be: builds the model, warms up, waits
    until all n are ready, then encodes ``reps`` batches and writes when it started and ended."""
    import torch

    dev = "cpu" if dry else "cuda"
    shape = TINY if dry else THREE_B
    moon = build_moon(assets, shape, dev, torch.bfloat16)
    for v in variants:
        set_variant(moon, v)
    inputs = moon.adapter.prepare(products(batch, shape["image_size"]))

    def forward():
        moon_forward(moon, inputs)
        if dev == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        forward()
        (barrier / f"ready-{out.stem}").touch()
        deadline = time.time() + 300
        while len(list(barrier.glob("ready-*"))) < n and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        for _ in range(reps):
            forward()
        t1 = time.time()
    mem = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if dev == "cuda" else None
    out.write_text(json.dumps({"start": t0, "end": t1, "products": batch * reps, "peak_memory_gib": mem}))


def actors_section(assets: Path, out: Path, procs: list[int], batch: int, reps: int, dry: bool,
                   variants=(), log=print) -> list[dict]:
    """Products/s of 1, 2, ... encoder processes on one GPU (all started together; the aggregate counts
    from the first start to the last end)."""
    import shutil
    import tempfile

    rows = []
    for n in procs:
        work = Path(tempfile.gettempdir()) / f"moonsearch-actors-{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cmd = lambda i: [sys.executable, __file__, "actor", "--assets", str(assets), "--out", str(work / f"a{i}.json"),  # noqa: E731
                         "--barrier", str(work), "--actors", str(n), "--batch", str(batch), "--reps", str(reps)] \
            + (["--dry-run"] if dry else []) + [f"--variant={v}" for v in variants]
        ps = [subprocess.Popen(cmd(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
        errs = [p.communicate()[1] for p in ps]
        if any(p.returncode for p in ps):
            rows.append({"actors": n, "error": next(e for p, e in zip(ps, errs) if p.returncode)[-2000:]})
            log(f"  {n} actors: failed\n{rows[-1]['error']}")
            continue
        res = [json.loads((work / f"a{i}.json").read_text()) for i in range(n)]
        span = max(r["end"] for r in res) - min(r["start"] for r in res)
        total = sum(r["products"] for r in res)
        rows.append({"actors": n, "batch": batch, "products_per_s": round(total / span, 2),
                     "per_actor": [round(r["products"] / (r["end"] - r["start"]), 2) for r in res],
                     "peak_memory_gib_each": [r["peak_memory_gib"] for r in res]})
        log(f"  {n} actor(s) on one device: {rows[-1]}")
    if rows and "products_per_s" in rows[0]:
        for r in rows[1:]:
            if "products_per_s" in r:
                r["vs_one"] = round(r["products_per_s"] / rows[0]["products_per_s"], 3)
    return rows



# ---- faiss-gpu for a CUDA 13 machine, packed here ------------------------------------------------------
FAISS_GPU_WHEELS = ("faiss-gpu==1.15.1", "nvidia-cuda-runtime-cu12==12.9.79")


def pack_faiss(out: Path, part_mb: int, wheels: Path) -> list[Path]:
    """faiss-gpu's package and CUDA 12's runtime as one xz tar in pieces of ``part_mb`` MB, for
    benchmarks/gpu_shim/setup.sh on the GPU machine (which has no package index). faiss-gpu 1.15.1 carries
    sm_90 PTX (the earlier faiss-gpu-cu12 wheels had machine code for sm_60/70/80 only)."""
    import shutil
    import tempfile
    import zipfile

    wheels.mkdir(parents=True, exist_ok=True)
    plat = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                         "manylinux2014_x86_64")]
    for spec in FAISS_GPU_WHEELS:
        name = spec.split("==")[0].replace("-", "_")
        if not list(wheels.glob(f"{name}-{spec.split('==')[1]}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version=3.12", "--implementation=cp", *plat, "-d", str(wheels), spec], check=True)
    work = Path(tempfile.mkdtemp(prefix="faissgpu-"))
    try:
        with zipfile.ZipFile(next(wheels.glob("faiss_gpu-*.whl"))) as z:
            z.extractall(work, [m for m in z.namelist() if m.startswith(("faiss/", "faiss_gpu.libs/"))])
        with zipfile.ZipFile(next(wheels.glob("nvidia_cuda_runtime_cu12-*.whl"))) as z:
            (work / "cu12").mkdir()
            (work / "cu12" / "libcudart.so.12").write_bytes(z.read("nvidia/cuda_runtime/lib/libcudart.so.12"))
        for f in work.rglob("*.so*"):
            f.chmod(0o755)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("faiss-gpu.tar.xz.*"):
            old.unlink()
        tar = subprocess.Popen(["tar", "-cf", "-", "faiss", "faiss_gpu.libs", "cu12"], cwd=work, stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9", "-T0"], stdin=tar.stdout, stdout=(out / "faiss-gpu.tar.xz.tmp").open("wb"),
                       check=True)
        if tar.wait():
            raise RuntimeError("tar failed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    whole = out / "faiss-gpu.tar.xz.tmp"
    parts, size = [], part_mb * 1_000_000
    with whole.open("rb") as f:
        while chunk := f.read(size):
            parts.append(out / f"faiss-gpu.tar.xz.{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    whole.unlink()
    return parts



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run", "faiss", "faiss-cpu", "stream", "stream-build", "actors", "actor",
                                     "pack-faiss"])
    ap.add_argument("--assets", type=Path, default=Path(".gpucheck"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu"))
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--cpu-deadline", type=float, default=200.0, help="skip the CPU faiss build after this many s")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, not the GPU")
    ap.add_argument("--skip", action="append", default=[], choices=["faiss", "moon"])
    ap.add_argument("--variant", action="append", default=[],
                    help="after the rows as built, measure again with these speed changes: each a '+'-joined set "
                         f"of {', '.join(VARIANTS)}, applied to the model as built")
    ap.add_argument("--train-batch", type=int, action="append", default=[],
                    help="batch of the timed training step (repeat for several; default 8, 2 in a dry run)")
    ap.add_argument("--variant-deadline", type=float, default=150.0,
                    help="run: skip the variants that would start after this many seconds")
    ap.add_argument("--profile", action="store_true", help="kernel profile and vision/LLM split of one forward")
    ap.add_argument("--actors", type=int, action="append", default=[],
                    help="actors: encoder processes sharing the device (repeat: 1, 2, ...)")
    ap.add_argument("--batch", type=int, default=0, help="actors: batch per process (default: the first batch size)")
    ap.add_argument("--reps", type=int, default=6, help="actors: batches each process encodes")
    ap.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--part-mb", type=int, default=34, help="pack-faiss: size of each piece")
    ap.add_argument("--wheels", type=Path, default=Path("bench-out/wheels"), help="pack-faiss: wheel folder")
    ap.add_argument("--factory", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.what == "pack-faiss":
        for part in pack_faiss(a.out, a.part_mb, a.wheels):
            print(part, part.stat().st_size)
        return
    if a.what == "stream-build":  # a child of `stream`: --assets is the world, --out the index; --dry-run: no GPU
        stream_build(a.assets, a.out, gpu=not a.dry_run)
        return
    if a.what == "stream":  # moonsearch's own --vectors build, GPU against CPU
        res = stream_section(6000 if a.dry_run else a.n, min(a.queries, 100) if a.dry_run else a.queries,
                             a.cpu_deadline)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu-stream.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    if a.what == "faiss-cpu":  # a child of the faiss part: --assets is the data folder, --out the JSON
        cpu_build(a.assets, a.factory, a.out, a.threads)
        return
    if a.what == "actor":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        actor(a.assets, a.out, a.barrier, a.actors[0], a.batch, a.reps, a.dry_run, a.variant)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "prepare":
        prepare(a.assets)
        return
    if a.what == "actors":
        batch = a.batch or (TINY if a.dry_run else THREE_B)["batches"][0]
        rows = actors_section(a.assets, a.out, a.actors or [1, 2], batch, a.reps, a.dry_run, a.variant)
        (a.out / "gpu-actors.json").write_text(json.dumps({"variants": a.variant, "rows": rows}, indent=1))
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
            report["moon"] = moon_section(a.assets, a.dry_run, variants=tuple(a.variant), profile=a.profile,
                                          variant_deadline_s=a.variant_deadline, train_batches=tuple(a.train_batch),
                                          save=lambda d: path.write_text(json.dumps(dict(report, moon=d), indent=1)))
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
