"""``moonsearch serve --ray auto|ADDRESS [--shards N] [--replicas R]``: the same HTTP API on Ray Serve.

Three kinds of deployments, each with R replicas (fractional CPUs, so all of them start on 2 cores):

- ``Encoder``: the query encoder, ``@serve.batch`` (concurrent queries from every router replica become
  one encoder call: at most ``max_batch`` queries, waiting at most ``max_wait_ms``).
- ``Shard0`` ... ``Shard{N-1}``: one deployment per shard, so each is addressable (and scalable) on its
  own. A shard loads only its group of categories (categories are dealt to shards by item count, largest
  first to the lightest shard, the same way on every node). It answers shortlists (FAISS), BM25 top-k
  with the WHOLE set's collection statistics, records and group members.
- ``Router``: the FastAPI ingress: the very app of ``moonsearch serve`` (moonsearch/serve/app.py) over a
  ``ShardedService`` that fans every search out to the shards and merges their answers.

Merging is exact: a shard returns its categories' share of the vector shortlist (index scores and final,
re-ranked scores) and the router keeps the best ``k * rerank`` by index score over all shards before
ordering by final score, as one process does over all categories (index/multi.py ``shortlists`` /
``merge`` / ``finish``); BM25 hits merge by (score, category, row) as LexicalSet orders them. So the
hits are the single-process service's (tested for per-category IVF-PQ with re-rank and for the shared
coarse quantizer, where a shard sizes its exact-scan choice and probes from the whole set's counts and
probes, among its own lists, at least those one process probes for its categories).

A shard that fails or does not answer in ``SHARD_TIMEOUT_S`` makes the request fail with 503 and the
shard's name: never a merge of the shards that did answer.

Index reload: ``moonsearch serve --ray`` polls the folder's manifest; on a change it redeploys with a new
``user_config`` (``{"version": ...}``): each shard replica reloads its categories in ``reconfigure`` (on a
worker thread; the old ones answer meanwhile), and the router refreshes what it knows of the shards
(counts, centroids, the gazetteer) once every shard reports the new version. Replicas are not restarted
(``build_app`` explains the deployment versions that make this so).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from moonsearch.errors import Unavailable, UnknownItem, UserError
from moonsearch.index.multi import Candidates, finish, merge, shortlists
from moonsearch.search.service import Hit, SearchService

log = logging.getLogger("moonsearch.serve")
APP = "moonsearch"
_PROCESS = os.urandom(8).hex()  # a new `serve --ray` process (new code, perhaps) replaces the replicas
SHARD_TIMEOUT_S = float(os.environ.get("MOONSEARCH_SHARD_TIMEOUT_S", 30))  # per call to a shard or the encoder


class ShardUnavailable(Unavailable):
    """A shard failed or did not answer: the request gets 503, never a partial merge."""


# ---- which categories go to which shard ----------------------------------------------------------------
def assign_shards(manifest: dict, n: int) -> list[list[str]]:
    """Categories dealt to ``n`` shards by item count (largest first, to the shard with fewest items;
    ties by slug): the same split on every node for the same manifest."""
    if n < 1:
        raise UserError(f"--shards {n}: expected 1 or more")
    cats = manifest["categories"]
    order = sorted(cats, key=lambda s: (-int(cats[s].get("count", 0)), s))
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for slug in order:
        j = min(range(n), key=lambda i: (load[i], i))
        shards[j].append(slug)
        load[j] += int(cats[slug].get("count", 0))
    return [sorted(s) for s in shards]


def read_manifest(root: Path) -> dict:
    from moonsearch.index.index_set import IndexSet

    if not (root / "manifest.json").exists():
        IndexSet.load(root)  # the one clear "not a moonsearch index" message
    return json.loads((root / "manifest.json").read_text())


def manifest_version(root: Path) -> str:
    st = (root / "manifest.json").stat()
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


# ---- the shard's side ----------------------------------------------------------------------------------
class ShardCore:
    """One shard: its categories of the index folder, searched as one process searches them."""

    def __init__(self, root: str | Path, shard: int, n_shards: int):
        from moonsearch.index import lexical as lexmod
        from moonsearch.index.category import read_meta
        from moonsearch.index.index_set import IndexSet

        self.root, self.shard = Path(root), shard
        manifest = read_manifest(self.root)
        self.slugs = assign_shards(manifest, n_shards)[shard]
        self.svc = SearchService(IndexSet.load(self.root, only=set(self.slugs)))
        import faiss

        faiss.omp_set_num_threads(1)

        def terms(slug):  # every category's BM25 statistics; only this shard's term matrices are kept
            if slug in self.svc.index.categories:
                return self.svc.index.categories[slug].lexical
            folder = self.root / "categories" / slug
            f = folder / lexmod.FILE
            return lexmod.CategoryTerms.load(f) if f.exists() else \
                lexmod.CategoryTerms.build(lexmod.meta_texts(read_meta(folder)))

        self.svc._lexical = lexmod.LexicalSet({s: c.lexical for s, c in self.svc.index.categories.items()},
                                              stats=(terms(s) for s in manifest["categories"]))
        self.counts = {slug: int(c.get("count", 0)) for slug, c in manifest["categories"].items()}
        self.lists = self._list_sizes(manifest)
        self._group_lists: dict[frozenset, np.ndarray] = {}
        self.version = manifest_version(self.root)

    def _list_sizes(self, manifest: dict) -> dict[str, np.ndarray] | None:
        """Items per inverted list of EVERY category of a shared-quantizer set (the other shards' categories
        read from their index files, mapped, codes untouched), so that a shard probes the lists one
        process would; None for sets without the shared layout."""
        from moonsearch.index import faiss_backend as fb
        from moonsearch.index.shared import occupancy

        shared = self.svc.index.shared
        if shared is None:
            return None
        out = {}
        for slug in manifest["categories"]:
            c = self.svc.index.categories.get(slug)
            folder = self.root / "categories" / slug
            if c is not None:
                if c.shared is not None:
                    out[slug] = shared.list_sizes(c.index)
            elif json.loads((folder / "index_infos.json").read_text()).get("shared"):
                out[slug] = occupancy(fb.read(folder / "index.faiss"))
        return out

    def _lists_of(self, slugs: Sequence[str]) -> np.ndarray | None:
        """The summed items per list of ``slugs`` (one array per distinct group, cached)."""
        if self.lists is None:
            return None
        key = frozenset(slugs)
        got = self._group_lists.get(key)
        if got is None:
            got = np.asarray(sum((self.lists[s] for s in key if s in self.lists), 0), np.int64)
            if len(self._group_lists) > 4096:
                self._group_lists.clear()
            self._group_lists[key] = got
        return got

    def info(self) -> dict:
        """What the router needs to know of this shard's categories."""
        from moonsearch.search.understand import readings_of

        cats = self.svc.index.categories
        return {"shard": self.shard, "version": self.version, "slugs": self.slugs,
                "encoder": self.svc.index.encoder,
                "categories": {s: {"path": list(c.infos["category"]), "count": int(c.index.ntotal),
                                   "centroid": np.asarray(c.centroid, np.float32),
                                   "rerank": int(c.params.rerank) if (c.is_pq or c.shared is not None) else 0,
                                   "readings": readings_of(c)} for s, c in cats.items()}}

    def shortlist(self, xq: np.ndarray, k: int, slugs: list[str], chosen: list[set[int]] | None, params,
                  rerank: int) -> list[tuple[Candidates, list[Hit]]]:
        """Per query this shard's part of the shortlist over ``slugs`` (category positions are positions in
        ``slugs``, the router's list; ``chosen[q]``: the positions query q searches), with the hit of each
        candidate. The shared-quantizer choices (exact scan or not, lists probed) follow the item counts
        of everything the query searches on all shards, as in one process."""
        mine = [i for i, s in enumerate(slugs) if s in self.svc.index.categories]
        if not mine:
            return [(Candidates.empty(), []) for _ in range(len(xq))]
        cats = [self.svc.index.categories[slugs[i]] for i in mine]
        local = None if chosen is None else [{j for j, i in enumerate(mine) if i in want} for want in chosen]
        everything = sum(self.counts.get(s, 0) for s in slugs)
        totals = [everything] * len(xq) if chosen is None else \
            [sum(self.counts.get(slugs[i], 0) for i in want) for want in chosen]
        lists = None
        if self.lists is not None:
            lists = [self._lists_of(slugs)] * len(xq) if chosen is None else \
                [self._lists_of([slugs[i] for i in want]) for want in chosen]
        found, _ = shortlists(cats, np.ascontiguousarray(xq, np.float32), k, params, local, rerank, everything,
                              totals, lists)
        out = []
        pos = np.asarray(mine, np.int64)
        for c in found:
            hits = [self.svc._hit(slugs[int(pos[ci])], int(r), float(f)) for ci, r, f in zip(c.cat, c.row, c.final)]
            out.append((Candidates(c.approx, c.final, pos[c.cat] if len(c) else c.cat, c.row), hits))
        return out

    def lexical_top(self, text: str, k: int, slugs: list[str]) -> list[tuple[float, str, int, Hit]]:
        mine = [s for s in slugs if s in self.svc.index.categories]
        return self.svc._lexical_top(text, k, mine) if mine else []

    def records(self, item_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, str | None, Hit]]:
        """item -> (stored vector, group id, record) for the items this shard holds."""
        out = {}
        held = self.svc._items()
        for iid in item_ids:
            if iid not in held:
                continue
            slug, row = held[iid]
            group = self.svc.index.categories[slug].meta.column("group_id")[row].as_py()
            out[iid] = (self.svc.product_vector(iid), group, self.svc._hit(slug, row, 0.0))
        return out

    def group_members(self, groups: Sequence[str]) -> dict[str, list[str]]:
        return {g: self.svc._group_members(g) for g in groups}


