"""Catalog embedding and index building on a Ray cluster: ``moonsearch index CATALOG --ray auto|ADDRESS``.

The driver reads and validates the catalog exactly as a single-process run does (the same rows are
reported and skipped, the same content keys decide what is already cached). The rows left to embed go to
Ray Data as an Arrow table in blocks; ``map_batches`` runs them through a pool of encoder actors (one
encoder loaded per actor, ``concurrency`` actors, ``num_gpus=1`` each where the cluster has GPUs, the
batch size set explicitly). Each actor loads the images of its rows itself, so image problems come back
with the vectors. The driver writes the vectors into the ordinary embedding cache as batches arrive, so
an interrupted run resumes from the cache like any other. The per-category indices are then built as Ray
tasks in parallel. The result is the same index folder a single-process run writes.

``auto`` joins the cluster named by ``RAY_ADDRESS`` if set, else starts a local Ray with the dashboard
off and a bounded object store; anything else is a cluster address (``HOST:PORT``).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from moonsearch.data.catalog import CatalogRecord, Problem

OBJECT_STORE_BYTES = 512 * 2 ** 20


def connect(address: str = "auto") -> dict:
    """Join or start Ray; -> {"address", "cpus", "gpus"}."""
    import ray

    if not ray.is_initialized():
        if address == "auto" and not os.environ.get("RAY_ADDRESS"):
            ray.init(include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=os.environ["RAY_ADDRESS"] if address == "auto" else address, log_to_driver=False,
                     configure_logging=False)
    res = ray.cluster_resources()
    return {"address": ray.get_runtime_context().gcs_address, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)}


def _ref_out(ref) -> dict:
    return {"b": base64.b64encode(bytes(ref)).decode()} if isinstance(ref, (bytes, bytearray)) else {"s": str(ref)}


def _ref_in(d: dict):
    return base64.b64decode(d["b"]) if "b" in d else d["s"]


def _rows_table(todo: list[tuple[CatalogRecord, str]]) -> pa.Table:
    return pa.table({
        "key": [k for _, k in todo], "row": [r.row for r, _ in todo], "item_id": [r.item_id for r, _ in todo],
        "title": [r.title for r, _ in todo], "category": [json.dumps(r.category) for r, _ in todo],
        "attributes": [json.dumps(r.attributes) for r, _ in todo],
        "images": [json.dumps([_ref_out(i) for i in r.images]) for r, _ in todo]})


class EmbedActor:
    """One encoder per actor; a batch of catalog rows in, their vectors and image problems out."""

    def __init__(self, model: str, device: str | None, base: str, max_images: int, timeout: float,
                 threads: int = 1):
        import torch

        from moonsearch.models.base import create_encoder

        torch.set_num_threads(max(1, threads))
        self.encoder = create_encoder(model, device)
        self.base, self.max_images, self.timeout = Path(base), max_images, timeout

    def __call__(self, batch: dict) -> dict:
        from moonsearch.data.images import load_images
        from moonsearch.models.base import Product

        products, ok, problems = [], [], []
        for i in range(len(batch["key"])):
            row, item = int(batch["row"][i]), str(batch["item_id"][i])
            refs = [_ref_in(d) for d in json.loads(batch["images"][i])]
            images, bad = load_images(refs[:self.max_images], self.base, self.timeout)
            mine = [[row, item, f"images[{j}]", why, "image skipped"] for j, why in bad]
            if len(refs) > self.max_images:
                mine.append([row, item, "images", f"{len(refs)} images; only the first {self.max_images} are used",
                             "image skipped"])
            title = str(batch["title"][i])
            if not images and not title:
                mine.append([row, item, "images", "no usable image and no title", "row skipped"])
                ok.append(False)
            else:
                ok.append(True)
                products.append(Product(title, json.loads(batch["category"][i]), json.loads(batch["attributes"][i]),
                                        images, item))
            problems.append(json.dumps(mine))
        dim = self.encoder.describe()["dim"]
        vecs = np.zeros((len(ok), dim), np.float16)
        if products:
            vecs[np.flatnonzero(ok)] = self.encoder.encode_products(products, batch_size=len(products))
        return {"key": batch["key"], "ok": np.array(ok), "vector": vecs, "problems": np.array(problems)}


def embed(todo: list[tuple[CatalogRecord, str]], base: Path, model: str, job, put: Callable, problems: list,
          tick: Callable[[int], None] | None = None) -> dict:
    """Embed ``todo`` on the cluster; ``put(keys, vectors)`` stores each finished batch; returns the plan."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    actors = job.ray_actors or (gpus if gpus else max(1, int(res.get("CPU", 1))))
    # the actors leave one CPU free: Ray Data's own tasks (reading, repartitioning) take a whole CPU each,
    # and with less than one left they never start and the pipeline waits forever
    cpus = 0 if gpus else round(min(1.0, max(0.1, (res.get("CPU", 1) - 1) / actors)), 2)
    table = _rows_table(todo)
    blocks = max(1, min(len(todo) // max(1, job.batch_size), 4 * actors))
    ds = ray.data.from_arrow(table).repartition(blocks)
    out = ds.map_batches(EmbedActor, batch_size=job.batch_size, batch_format="numpy", concurrency=actors,
                         num_gpus=1 if gpus else 0, num_cpus=cpus,
                         fn_constructor_kwargs=dict(model=model, device=job.device, base=str(base),
                                                    max_images=job.max_images, timeout=job.timeout,
                                                    threads=max(1, int(cpus or 1))))
    new_problems = []
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        keys = [str(k) for k in b["key"]]
        ok = np.asarray(b["ok"], bool)
        for k, blob in zip(keys, b["problems"]):
            for row, item, fld, why, action in json.loads(str(blob)):
                problems.append(Problem(row, item, fld, why, action))
                if action == "image skipped":
                    new_problems.append((k, fld, why))
        if ok.any():
            put([k for k, o in zip(keys, ok) if o], np.asarray(b["vector"])[ok])
        if tick:
            tick(len(keys))
    return {"actors": actors, "gpus_per_actor": 1 if gpus else 0, "cpus_per_actor": cpus, "blocks": blocks,
            "batch_size": job.batch_size, "image_problems": new_problems}


def build_categories(specs: list[dict]) -> None:
    """Write category folders as Ray tasks in parallel. Each spec: path, vectors, meta, params, encoder,
    category, root (for the shared quantizer) and code."""
    import ray

    @ray.remote(num_cpus=1)
    def write(spec):
        from moonsearch.index.category import CategoryIndex
        from moonsearch.index.shared import SharedQuantizer

        shared = SharedQuantizer.load(Path(spec["root"])) if spec["shared"] else None
        CategoryIndex.write(Path(spec["path"]), spec["vectors"], spec["meta"], spec["params"], spec["encoder"],
                            spec["category"], shared=shared, code=spec["code"])
        return spec["path"]

    ray.get([write.remote(s) for s in specs])
