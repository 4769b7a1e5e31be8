"""moonsearch serve: a real uvicorn server on loopback, real HTTP (httpx), the index from the session's tiny
world. Results are checked against the library (SearchService) as the oracle."""
from __future__ import annotations

import base64
import http.server
import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serve_util import hammering, running, start

from moonsearch.models.base import Query
from moonsearch.search.service import SearchService


@pytest.fixture(scope="module")
def server(tiny_index, clip_tiny):
    with running(start(tiny_index, clip_tiny, reload_interval=0)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def svc(tiny_index, clip_tiny):
    return SearchService(tiny_index, encoder=clip_tiny)


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [h["item_id"] for h in resp.json()["hits"]]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def a_product(svc, with_images=True):
    for slug in svc.slugs:
        meta = svc.index.categories[slug].meta.to_pylist()
        for m in meta:
            if (m["images"] and m["images"][0] != "embedded") or not with_images:
                return m
    raise AssertionError("no product with an image file")


def test_health(server, svc):
    body = server.get("/health").json()
    assert body == {"status": "ok", "items": svc.index.count, "encoder": "clip-tiny", "dim": svc.index.encoder["dim"],
                    "categories": len(svc.slugs)}


def test_text_search_matches_the_library_and_pages(server, svc):
    res = svc.search("red leather sneakers", k=8)  # the default: hybrid, with query understanding
    want = [h.item_id for h in res.hits]
    r = server.post("/search", json={"q": "red leather sneakers", "limit": 8})
    assert ids(r) == want
    body = r.json()
    assert body["mode"] == "hybrid" and body["understood"] == res.understood and body["understood"]
    for mode in ("vector", "lexical"):
        r2 = server.post("/search", json={"q": "red leather sneakers", "limit": 8, "mode": mode})
        assert ids(r2) == [h.item_id for h in svc.search("red leather sneakers", k=8, mode=mode).hits]
    plain = server.post("/search", json={"q": "red leather sneakers", "limit": 8, "mode": "vector", "understand": False})
    assert ids(plain) == [h.item_id for h in svc.search_text("red leather sneakers", k=8)]
    assert plain.json()["understood"] == {}
    assert body["limit"] == 8 and body["offset"] == 0 and body["processing_time_ms"] >= 0
    hit = body["hits"][0]
    assert set(hit) == {"item_id", "score", "title", "category", "attributes", "group_id", "image_urls", "extra"}
    assert hit["image_urls"] and hit["image_urls"][0] == f"/images/{hit['item_id']}/0"
    assert ids(server.post("/search", json={"q": "red leather sneakers", "limit": 3, "offset": 2})) == want[2:5]


def test_weighted_query_is_the_normalised_weighted_sum(server, svc, clip_tiny):
    parts = {"red sneakers": 1.0, "leather": 0.5, "cheap": -0.3}
    vecs = clip_tiny.encode_queries([Query(text=t) for t in parts])
    v = sum(w * x for w, x in zip(parts.values(), vecs))
    want = [h.item_id for h in svc.search_vectors((v / np.linalg.norm(v))[None].astype(np.float32), k=10)[0]]
    assert ids(server.post("/search", json={"q": parts, "limit": 10})) == want
    assert ids(server.post("/search", json={"q": {"red sneakers": 2}, "limit": 5})) == \
        [h.item_id for h in svc.search_text("red sneakers", k=5)]
    for bad in ({"cheap": -1.0}, {"": 1.0}, {"red": 1.0, "red ": -1.0}):
        r = server.post("/search", json={"q": bad})
        assert r.status_code == 400 and "q:" in r.json()["error"], (bad, r.text)


def test_photo_queries_json_and_multipart_match_the_library(server, svc):
    m = a_product(svc)
    img = Image.open(m["images"][0]).convert("RGB")
    raw = png_bytes(img)
    want = [h.item_id for h in svc.search_image(img, k=6)]
    assert ids(server.post("/search", json={"image": base64.b64encode(raw).decode(), "limit": 6})) == want
    data_url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert ids(server.post("/search", json={"image": data_url, "limit": 6})) == want
    assert ids(server.post("/search/image", files={"file": ("p.png", raw, "image/png")}, data={"limit": "6"})) == want
    both = [h.item_id for h in svc.search_image(img, text="red", k=6)]
    assert ids(server.post("/search/image", files={"file": ("p.png", raw)}, data={"q": "red", "limit": "6"})) == both
    hybrid = [h.item_id for h in svc.search("red", img, k=6).hits]
    assert ids(server.post("/search", json={"q": "red", "image": base64.b64encode(raw).decode(), "limit": 6})) == hybrid


def test_filters(server, svc):
    m = a_product(svc)
    top = " > ".join(m["category"][:1])
    r = server.post("/search", json={"q": "shoes", "limit": 20, "filter": {"category": [top]}})
    assert r.status_code == 200 and r.json()["hits"]
    assert all(h["category"].startswith(top) for h in r.json()["hits"])
    colour = json.loads(m["attributes"])["colour"]
    n_colour = sum(json.loads(a or "{}").get("colour") == colour
                   for c in svc.index.categories.values() for a in c.meta.column("attributes").to_pylist())
    r = server.post("/search", json={"q": "shoes", "limit": 1000, "filter": {"attributes": {"colour": colour.upper()}}})
    hits = r.json()["hits"]
    assert len(hits) == n_colour and all(h["attributes"]["colour"] == colour for h in hits)
    r = server.post("/search", json={"q": "shoes", "filter": {"category": ["no such > category"]}})
    assert r.status_code == 404 and "no indexed category matches" in r.json()["error"]
    r = server.post("/search", json={"q": "shoes", "facets": True, "limit": 5})
    facets = r.json()["facets"]["category"]
    assert sum(facets.values()) == min(200, svc.index.count) and len(r.json()["hits"]) == 5


def test_attributes_to_retrieve(server):
    r = server.post("/search", json={"q": "bag", "limit": 2, "attributes_to_retrieve": ["title"]})
    assert all(set(h) == {"item_id", "score", "title"} for h in r.json()["hits"])
    r = server.post("/search", json={"q": "bag", "attributes_to_retrieve": ["password"]})
    assert r.status_code == 422 and "password" in r.json()["error"]


@pytest.mark.parametrize("body, where", [
    ({"q": "x", "limit": 0}, "limit"), ({"q": "x", "limit": 1001}, "limit"), ({"q": "x", "offset": -1}, "offset"),
    ({"q": "x", "offset": 10001}, "offset"), ({"q": "x", "limit": "10"}, "limit"), ({"q": 5}, "q"),
    ({"q": "x", "limit": True}, "limit"), ({"q": "x", "colour": "red"}, "colour"), ({"q": {"a": "heavy"}}, "q"),
    ({"q": "x", "filter": {"category": 3}}, "filter"),
])
def test_bad_requests_get_422_with_the_field(server, body, where):
    r = server.post("/search", json=body)
    assert r.status_code == 422 and where in r.json()["error"], r.text


def test_bad_json_and_empty_queries(server):
    r = server.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    for body in ({}, {"q": "   "}):
        r = server.post("/search", json=body)
        assert r.status_code == 400 and "error" in r.json()
    r = server.get("/no/such/endpoint")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_bad_photos_are_4xx(server, svc):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    r = server.post("/search/image", files={"file": ("x.jpg", junk)})
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    r = server.post("/search", json={"image": base64.b64encode(junk).decode()})
    assert r.status_code == 415
    r = server.post("/search", json={"image": "@@not base64@@"})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    m = a_product(svc)
    truncated = png_bytes(Image.open(m["images"][0]).convert("RGB"))[:-200]
    r = server.post("/search/image", files={"file": ("t.png", truncated)})
    assert r.status_code == 400 and "image" in r.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, "PNG")  # 100 Mpx in a few kB
    r = server.post("/search/image", files={"file": ("bomb.png", bomb.getvalue())})
    assert r.status_code == 400 and "decompression bomb" in r.json()["error"]


