"""What the HTTP server runs on: the loaded index and encoder, micro-batched query encoding, weighted
query combination, filters, and hot reload of the index folder.

Micro-batching: every request's query parts go into one asyncio queue; a single batching task takes the
first waiting part, waits at most ``max_wait_ms`` for more (up to ``max_batch``), and encodes them all in
ONE encoder call on a dedicated thread. While that call runs, new parts queue up and form the next
batch, so under load batches grow by themselves and at concurrency 1 a query waits at most
``max_wait_ms``.

Hot reload: a poller compares ``manifest.json``'s (inode, size, mtime) every ``reload_interval`` seconds
(and on ``reload_now()``, e.g. SIGHUP); on a change it loads the new index folder beside the old one and
swaps one reference. A request takes the reference once at its start, so requests in flight finish on the
index they started on; a folder caught mid-write fails to load and the old index keeps serving (counted in
``/metrics``) until the next poll succeeds.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from moonsearch.errors import UserError
from moonsearch.models.base import Encoder, Query
from moonsearch.search.service import Hit, SearchService
from moonsearch.serve.metrics import Metrics

log = logging.getLogger("moonsearch.serve")


@dataclass
class ServeOptions:
    index_dir: Path
    model: str | None = None  # encoder name (default: the index's)
    allow_image_urls: bool = False
    max_wait_ms: float = 5.0
    max_batch: int = 32
    reload_interval: float = 1.0  # seconds between manifest polls (0: no polling)
    api_key: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    url_timeout: float = 5.0

    @classmethod
    def from_env(cls) -> "ServeOptions":
        """The options of a worker process (``moonsearch serve --workers N`` passes them in the environment)."""
        e = os.environ
        return cls(Path(e["MOONSEARCH_SERVE_INDEX"]), e.get("MOONSEARCH_SERVE_MODEL") or None,
                   e.get("MOONSEARCH_SERVE_IMAGE_URLS") == "1", float(e.get("MOONSEARCH_SERVE_MAX_WAIT_MS", 5)),
                   int(e.get("MOONSEARCH_SERVE_MAX_BATCH", 32)), float(e.get("MOONSEARCH_SERVE_RELOAD", 1.0)),
                   e.get("MOONSEARCH_API_KEY") or None)  # the key itself never goes through to_env

    def to_env(self) -> dict[str, str]:
        return {"MOONSEARCH_SERVE_INDEX": str(self.index_dir), "MOONSEARCH_SERVE_MODEL": self.model or "",
                "MOONSEARCH_SERVE_IMAGE_URLS": "1" if self.allow_image_urls else "0",
                "MOONSEARCH_SERVE_MAX_WAIT_MS": str(self.max_wait_ms), "MOONSEARCH_SERVE_MAX_BATCH": str(self.max_batch),
                "MOONSEARCH_SERVE_RELOAD": str(self.reload_interval)}


class MicroBatcher:
    """Coalesces concurrent ``submit(item)`` calls into batched ``run(items) -> results`` calls on one
    thread (the encoder; the index searches)."""

    def __init__(self, run, max_wait_ms: float, max_batch: int, on_batch=None, name: str = "batcher"):
        self.run, self.max_wait, self.max_batch, self.on_batch = run, max_wait_ms / 1000, max_batch, on_batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False)

    async def submit(self, query):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((query, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(q, f) for q, f in batch if not f.cancelled()]  # clients that went away
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                vecs = await loop.run_in_executor(self.pool, self.run, [q for q, _ in batch])
            except Exception as e:  # one bad query must not fail the others: retry one by one
                if len(batch) == 1:
                    if not batch[0][1].done():
                        batch[0][1].set_exception(e)
                    continue
                for q, f in batch:
                    try:
                        v = (await loop.run_in_executor(self.pool, self.run, [q]))[0]
                        if not f.done():
                            f.set_result(v)
                    except Exception as e1:
                        if not f.done():
                            f.set_exception(e1)
                continue
            for (_, f), v in zip(batch, vecs):
                if not f.done():
                    f.set_result(v)


def attribute_filter(wanted: dict[str, str | list[str]] | None):
    """``{"colour": "red", "size": ["s", "m"]}`` -> a predicate on hits (case-insensitive values)."""
    if not wanted:
        return None
    norm = {k: {v.strip().lower() for v in ([vals] if isinstance(vals, str) else vals)} for k, vals in wanted.items()}

    def keep(hit: Hit) -> bool:
        return all(str(hit.attributes.get(k, "")).strip().lower() in vals for k, vals in norm.items())

    return keep


def warm_index(svc: SearchService, vector: np.ndarray) -> None:
    """Build what a first hybrid query would otherwise build on the request path: the BM25 statistics,
    the gazetteer and the metadata lists (one vector search, one hybrid search with understanding)."""
    svc.search_vectors(np.asarray(vector, np.float32)[None], k=1)
    svc.search("red leather", k=1, mode="hybrid", understand=True, vector=vector)


def category_counts(hits: Sequence[Hit]) -> dict[str, int]:
    """Facet counts: category path -> hits in it, most first."""
    counts: dict[str, int] = {}
    for h in hits:
        key = " > ".join(h.category)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class Engine:
    def __init__(self, opts: ServeOptions, encoder: Encoder | None = None, service: SearchService | None = None):
        """``service``: what answers the searches (default: the index folder loaded here; the Ray router
        gives one that fans out to its shards)."""
        self.opts = opts
        self.root = Path(opts.index_dir)
        self.metrics = Metrics()
        import faiss

        # requests search one query at a time (or a small batch) from several threads: OpenMP teams per
        # call only contend for the cores the encoder needs (measured: hybrid text QPS at 32 clients x2)
        faiss.omp_set_num_threads(1)
        self.svc = service or SearchService(self.root, encoder=encoder or opts.model)
        self.encoder = self.svc.encoder  # loaded now, not on the first request
        self.metrics.items = self.svc.index.count
        self._stamp = self._manifest_stamp()
        self.batcher = MicroBatcher(self.encoder.encode_queries, opts.max_wait_ms, opts.max_batch,
                                    self.metrics.batch_size, "encoder")
        # searches batch too: FAISS answers many queries in one call for little more than one
        self.searcher = MicroBatcher(self._search_batch, 0.0, 256, None, "search")
        self.search_pool = ThreadPoolExecutor(2, thread_name_prefix="search-misc")
        self._reload_lock = threading.Lock()
        self._poller: asyncio.Task | None = None
        self.ready = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def warm(self) -> None:
        """Text, photo and text+photo queries through the encoder and the index at the batch sizes
        micro-batching will use, so the first users pay no lazy loading or first-shape kernel setup."""
        img = Image.new("RGB", (64, 64), (200, 60, 60))
        words = ["red", "leather sneakers", "a blue ceramic teapot with a lid", "wireless headphones size L"]
        sizes = sorted({1, 4, 16, self.opts.max_batch})
        for n in sizes:
            xq = self.encoder.encode_queries([Query(text=words[i % len(words)]) for i in range(n)])
            self.svc.search_vectors(xq, k=10)
        for n in sorted({1, min(4, self.opts.max_batch)}):
            self.encoder.encode_queries([Query(image=img)] * n + [Query(text="warm", image=img)])
        warm_index(self.svc, xq[0])
        self.ready = True

    async def start(self) -> None:
        self.batcher.start()
        self.searcher.start()
        if self.opts.reload_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.batcher.stop()
        await self.searcher.stop()
        self.search_pool.shutdown(wait=False)

    # ---- hot reload --------------------------------------------------------------------------
    def _manifest_stamp(self):
        try:
            st = (self.root / "manifest.json").stat()
            return st.st_ino, st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            return None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.opts.reload_interval)
            await loop.run_in_executor(self.search_pool, self.reload_if_changed)

    def reload_if_changed(self, force: bool = False) -> bool:
        """Load the folder again if its manifest changed; True when a new index was swapped in."""
        with self._reload_lock:
            stamp = self._manifest_stamp()
            if stamp is None or (stamp == self._stamp and not force):
                return False
            try:
                new = SearchService(self.root, encoder=self.encoder)
                warm_index(new, np.full(new.index.encoder["dim"], 1e-3, np.float32))
            except Exception as e:  # mid-write, or rebuilt with another encoder: keep serving the old one
                self.metrics.reload_failures += 1
                log.warning("index reload failed, still serving the previous index: %s", e)
                return False
            self.svc = new  # one reference swap: requests in flight keep the old service
            self._stamp = stamp
            self.metrics.reloads += 1
            self.metrics.items = new.index.count
            log.info("index reloaded: %d items", new.index.count)
            return True

    # ---- queries -----------------------------------------------------------------------------
    async def query_vector(self, q: str | dict[str, float] | None, image: Image.Image | None,
                           image_weight: float = 1.0) -> np.ndarray:
        """One query vector. Text (+ photo): the encoder's own text / photo / text+photo query. Weighted
        text parts {text: w} (+ photo at ``image_weight``): sum of w * each part's normalised vector,
        normalised again (negative weights push away from a part)."""
        if isinstance(q, str):
            q = q.strip()
            if not q and image is None:
                raise UserError("q: empty query text and no image")
            return await self.batcher.submit(Query(text=q or None, image=image))
        if q is None:
            if image is None:
                raise UserError("give q (text or weighted texts) and/or an image")
            return await self.batcher.submit(Query(image=image))
        parts = [(Query(text=t.strip()), float(w)) for t, w in q.items() if t.strip() and w != 0]
        if image is not None and image_weight != 0:
            parts.append((Query(image=image), float(image_weight)))
        if not parts:
            raise UserError("q: no non-empty text with a non-zero weight (and no image)")
        if all(w < 0 for _, w in parts):
            raise UserError("q: every weight is negative; give at least one positive part")
        vecs = await asyncio.gather(*(self.batcher.submit(p) for p, _ in parts))
        v = sum(w * np.asarray(x, np.float32) for (_, w), x in zip(parts, vecs))
        n = float(np.linalg.norm(v))
        if n < 1e-6:
            raise UserError("q: the weighted parts cancel out")
        return (v / n).astype(np.float32)

    @staticmethod
    def _search_batch(items: list[tuple]) -> list[list[Hit]]:
        """items: (svc, vector, k, categories, route, exclude, where). Those that share the service, k,
        categories and route and have no exclusion or predicate go through FAISS as one batch."""
        out: list = [None] * len(items)
        groups: dict = {}
        for i, (svc, vec, k, cats, route, exclude, where) in enumerate(items):
            if exclude or where is not None:
                try:
                    out[i] = svc.search_vectors(vec[None], k, categories=cats, route=route, exclude=exclude,
                                                where=where)[0]
                except Exception as e:
                    out[i] = e
                continue
            groups.setdefault((id(svc), k, tuple(cats) if cats else None, route), []).append(i)
        for (_, k, cats, route), idx in groups.items():
            svc = items[idx[0]][0]
            try:
                res = svc.search_vectors(np.stack([items[i][1] for i in idx]), k, categories=cats, route=route)
            except Exception as e:  # e.g. an unknown category: every query of the group gets the error
                res = [e] * len(idx)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    async def search(self, svc: SearchService, vector: np.ndarray, limit: int, offset: int,
                     categories: Sequence[str] | None = None, attributes: dict | None = None,
                     exclude: set[str] | None = None, facets: bool = False, route: int | None = None
                     ) -> tuple[list[Hit], dict | None]:
        """Hits offset..offset+limit (and category facets over the top max(offset+limit, 200))."""
        need = offset + limit
        fetch = max(need, 200) if facets else need
        hits = await self.searcher.submit((svc, np.asarray(vector, np.float32), fetch,
                                           list(categories) if categories else None, route, exclude,
                                           attribute_filter(attributes)))
        if isinstance(hits, Exception):
            raise hits
        return hits[offset:need], category_counts(hits) if facets else None