# ---- the router's side ---------------------------------------------------------------------------------
class _RemoteIndex:
    """What the app and SearchService read of ``svc.index`` when the index lives in the shards."""

    def __init__(self, root: Path, encoder: dict, counts: dict[str, int]):
        self.root, self.encoder, self.counts = root, encoder, counts

    @property
    def count(self) -> int:
        return sum(self.counts.values())


class RemoteEncoder:
    """The Encoder deployment seen as an Encoder: one handle call per query (``@serve.batch`` batches)."""

    def __init__(self, handle, info: dict):
        self.handle, self.name, self.dim, self.fingerprint = handle, info["name"], info["dim"], info["fingerprint"]

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.fingerprint}

    def encode_queries(self, queries, batch_size: int = 32) -> np.ndarray:
        calls = [self.handle.encode.remote(q) for q in queries]
        try:
            return np.stack([c.result(timeout_s=SHARD_TIMEOUT_S) for c in calls]).astype(np.float32)
        except ValueError:  # bad input (UserError included): the client's 4xx, not our outage
            raise
        except Exception as e:  # dead, restarting or overloaded
            raise Unavailable(f"the Encoder deployment is unavailable ({type(e).__name__}); try again") from e


class ShardedService(SearchService):
    """SearchService whose categories live in shard deployments: selection, routing, the widening loops,
    hybrid fusion and query understanding run here, unchanged; shortlists, BM25, records and group
    members come from the shards and are merged exactly."""

    def __init__(self, root: Path, shards: list, infos: list[dict], encoder):
        self.shards = shards
        cats: dict[str, dict] = {}
        for info in infos:
            cats.update(info["categories"])
        manifest_order = [s for s in read_manifest(root)["categories"] if s in cats] or sorted(cats)
        self.owner = {s: i for i, info in enumerate(infos) for s in info["categories"]}
        self.cats = cats
        self.index = _RemoteIndex(root, infos[0]["encoder"], {s: c["count"] for s, c in cats.items()})
        self._start({s: c["centroid"] for s, c in cats.items()}, encoder, None)
        from moonsearch.search.understand import Gazetteer

        self._gazetteer = Gazetteer.from_parts(cats[s]["readings"] for s in manifest_order)
        self._readings = {s: cats[s]["readings"] for s in cats}

    # ---- fan-out ----------------------------------------------------------------------------------
    def _ask(self, shards: Sequence[int], method: str, *args) -> list:
        calls = [(i, getattr(self.shards[i], method).remote(*args)) for i in shards]
        out = []
        for i, call in calls:
            try:
                out.append(call.result(timeout_s=SHARD_TIMEOUT_S))
            except Exception as e:  # a dead, restarting or stuck shard: no partial answers
                raise ShardUnavailable(f"search shard Shard{i} is unavailable ({type(e).__name__}); "
                                       f"no results were merged without it, try again") from e
        return out

    def _holders(self, slugs: Sequence[str]) -> list[int]:
        return sorted({self.owner[s] for s in slugs})

    # ---- the primitives SearchService builds on -----------------------------------------------------
    def _path(self, slug: str) -> list[str]:
        return self.cats[slug]["path"]

    def _total(self, slugs: Sequence[str]) -> int:
        return sum(self.cats[s]["count"] for s in slugs)

    def _shortlist_hits(self, xq, k, slugs, chosen, params) -> list[list[Hit]]:
        rerank = max((self.cats[s]["rerank"] for s in slugs), default=0)
        wanted = slugs if chosen is None else sorted({slugs[i] for want in chosen for i in want})
        answers = self._ask(self._holders(wanted), "shortlist", xq, k, list(slugs), chosen, params, rerank)
        out = []
        for q in range(len(xq)):
            parts = [a[q] for a in answers]
            merged, top = merge([c for c, _ in parts], k, rerank)
            hits = [h for _, hs in parts for h in hs]
            keep = [hits[i] for i in top]
            order = finish(merged, k)
            by_pos = {(int(c), int(r)): h for c, r, h in zip(merged.cat, merged.row, keep)}
            out.append([by_pos[(c, r)] for _, c, r in order])
        return out

    def _lexical_top(self, text, k, slugs):
        found = [x for part in self._ask(self._holders(slugs), "lexical_top", text, k, list(slugs)) for x in part]
        found.sort(key=lambda x: (-x[0], x[1], x[2]))
        return found[:k]

    def item(self, item_id: str) -> Hit:
        got = self._records([item_id])
        return got[item_id][2]

    def _records(self, item_ids: Sequence[str]) -> dict:
        got: dict = {}
        for part in self._ask(range(len(self.shards)), "records", list(item_ids)):
            got.update(part)
        missing = [i for i in item_ids if i not in got]
        if missing:
            raise UnknownItem(f"item {missing[0]!r} is not in the index {self.index.root}")
        return got

    def product_vector(self, item_id: str) -> np.ndarray:
        return np.asarray(self._records([item_id])[item_id][0], np.float32)

    def search_products(self, item_ids, k: int = 10, exclude_group: bool = True, **kw) -> list[Hit]:
        if not item_ids:
            raise UserError("give at least one item id")
        recs = self._records(list(dict.fromkeys(item_ids)))
        exclude = set(item_ids)
        groups = sorted({recs[i][1] for i in item_ids if recs[i][1]}) if exclude_group else []
        if groups:
            for part in self._ask(range(len(self.shards)), "group_members", groups):
                for members in part.values():
                    exclude |= set(members)
        v = np.mean([np.asarray(recs[i][0], np.float32) for i in dict.fromkeys(item_ids)], axis=0)
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        return self.search_vectors(v[None], k, exclude=exclude, **kw)[0]