def test_big_uploads_are_413(server):
    big = b"\x89PNG" + b"\0" * (40 * 1024 * 1024)
    r = server.post("/search/image", files={"file": ("big.png", big)})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = server.post("/search", json={"image": base64.b64encode(big[: 11 * 1024 * 1024]).decode()})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the cap must hold while streaming
        for _ in range(20):
            yield b"\0" * (1024 * 1024)

    r = server.post("/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    # just under the cap is fine as far as size goes (then refused as not an image)
    r = server.post("/search/image", files={"file": ("ok.png", b"\0" * (9 * 1024 * 1024))})
    assert r.status_code == 415


def test_recommend_excludes_the_inputs_and_their_groups(server, svc):
    groups = {}
    for c in svc.index.categories.values():
        for iid, g in zip(c.meta.column("item_id").to_pylist(), c.meta.column("group_id").to_pylist()):
            groups.setdefault(g, []).append(iid)
    members = next(v for v in groups.values() if len(v) >= 2)
    r = server.post("/recommend", json={"item_ids": [members[0]], "limit": 30})
    got = ids(r)
    assert got and not set(got) & set(members)
    assert got == [h.item_id for h in svc.search_product(members[0], k=30)]
    two = [members[0], next(v for v in groups.values() if v != members)[0]]
    assert not set(ids(server.post("/recommend", json={"item_ids": two, "limit": 20}))) & set(two)
    r = server.post("/recommend", json={"item_ids": [members[0]], "include_group": True, "limit": 200})
    assert set(members[1:]) <= set(ids(r))
    r = server.post("/recommend", json={"item_ids": ["NOPE"]})
    assert r.status_code == 404 and "NOPE" in r.json()["error"]
    assert server.post("/recommend", json={"item_ids": []}).status_code == 422


def test_products_and_images(server, svc):
    m = a_product(svc)
    r = server.get(f"/products/{m['item_id']}")
    assert r.status_code == 200 and r.json()["title"] == m["title"]
    assert server.get("/products/NOPE").status_code == 404
    r = server.get(f"/images/{m['item_id']}/0")
    assert r.status_code == 200 and r.content == Path(m["images"][0]).read_bytes()
    assert server.get(f"/images/{m['item_id']}/{len(m['images'])}").status_code == 404
    assert server.get(f"/images/{m['item_id']}/-1").status_code == 404
    assert server.get(f"/images/{m['item_id']}/x").status_code == 422


@pytest.mark.parametrize("path", [
    "/images/../../../../etc/passwd", "/images/..%2F..%2F..%2Fetc%2Fpasswd/0", "/images/%2e%2e/%2e%2e/etc/passwd/0",
    "/images/..%252F..%252Fetc%252Fpasswd/0", "/images/%2Fetc%2Fpasswd/0", "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
])
def test_no_path_traversal(server, path):
    r = server.get(path)
    assert 400 <= r.status_code < 500 and b"root:" not in r.content


def test_metrics_count_requests_latency_and_batches(server):
    server.post("/search", json={"q": "metrics probe"})
    server.post("/search", json={"q": "x", "limit": 0})
    text = server.get("/metrics").text
    assert 'moonsearch_requests_total{endpoint="/search",method="POST",status="200"}' in text
    assert 'moonsearch_errors_total{endpoint="/search",kind="client"}' in text
    assert 'moonsearch_request_duration_seconds_bucket{endpoint="/search",le="+Inf"}' in text
    assert "moonsearch_encode_batch_size_count" in text


def test_concurrent_queries_are_micro_batched(tiny_index, clip_tiny, svc):
    app = start(tiny_index, clip_tiny, reload_interval=0, max_wait_ms=50)
    texts = [f"query number {i} red bag" for i in range(24)]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda t: ids(c.post("/search", json={"q": t, "limit": 5, "mode": "vector",
                                                                      "understand": False})), texts))
    batches = app.engine.metrics.batch
    assert batches.count < len(texts), "every query was encoded alone"
    assert batches.sum == len(texts)
    assert got == [[h.item_id for h in svc.search_text(t, k=5)] for t in texts]  # batching changes no result


