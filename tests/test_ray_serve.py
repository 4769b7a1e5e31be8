"""`moonsearch serve --ray`: the Serve application (Encoder, Shard0, Shard1, Router) on a real local Ray
cluster, real HTTP on loopback. Every answer is checked against the single-process library
(SearchService over the whole folder) as the oracle: sharding must not change a single hit."""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from serve_util import free_port, hammering  # noqa: E402
from test_serve import a_product, ids, png_bytes  # noqa: E402

from moonsearch.search.service import SearchService  # noqa: E402
from moonsearch.serve.engine import ServeOptions, attribute_filter  # noqa: E402

SHARDS = 2


@pytest.fixture(scope="module")
def served(tiny_index, clip_tiny, tmp_path_factory):
    """(base URL, served folder, options): the tiny index on 2 shards."""
    from ray import serve

    from moonsearch.serve import ray_app

    folder = tmp_path_factory.mktemp("ray-served") / "index"
    shutil.copytree(tiny_index, folder)
    # a shard that does not answer within 20 s fails the request (the shard-failure test)
    os.environ["MOONSEARCH_SHARD_TIMEOUT_S"] = "20"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2 ** 20, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = ServeOptions(folder, model="clip-tiny")
    ray_app.deploy(opts, shards=SHARDS)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, 300, "the Serve app did not start")
    yield url, folder, opts
    serve.shutdown()
    ray.shutdown()
    os.environ.pop("MOONSEARCH_SHARD_TIMEOUT_S", None)


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(served, clip_tiny):
    return SearchService(served[1], encoder=clip_tiny)


def _wait(ok, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(what)


def _replica_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}