# ---- Ray Serve deployments -----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _deployments():
    """The deployment classes (Ray Serve imported only when serving on Ray). Built once per process: a
    redeploy with the same classes and arguments changes only ``user_config``, so Serve reconfigures the
    replicas in place instead of replacing them."""
    from ray import serve

    class EncoderDeployment:
        def __init__(self, model: str, max_batch: int, max_wait_ms: float):
            from moonsearch.models.base import create_encoder

            self.encoder = create_encoder(model)
            self.encode.set_max_batch_size(max_batch)
            self.encode.set_batch_wait_timeout_s(max_wait_ms / 1000)

        def describe(self) -> dict:
            return self.encoder.describe()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def encode(self, queries: list) -> list[np.ndarray]:
            vecs = await asyncio.get_running_loop().run_in_executor(None, self.encoder.encode_queries, queries)
            return list(vecs)

    class ShardDeployment:
        def __init__(self, root: str, shard: int, n_shards: int):
            self.root, self.shard, self.n = root, shard, n_shards
            self.core: ShardCore | None = None

        async def reconfigure(self, config: dict) -> None:
            if self.core is None or config.get("version") != self.core.version:
                # loaded on a worker thread while the old core keeps answering, then one swap
                self.core = await asyncio.get_running_loop().run_in_executor(
                    None, ShardCore, self.root, self.shard, self.n)

        def info(self) -> dict:
            return self.core.info()

        def shortlist(self, *args):
            return self.core.shortlist(*args)

        def lexical_top(self, *args):
            return self.core.lexical_top(*args)

        def records(self, *args):
            return self.core.records(*args)

        def group_members(self, *args):
            return self.core.group_members(*args)

    @serve.ingress()
    class RouterDeployment:
        async def __init__(self, opts, encoder, *shards):
            self.opts, self.encoder_handle, self.shards = opts, encoder, list(shards)
            self.engine = None
            self.svc, self.version = await self._service()

        async def _service(self, want: str | None = None) -> tuple[ShardedService, str]:
            deadline = time.monotonic() + 120
            while True:  # the shards reload on the same update: wait until every one serves `want`
                infos = [await s.info.remote() for s in self.shards]
                if want is None or all(i["version"] == want for i in infos) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            info = await self.encoder_handle.describe.remote()
            svc = ShardedService(Path(self.opts.index_dir), self.shards, infos, RemoteEncoder(self.encoder_handle, info))
            return svc, infos[0]["version"]

        async def reconfigure(self, config: dict) -> None:
            want = config.get("version")
            if want is None or want == self.version:
                return
            svc, self.version = await self._service(want)
            if self.engine is not None:
                self.engine.svc = svc  # one reference swap, as the single-process hot reload does
                self.engine.metrics.items = svc.index.count
                self.engine.metrics.reloads += 1

        async def __serve_build_asgi_app__(self):
            # warming calls the other deployments and waits for them: off the replica's event loop
            return await asyncio.get_running_loop().run_in_executor(None, self._build)

        def _build(self):
            from moonsearch.serve.app import create_app
            from moonsearch.serve.engine import Engine

            self.engine = Engine(self.opts, service=self.svc)
            return create_app(self.opts, self.engine)

    return EncoderDeployment, ShardDeployment, RouterDeployment


