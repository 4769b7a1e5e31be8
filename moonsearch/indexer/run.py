"""The indexer: catalog -> embeddings -> one FAISS index per category.

    moonsearch index demo/catalog.parquet --out index/ [--model clip-mini] [--level N] [--append]

Reader (parquet rows, validated) -> image loader (thread pool, one batch ahead of the encoder) ->
encoder -> embedding cache (flushed every ``flush_every`` items) -> per-category index writer.
Interrupt it at any point and run it again: cached embeddings are reused, nothing is embedded twice.
Bad rows and images are reported into ``<out>/rejects.jsonl`` and skipped.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from moonsearch.data.catalog import CatalogRecord, Problem, iter_catalog, write_rejects
from moonsearch.data.images import fingerprint, is_transient, load_images, reading, resolve_path, url_version
from moonsearch.index.category import CategoryIndex
from moonsearch.index.faiss_backend import IndexParams, auto_rerank
from moonsearch.index.index_set import IndexSet, category_key, new_manifest, slugify
from moonsearch.index.shared import SharedQuantizer
from moonsearch.indexer.cache import EmbeddingCache
from moonsearch.models.base import DEFAULT_ENCODER, Encoder, Product, create_encoder
from moonsearch.utils.io import append_jsonl
from moonsearch.errors import UserError


@dataclass
class IndexJob:
    catalog: Path
    out: Path
    model: str | None = None  # None: the index's own encoder (--append), else DEFAULT_ENCODER
    level: int | None = None  # category depth to index at (None = leaf)
    params: IndexParams | None = None  # None: the defaults (a new index) or the manifest's (append)
    append: bool = False
    batch_size: int = 32
    max_images: int = 4
    workers: int = 8  # image-loading threads
    timeout: float = 10.0  # per image URL
    flush_every: int = 256
    device: str | None = None
    ray: str | None = None  # "auto" or a cluster address: embed and build on Ray (indexer/distributed.py)
    ray_actors: int | None = None  # encoder actors (default: one per GPU, else one per CPU)
    # ask each picture URL's server (HEAD: ETag, Last-Modified, Content-Length) whether the picture changed,
    # so one replaced at the same address is embedded again; off, a URL names its picture for good
    recheck_urls: bool = False


@dataclass
class IndexReport:
    rows: int = 0
    indexed: int = 0
    embedded: int = 0
    cached: int = 0
    retried: int = 0  # embedded again: a picture had failed for a passing reason (is_transient)
    categories: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    rejects_path: Path | None = None
    ray: dict | None = None  # the cluster and the actor plan, with --ray


def content_key(rec: CatalogRecord, base: Path, max_images: int, versions: dict[str, str] | None = None) -> str:
    blob = json.dumps([reading(), rec.title, rec.category, sorted(rec.attributes.items()),
                       [fingerprint(r, base, versions) for r in rec.images[:max_images]]], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def url_versions(records: list[CatalogRecord], job: "IndexJob") -> dict[str, str]:
    """``url_version`` of every picture URL the job uses, asked ``job.workers`` at a time."""
    urls = sorted({r for rec in records for r in rec.images[:job.max_images]
                   if isinstance(r, str) and resolve_path(r, None) is None})
    with ThreadPoolExecutor(job.workers) as pool:
        return dict(zip(urls, pool.map(lambda u: url_version(u, job.timeout), urls)))


def _image_label(ref, base: Path) -> str:
    if isinstance(ref, (bytes, bytearray)):
        return "embedded"
    p = resolve_path(ref, base)
    return ref if p is None else str(p.resolve())


def _meta_table(records: list[CatalogRecord], base: Path) -> pa.Table:
    def extra(rec):
        return json.dumps({k: v for k, v in rec.meta.items() if _jsonable(v)}, ensure_ascii=False, default=str)

    return pa.table({
        "seq": pa.array(np.arange(len(records)), pa.int64()),
        "item_id": [r.item_id for r in records],
        "title": [r.title for r in records],
        "category": pa.array([r.category for r in records], pa.list_(pa.string())),
        "attributes": [json.dumps(r.attributes, ensure_ascii=False) for r in records],
        "group_id": [r.group_id for r in records],
        "images": pa.array([[_image_label(i, base) for i in r.images] for r in records], pa.list_(pa.string())),
        "extra": [extra(r) for r in records],
    })


def _jsonable(v) -> bool:
    return not isinstance(v, (bytes, bytearray))


class _Loader:
    """Loads the images of batches of records in a thread pool, one batch ahead of the consumer."""

    def __init__(self, batches, base: Path, job: IndexJob):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.base, self.job = base, job
        self.pool = ThreadPoolExecutor(job.workers)
        self.thread = threading.Thread(target=self._run, args=(batches,), daemon=True)
        self.stop = False
        self.thread.start()

    def _load(self, rec: CatalogRecord):
        images, bad = load_images(rec.images[:self.job.max_images], self.base, self.job.timeout)
        problems = [Problem(rec.row, rec.item_id, f"images[{i}]", why, "image skipped") for i, why in bad]
        if len(rec.images) > self.job.max_images:
            problems.append(Problem(rec.row, rec.item_id, "images", f"{len(rec.images)} images; only the first "
                                    f"{self.job.max_images} are used", "image skipped"))
        return images, problems

    def _run(self, batches):
        try:
            for batch in batches:
                if self.stop:
                    return
                self.q.put((batch, list(self.pool.map(self._load, batch))))
        finally:
            self.q.put(None)

    def __iter__(self):
        while (item := self.q.get()) is not None:
            yield item

    def close(self):
        self.stop = True
        self.pool.shutdown(wait=False, cancel_futures=True)


def append_settings(existing: IndexSet, job: IndexJob) -> tuple[int | None, IndexParams]:
    """The category level and index parameters an append must use: the index's own (from its manifest).
    An option on the command line that disagrees is refused rather than silently splitting the index
    two ways (a level-1 index with leaf categories appended beside it)."""
    level = existing.manifest.get("level")
    params = IndexParams(**existing.manifest["params"])
    if job.level is not None and job.level != level:
        where = level if level is not None else "leaf"
        raise UserError(f"--append: {existing.root} splits categories at level {where}, "
                        f"not {job.level}; drop --level, or rebuild without --append")
    if job.params is not None and job.params != params:
        diff = ", ".join(f"{k} {getattr(params, k)} (asked {getattr(job.params, k)})"
                         for k in params.to_dict() if getattr(params, k) != getattr(job.params, k))
        raise UserError(f"--append: {existing.root} was built with {diff}; drop those options, or rebuild "
                        "without --append")
    return level, params


def run_index(job: IndexJob, encoder: Encoder | None = None,
              progress: Callable[[int], Callable[[int], None]] | None = None) -> IndexReport:
    """Build (or extend, with ``job.append``) the index at ``job.out``; see the module docstring.

    ``progress(total)`` returns a callable advanced by the number of items embedded.
    """
    t0 = time.time()
    report = IndexReport()
    out, catalog = Path(job.out), Path(job.catalog)
    base = catalog.parent
    existing = IndexSet.load(out) if job.append else None
    name = job.model or (existing.encoder["name"] if existing else DEFAULT_ENCODER)
    encoder = encoder or create_encoder(name, job.device)
    info = encoder.describe()
    level, params = job.level, job.params or IndexParams()
    seen: set[str] = set()
    if existing:
        existing.check_encoder(info)
        level, params = append_settings(existing, job)
        for c in existing.categories.values():
            seen.update(c.meta.column("item_id").to_pylist())
    records = list(iter_catalog(catalog, report.problems.append, seen=seen))
    report.rows = len(records) + sum(p.action == "row skipped" for p in report.problems)
    cache = EmbeddingCache(out / "embeddings" / info["fingerprint"])
    if hasattr(encoder, "use_crop_cache"):  # MOON: core-product boxes are found once per image
        encoder.use_crop_cache(out / "crops" / f"{encoder.cfg.cropper}.jsonl")
    known_problems = _read_known_problems(cache.folder)
    versions = url_versions(records, job) if job.recheck_urls else None
    keys = [content_key(r, base, job.max_images, versions) for r in records]
    # an item embedded without a picture that failed for a passing reason (a 503, a timeout) is embedded again
    retry = {k for k, found in known_problems.items() if any(is_transient(reason) for _, reason in found)}
    todo = [(r, k) for r, k in zip(records, keys) if k not in cache or k in retry]
    report.cached = len(records) - len(todo)
    report.retried = sum(1 for _, k in todo if k in retry and k in cache)
    again = {k for _, k in todo}
    for r, k in zip(records, keys):  # re-report image problems found when a reused item was embedded
        if k not in again:
            report.problems.extend(Problem(r.row, r.item_id, f, reason, "image skipped")
                                   for f, reason in known_problems.get(k, []))
    report.seconds["read"] = time.time() - t0

    tick = progress(len(todo)) if progress and todo else None
    t1 = time.time()
    if job.ray:
        from moonsearch.indexer import distributed

        report.ray = distributed.connect(job.ray)
    if job.ray and todo:
        plan = distributed.embed(todo, base, name, job, cache.put, report.problems, tick)
        cache.flush()
        lines = _reset_lines([k for _, k in todo if k in retry]) + \
            [{"key": k, "field": f, "reason": r} for k, f, r in plan.pop("image_problems")]
        if lines:
            append_jsonl(lines, cache.folder / "problems.jsonl")
        report.ray.update(plan)
        report.embedded += sum(1 for _, k in todo if k in cache)
        todo = []  # nothing left for the local loop
    batches = [todo[s:s + job.batch_size] for s in range(0, len(todo), job.batch_size)]
    loader = _Loader(([r for r, _ in b] for b in batches), base, job)
    since_flush = 0
    try:
        for (recs, loaded), batch in zip(loader, batches):
            products, pkeys, new_problems = [], [], []
            for rec, (images, problems), (_, key) in zip(recs, loaded, batch):
                report.problems.extend(problems)
                new_problems.extend((key, p.field, p.reason) for p in problems)
                if not images and not rec.title:
                    report.problems.append(Problem(rec.row, rec.item_id, "images", "no usable image and no title"))
                    continue
                products.append(Product(rec.title, rec.category, rec.attributes, images, rec.item_id))
                pkeys.append(key)
            if products:
                cache.put(pkeys, encoder.encode_products(products, batch_size=job.batch_size))
            redone = [k for k in pkeys if k in retry]
            if redone:  # the new vectors are on disk before their old problems are cleared
                cache.flush()
            if new_problems or redone:
                append_jsonl(_reset_lines(redone) + [{"key": k, "field": f, "reason": r} for k, f, r in new_problems],
                             cache.folder / "problems.jsonl")
            report.embedded += len(products)
            since_flush += len(recs)
            if since_flush >= job.flush_every:
                cache.flush()
                since_flush = 0
            if tick:
                tick(len(recs))
    finally:
        loader.close()
        cache.flush()
    report.seconds["embed"] = time.time() - t1

    t2 = time.time()
    usable = [(r, k) for r, k in zip(records, keys) if k in cache]
    groups: dict[str, tuple[list[str], list[CatalogRecord], list[str]]] = {}
    for r, k in usable:
        path = category_key(r.category, level)
        slug = slugify(path)
        groups.setdefault(slug, (path, [], []))[1].append(r)
        groups[slug][2].append(k)
    cats_dir = out / "categories"
    if existing:
        index_set = existing
    else:
        index_set = IndexSet(out, new_manifest(info, level, params.to_dict(), str(catalog.resolve())), {})
    if not existing and len(usable) >= params.shared_from:  # one coarse quantizer for all categories
        if job.params is None:
            params = replace(params, rerank=auto_rerank(len(usable)))
            index_set.manifest["params"] = params.to_dict()
        factory, n_train = SharedQuantizer.plan(len(usable), info["dim"], params)
        pick = np.sort(np.random.default_rng(0).choice(len(usable), n_train, replace=False))
        index_set.shared = SharedQuantizer.train(np.stack([cache.get(usable[i][1]) for i in pick]).astype(np.float32),
                                                 len(usable), params)
        index_set.shared.save(out)
    remote = []  # categories to write as Ray tasks
    for slug, (path, recs, ks) in sorted(groups.items()):
        vecs = np.stack([cache.get(k) for k in ks])  # (n, d) float16
        meta = _meta_table(recs, base)
        if slug in index_set.categories:
            index_set.categories[slug] = index_set.categories[slug].append(vecs, meta)
        elif job.ray:
            remote.append(dict(path=str(cats_dir / slug), vectors=vecs, meta=meta, params=params, encoder=info,
                               category=path, root=str(out), shared=index_set.shared is not None,
                               code=index_set.next_code() + len(remote)))
        else:
            index_set.categories[slug] = CategoryIndex.write(cats_dir / slug, vecs, meta, params, info, path,
                                                             shared=index_set.shared, code=index_set.next_code())
    if remote:
        distributed.build_categories(remote)
        for spec in remote:
            index_set.categories[Path(spec["path"]).name] = CategoryIndex.load(Path(spec["path"]),
                                                                               shared=index_set.shared)
    if not existing and cats_dir.exists():  # a full rebuild drops categories the catalog no longer has
        import shutil

        if index_set.shared is None:  # and a quantizer left by an earlier build of the same folder
            shutil.rmtree(out / "quantizer", ignore_errors=True)
        for d in cats_dir.iterdir():
            if d.is_dir() and d.name not in index_set.categories:
                shutil.rmtree(d, ignore_errors=True)
    index_set.write_manifest()
    report.seconds["index"] = time.time() - t2
    report.indexed = len(usable)
    report.categories = len(index_set.categories)
    report.problems.sort(key=lambda p: (p.row if p.row is not None else -1, p.field))
    report.rejects_path = write_rejects(report.problems, out / "rejects.jsonl")
    report.seconds["total"] = time.time() - t0
    return report


def _reset_lines(keys: list[str]) -> list[dict]:
    """problems.jsonl lines that clear what earlier embeds of ``keys`` found (they were embedded again)."""
    return [{"key": k, "reset": True} for k in keys]


def _read_known_problems(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """content key -> (field, reason) of the image problems found when the item was last embedded."""
    out: dict[str, list[tuple[str, str]]] = {}
    path = folder / "problems.jsonl"
    if path.exists():
        for line in path.read_text("utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if d.get("reset"):
                out[d["key"]] = []
                continue
            out.setdefault(d["key"], [])
            if (d["field"], d["reason"]) not in out[d["key"]]:
                out[d["key"]].append((d["field"], d["reason"]))
    return out