def test_shards_hold_disjoint_categories_that_cover_the_index(served):
    from moonsearch.serve.ray_app import assign_shards, read_manifest

    manifest = read_manifest(served[1])
    parts = assign_shards(manifest, SHARDS)
    assert all(parts) and sorted(s for p in parts for s in p) == sorted(manifest["categories"])
    loads = [sum(manifest["categories"][s]["count"] for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(c["count"] for c in manifest["categories"].values())


def test_health_counts_every_shard(client, oracle):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["items"] == oracle.index.count == 120
    assert h["categories"] == len(oracle.slugs) and h["encoder"] == "clip-tiny"


@pytest.mark.parametrize("mode,understand", [("hybrid", True), ("hybrid", False), ("vector", False),
                                              ("lexical", True), ("vector", True)])
def test_text_queries_equal_the_single_process(client, oracle, mode, understand):
    for q in ("red sneakers", "leather bag", "blue", "wool scarf size m", "ceramic"):
        r = client.post("/search", json={"q": q, "limit": 15, "mode": mode, "understand": understand})
        if mode == "vector" and not understand:
            want = [h.item_id for h in oracle.search_text(q, k=15)]
        else:
            want = [h.item_id for h in oracle.search(q, k=15, mode=mode, understand=understand).hits]
        assert ids(r) == want, (q, mode, understand)
        assert r.json()["hits"] and len(set(ids(r))) == len(ids(r))


def test_filters_routes_and_pages_equal_the_single_process(client, oracle):
    m = a_product(oracle)
    top = m["category"][0]
    colour = json.loads(m["attributes"])["colour"]
    r = client.post("/search", json={"q": "shoes", "limit": 20, "filter": {"category": [top]}})
    assert ids(r) == [h.item_id for h in oracle.search("shoes", k=20, categories=[top]).hits]
    flt = {"attributes": {"colour": colour}}
    r = client.post("/search", json={"q": "bag", "limit": 50, "filter": flt, "mode": "vector", "understand": False})
    assert ids(r) == [h.item_id for h in oracle.search_vectors(
        oracle.encoder.encode_texts(["bag"]), 50, where=attribute_filter(flt["attributes"]))[0]]
    r = client.post("/search", json={"q": "red bag", "limit": 10, "route": 2})
    assert ids(r) == [h.item_id for h in oracle.search("red bag", k=10, route=2).hits]
    page2 = client.post("/search", json={"q": "red bag", "limit": 5, "offset": 5})
    assert ids(page2) == [h.item_id for h in oracle.search("red bag", k=10).hits][5:]
    r = client.post("/search", json={"q": "shoes", "filter": {"category": ["no such > category"]}})
    assert r.status_code == 404 and "no indexed category matches" in r.json()["error"]


def test_photo_queries_equal_the_single_process(client, oracle):
    m = a_product(oracle)
    img = Image.open(m["images"][0]).convert("RGB")
    raw = png_bytes(img)
    want = [h.item_id for h in oracle.search_image(img, k=8)]
    assert ids(client.post("/search", json={"image": base64.b64encode(raw).decode(), "limit": 8})) == want
    assert ids(client.post("/search/image", files={"file": ("p.png", raw)}, data={"limit": "8"})) == want
    both = [h.item_id for h in oracle.search("red", img, k=8).hits]
    assert ids(client.post("/search", json={"q": "red", "image": base64.b64encode(raw).decode(), "limit": 8})) == both


def test_recommend_products_and_images_across_shards(client, oracle):
    groups: dict[str, list[str]] = {}
    for c in oracle.index.categories.values():
        for iid, g in zip(c.meta.column("item_id").to_pylist(), c.meta.column("group_id").to_pylist()):
            groups.setdefault(g, []).append(iid)
    members = next(v for v in groups.values() if len(v) >= 2)
    r = client.post("/recommend", json={"item_ids": [members[0]], "limit": 30})
    assert ids(r) == [h.item_id for h in oracle.search_product(members[0], k=30)]
    assert not set(ids(r)) & set(members)
    # two items that live on different shards
    from moonsearch.serve.ray_app import assign_shards, read_manifest

    parts = assign_shards(read_manifest(oracle.index.root), SHARDS)
    a = oracle.index.categories[parts[0][0]].meta.column("item_id")[0].as_py()
    b = oracle.index.categories[parts[1][0]].meta.column("item_id")[0].as_py()
    r = client.post("/recommend", json={"item_ids": [a, b], "limit": 20})
    assert ids(r) == [h.item_id for h in oracle.search_products([a, b], k=20)]
    assert client.post("/recommend", json={"item_ids": ["NOPE"]}).status_code == 404
    m = a_product(oracle)
    r = client.get(f"/products/{m['item_id']}")
    assert r.status_code == 200 and r.json()["title"] == m["title"]
    assert client.get("/products/NOPE").status_code == 404
    r = client.get(f"/images/{m['item_id']}/0")
    assert r.status_code == 200 and r.content == Path(m["images"][0]).read_bytes()


def test_reload_by_user_config_under_load(served, client, world, clip_tiny):
    """`moonsearch index --append` on the served folder, then a redeploy with the new version (what the
    serve --ray poller does): every shard reloads in place, requests keep succeeding, the new items appear."""
    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.serve import ray_app

    url, folder, opts = served
    before = client.get("/health").json()["items"]
    cat = pq.read_table(world / "catalog.parquet").slice(0, 5)
    cat = cat.set_column(cat.schema.get_field_index("item_id"), "item_id", pa.array([f"RAYNEW{i}" for i in range(5)]))
    extra = folder.parent / "extra.parquet"
    pq.write_table(cat, extra)
    replicas = _replica_actors()
    with hammering(url, {"q": "red sneakers", "limit": 10}, clients=3) as (done, failures):
        run_index(IndexJob(extra, folder, model="clip-tiny", append=True), encoder=clip_tiny)
        ray_app.deploy(opts, shards=SHARDS)
        _wait(lambda: client.get("/health").json()["items"] == before + 5, 120, "the shards did not reload")
    assert done[0] > 5 and not failures, failures[:3]
    assert _replica_actors() == replicas  # reconfigured in place: no replica was replaced
    assert client.get("/products/RAYNEW3").status_code == 200
    fresh = SearchService(folder, encoder=clip_tiny)
    assert ids(client.post("/search", json={"q": "red sneakers", "limit": 10})) == \
        [h.item_id for h in fresh.search("red sneakers", k=10).hits]


def test_a_dead_shard_gives_503_never_a_partial_merge(served, client, clip_tiny):
    """Kill Shard1's replica: until Serve has replaced it, a request either waits for it and gets the full
    answer or fails with 503 naming the shard; it never gets the hits of Shard0 alone."""
    want = [h.item_id for h in SearchService(served[1], encoder=clip_tiny).search("red sneakers", k=10).hits]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Shard1" in a["name"]
             and "SERVE_REPLICA" in a["name"]]
    assert names, ray.util.list_named_actors(all_namespaces=True)
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    statuses = []
    deadline = time.time() + 120
    while True:
        r = client.post("/search", json={"q": "red sneakers", "limit": 10})
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert ids(r) == want, statuses  # a complete answer
            break
        assert r.status_code == 503 and "Shard1" in r.json()["error"], r.text  # or a clear refusal
        assert time.time() < deadline, "Serve did not replace the dead shard"
    r = client.post("/search", json={"q": "red sneakers", "limit": 10})
    assert r.status_code == 200 and ids(r) == want