def build_app(opts, shards: int = 1, replicas: int = 1, version: str | None = None, cpus: float = 0.25):
    """The Serve application: Encoder, Shard0..N-1 and the Router (ingress), R replicas each."""
    from dataclasses import replace

    from ray import serve

    root = Path(opts.index_dir).resolve()
    manifest = read_manifest(root)
    if shards > len(manifest["categories"]):
        raise UserError(f"--shards {shards}: the index has only {len(manifest['categories'])} categories")
    version = version or manifest_version(root)
    # what the replicas read of the environment: the model cache, the shard timeout (the API key never)
    env = {k: os.environ[k] for k in ("MOONSEARCH_CACHE", "MOONSEARCH_SHARD_TIMEOUT_S") if k in os.environ}
    actor = {"num_cpus": cpus, "runtime_env": {"env_vars": env}}
    quiet = {"enable_access_log": False, "log_level": "WARNING"}  # /metrics counts the requests
    enc_cls, shard_cls, router_cls = _deployments()
    model = opts.model or manifest["encoder"]["name"]
    # the router's own micro-batcher waits 0 ms: the Encoder deployment batches across router replicas
    router_opts = replace(opts, index_dir=root, reload_interval=0, max_wait_ms=0.0)

    def deployment(cls, name: str, args: tuple, **kw):
        # ``serve.run`` gives every deployment a random code version, so a redeploy would replace every
        # replica. A version derived from this process and what defines the replica (arguments, resources)
        # makes a redeploy from the same process that changes only ``user_config`` a reconfigure in place
        # (Serve's lightweight update, which its config-file deploys get from the config's hash); a new
        # process still replaces the replicas. The option is Serve-internal (ray pinned < 3).
        key = json.dumps([_PROCESS, name, repr(args), actor, replicas, sorted(kw)], default=str, sort_keys=True)
        d = serve.deployment(cls, name=name, num_replicas=replicas, ray_actor_options=actor, logging_config=quiet, **kw)
        return d.options(version=hashlib.sha1(key.encode()).hexdigest()[:16], _internal=True)

    encoder = deployment(enc_cls, "Encoder", (model, opts.max_batch, opts.max_wait_ms),
                         max_ongoing_requests=max(64, opts.max_batch * 2)).bind(model, opts.max_batch, opts.max_wait_ms)
    shard_apps = [deployment(shard_cls, f"Shard{i}", (str(root), i, shards), user_config={"version": version}
                             ).bind(str(root), i, shards) for i in range(shards)]
    router = deployment(router_cls, "Router", (router_opts, shards), user_config={"version": version},
                        max_ongoing_requests=256)
    return router.bind(router_opts, encoder, *shard_apps)