def test_api_key(tiny_index, clip_tiny):
    with running(start(tiny_index, clip_tiny, reload_interval=0, api_key="s3cret")) as url:
        c = httpx.Client(base_url=url, timeout=60)
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        assert c.get("/static/app.js").status_code == 200
        for method, path, kw in (("POST", "/search", {"json": {"q": "x"}}), ("GET", "/metrics", {}),
                                 ("GET", "/products/P0", {}), ("GET", "/images/P0/0", {}),
                                 ("POST", "/recommend", {"json": {"item_ids": ["x"]}})):
            r = c.request(method, path, **kw)
            assert r.status_code == 401 and "X-API-Key" in r.json()["error"], path
            r = c.request(method, path, headers={"X-API-Key": "wrong"}, **kw)
            assert r.status_code == 401
        assert c.post("/search", json={"q": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_image_urls_only_when_allowed(tiny_index, clip_tiny, svc, tmp_path):
    m = a_product(svc)
    img = Image.open(m["images"][0]).convert("RGB")
    (tmp_path / "p.png").write_bytes(png_bytes(img))
    (tmp_path / "big.png").write_bytes(b"\0" * (11 * 1024 * 1024))
    handler = lambda *a, **k: _Images(*a, directory=str(tmp_path), **k)  # noqa: E731
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with running(start(tiny_index, clip_tiny, reload_interval=0)) as url:
            r = httpx.post(url + "/search", json={"image": base + "/p.png"}, timeout=60)
            assert r.status_code == 400 and "--allow-image-urls" in r.json()["error"]
        with running(start(tiny_index, clip_tiny, reload_interval=0, allow_image_urls=True)) as url:
            r = httpx.post(url + "/search", json={"image": base + "/p.png", "limit": 5}, timeout=60)
            assert ids(r) == [h.item_id for h in svc.search_image(img, k=5)]
            r = httpx.post(url + "/search", json={"image": base + "/big.png"}, timeout=60)
            assert r.status_code == 413
            r = httpx.post(url + "/search", json={"image": base + "/missing.png"}, timeout=60)
            assert r.status_code == 400 and "404" in r.json()["error"]
    finally:
        files.shutdown()


def test_hot_reload_under_concurrent_requests(world, tiny_index, clip_tiny, tmp_path):
    from moonsearch.index.index_set import IndexSet
    from moonsearch.indexer.run import IndexJob, run_index

    folder = tmp_path / "served"
    shutil.copytree(tiny_index, folder)
    before = IndexSet.load(folder).count
    victim = IndexSet.load(folder).categories[sorted(IndexSet.load(folder).categories)[0]].meta.column("item_id")[0].as_py()
    # five new products: copies of catalog rows under new ids
    cat = pq.read_table(world / "catalog.parquet").slice(0, 5)
    new_ids = [f"NEW{i}" for i in range(5)]
    cat = cat.set_column(cat.schema.get_field_index("item_id"), "item_id", pa.array(new_ids))
    pq.write_table(cat, world / "extra.parquet")

    app = start(folder, clip_tiny, reload_interval=0.1)
    with running(app) as url:
        with hammering(url, {"q": "red sneakers", "limit": 20}) as (done, failures):
            IndexSet.load(folder).delete({victim})  # what `moonsearch delete` does
            _wait_items(url, before - 1)
            assert httpx.get(f"{url}/products/{victim}").status_code == 404
            run_index(IndexJob(world / "extra.parquet", folder, model="clip-tiny", append=True), encoder=clip_tiny)
            _wait_items(url, before + 4)
            assert httpx.get(f"{url}/products/NEW3").status_code == 200
    assert done[0] > 10 and not failures, failures[:3]
    assert app.engine.metrics.reloads >= 2


def _wait_items(url: str, n: int, timeout: float = 30.0) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(url + "/health").json()["items"] == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not reload to {n} items")


@pytest.mark.slow
def test_workers_serve_the_same_answers(tiny_index, svc, tmp_path):
    """`moonsearch serve --workers 2` as users start it: two processes, one port, same results."""
    import os
    import subprocess
    import sys
    import time

    from serve_util import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("moonsearch")
    proc = subprocess.Popen([str(exe), "serve", "--index", str(tiny_index), "--model", "clip-tiny", "--workers", "2",
                             "--port", str(port), "--reload-interval", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "MOONSEARCH_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the workers did not come up"
            time.sleep(0.5)
        want = [h.item_id for h in svc.search("red bag", k=5).hits]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: ids(httpx.post(url + "/search", json={"q": "red bag", "limit": 5},
                                                         timeout=60)), range(16)))
        assert all(g == want for g in got)
    finally:
        proc.terminate()
        proc.wait(30)