def deploy(opts, shards: int = 1, replicas: int = 1, version: str | None = None) -> str:
    """Deploy (or update in place) the application; -> the index version it serves. Called again with a
    new version, only ``user_config`` changes: the replicas reload without restarting."""
    from ray import serve

    root = Path(opts.index_dir).resolve()
    version = version or manifest_version(root)
    serve.run(build_app(opts, shards, replicas, version), name=APP, route_prefix="/", blocking=False)
    return version


def run(opts, address: str = "auto", shards: int = 1, replicas: int = 1, host: str = "127.0.0.1",
        port: int = 8080, poll: float = 1.0, blocking: bool = True, log=print) -> None:
    """Start (or join) Ray, deploy the app on HOST:PORT and, with ``blocking``, redeploy with a new
    ``user_config`` whenever the index folder's manifest changes (hot reload; ``poll`` <= 0: off) until
    interrupted."""
    from ray import serve

    from moonsearch.indexer.distributed import connect

    info = connect(address)
    log(f"Ray at {info['address']} ({info['cpus']:g} CPUs, {info['gpus']:g} GPUs)")
    serve.start(http_options={"host": host, "port": port})
    root = Path(opts.index_dir).resolve()
    version = deploy(opts, shards, replicas)
    log(f"serving {root} on http://{host}:{port} ({shards} shard(s), {replicas} replica(s) each)")
    if not blocking:
        return
    try:
        while True:
            time.sleep(poll if poll > 0 else 3600)
            if poll <= 0:  # hot reload off
                continue
            try:
                now = manifest_version(root)
            except FileNotFoundError:
                continue
            if now != version:
                try:
                    read_manifest(root)
                    version = deploy(opts, shards, replicas, now)
                    log(f"index changed: redeployed with version {now}")
                except Exception as e:  # caught mid-write: keep serving, retry on the next poll
                    log(f"index reload failed, still serving the previous index: {e}")
    except KeyboardInterrupt:
        serve.shutdown()
