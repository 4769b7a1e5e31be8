"""The HTTP API and the search page (FastAPI + uvicorn). See ``moonsearch serve --help`` and README "Serve".

Every error is JSON ``{"error": "..."}`` with a 4xx code for bad input (5xx only for our own faults).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from moonsearch.data.images import ImageError, decode, read_bytes, resolve_path
from moonsearch.errors import Unavailable, UnknownItem, UserError
from moonsearch.search.service import Hit
from moonsearch.search.service import DEFAULT_MODE, candidates
from moonsearch.serve.engine import Engine, ServeOptions, attribute_filter, category_counts

log = logging.getLogger("moonsearch.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # and /static/*: no API key needed
BODY_SLACK = 1024 * 1024  # form fields and multipart framing beside the file
HIT_FIELDS = ("title", "category", "attributes", "group_id", "image_urls", "extra")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- request bodies --------------------------------------------------------------------------------
Weight = Union[StrictFloat, StrictInt]


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: Optional[Union[StrictStr, list[StrictStr]]] = None
    attributes: Optional[dict[StrictStr, Union[StrictStr, list[StrictStr]]]] = None


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    q: Optional[Union[StrictStr, dict[StrictStr, Weight]]] = None
    image: Optional[StrictStr] = Field(None, description="base64 (or a data: URL); an http(s) URL only with "
                                                         "--allow-image-urls")
    image_weight: Weight = 1.0
    filter: Optional[Filter] = None
    limit: StrictInt = Field(10, ge=1, le=1000)
    offset: StrictInt = Field(0, ge=0, le=10000)
    attributes_to_retrieve: Optional[list[StrictStr]] = None
    facets: bool = False
    route: Optional[StrictInt] = Field(None, ge=0)
    mode: Optional[Literal["vector", "lexical", "hybrid"]] = None  # default: the CLI's (hybrid)
    understand: bool = True


class RecommendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_ids: list[StrictStr] = Field(min_length=1, max_length=100)
    limit: StrictInt = Field(10, ge=1, le=1000)
    offset: StrictInt = Field(0, ge=0, le=10000)
    filter: Optional[Filter] = None
    include_group: bool = False
    attributes_to_retrieve: Optional[list[StrictStr]] = None


# ---- helpers ---------------------------------------------------------------------------------------
def hit_json(hit: Hit, fields: Optional[list[str]]) -> dict:
    full = {"item_id": hit.item_id, "score": round(float(hit.score), 6), "title": hit.title,
            "category": " > ".join(hit.category), "attributes": hit.attributes, "group_id": hit.group_id,
            "image_urls": [f"/images/{hit.item_id}/{n}" for n in range(len(hit.images))], "extra": hit.extra}
    if fields is None:
        return full
    return {k: v for k, v in full.items() if k in ("item_id", "score") or k in fields}


def check_fields(fields: Optional[list[str]]) -> None:
    bad = [f for f in fields or [] if f not in HIT_FIELDS]
    if bad:
        raise ApiError(422, f"attributes_to_retrieve: unknown field(s) {bad}; known: {list(HIT_FIELDS)}")


def categories_of(flt: Optional[Filter]) -> Optional[list[str]]:
    if flt is None or flt.category is None:
        return None
    return [flt.category] if isinstance(flt.category, str) else list(flt.category) or None


def decode_upload(data: bytes, what: str, cap: int):
    if len(data) > cap:
        raise ApiError(413, f"{what}: {len(data)} bytes is over the {cap}-byte limit")
    try:
        return decode(data, what)
    except ImageError as e:
        raise ApiError(415 if "not an image" in str(e) else 400, str(e))


def image_from_field(value: str, opts: ServeOptions):
    if value.startswith(("http://", "https://")):
        if not opts.allow_image_urls:
            raise ApiError(400, "image: URLs are not fetched by this server (start it with --allow-image-urls)")
        try:
            data = read_bytes(value, timeout=opts.url_timeout, max_bytes=opts.max_upload_bytes)
        except ImageError as e:
            raise ApiError(413 if "larger than" in str(e) else 400, f"image: {e}")
        return decode_upload(data, "image", opts.max_upload_bytes)
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > opts.max_upload_bytes * 4 // 3 + 8:
        raise ApiError(413, f"image: over the {opts.max_upload_bytes}-byte limit")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64 (send the photo's bytes base64-encoded, or a data: URL)")
    return decode_upload(data, "image", opts.max_upload_bytes)


# ---- middleware (pure ASGI: they see every request, the rejected ones included) -------------------------
async def send_json(send, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """Outermost layer: metrics for every request, the API key, and the request body cap (413 before the
    body is parsed, whether or not the client sent a Content-Length)."""

    def __init__(self, app, engine: Engine, api_key: Optional[str]):
        self.app, self.engine, self.api_key = app, engine, api_key

    def body_cap(self, path: str) -> int:
        cap = self.engine.opts.max_upload_bytes
        if path == "/search/image":
            return cap + BODY_SLACK
        if path == "/search":
            return cap * 4 // 3 + BODY_SLACK  # base64 of a photo at the cap
        return BODY_SLACK

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path = time.perf_counter(), scope["path"]
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and not (path in OPEN_PATHS or path.startswith("/static/")):
                given = dict(scope["headers"]).get(b"x-api-key", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                    return await send_json(send_wrapped, 401, {"error": "missing or wrong X-API-Key header"})
            if scope["method"] in ("POST", "PUT", "PATCH"):
                cap = self.body_cap(path)
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > cap:
                    return await send_json(send_wrapped, 413, {"error": f"request body of {int(length)} bytes is "
                                                                        f"over the {cap}-byte limit"})
                body, more = bytearray(), True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > cap:
                        return await send_json(send_wrapped, 413, {"error": f"request body over the {cap}-byte limit"})
                sent = False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_wrapped)
            return await self.app(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("/static" if path.startswith("/static/") else "other")
            self.engine.metrics.request(endpoint, scope.get("method", "GET"), status["code"], time.perf_counter() - t0)


# ---- the app ---------------------------------------------------------------------------------------
def create_app(opts: ServeOptions, engine: Optional[Engine] = None) -> FastAPI:
    """Load the index and its encoder and warm them up (before the server accepts connections)."""
    engine = engine or Engine(opts)
    if not engine.ready:
        engine.warm()
    import gc

    gc.collect()
    gc.freeze()  # the model and the index are long-lived: keep them out of every later GC pass (no stalls)

    @asynccontextmanager
    async def lifespan(app):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="moonsearch", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(UnknownItem)
    async def _unknown(request, e):
        return JSONResponse({"error": str(e)}, status_code=404)

    @app.exception_handler(UserError)
    async def _user_error(request, e):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(Unavailable)
    async def _unavailable(request, e):
        return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            if err.get("type") == "json_invalid":
                parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
                continue
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    def respond(hits, limit, offset, t0, fields, facets=None, extra=None):
        out = {"hits": [hit_json(h, fields) for h in hits], "limit": limit, "offset": offset,
               "processing_time_ms": round((time.perf_counter() - t0) * 1000, 2)}
        if facets is not None:
            out["facets"] = {"category": facets}
        out.update(extra or {})
        return out

    @app.get("/health")
    async def health():
        svc = engine.svc
        return {"status": "ok", "items": svc.index.count, "encoder": svc.index.encoder["name"],
                "dim": svc.index.encoder["dim"], "categories": len(svc.slugs)}

    @app.post("/search")
    async def search(body: SearchBody):
        t0 = time.perf_counter()
        check_fields(body.attributes_to_retrieve)
        svc = engine.svc
        image = None
        if body.image is not None:
            image = await asyncio.get_running_loop().run_in_executor(None, image_from_field, body.image, opts)
        flt = body.filter
        mode = body.mode or DEFAULT_MODE
        text = body.q.strip() if isinstance(body.q, str) else ""
        if text and (mode != "vector" or body.understand):  # hybrid / lexical / understood: one request
            if mode == "lexical" and image is not None:
                mode = "hybrid"  # a photo has no words: its vector joins the text's BM25
            vec = None if mode == "lexical" else await engine.query_vector(body.q, image, float(body.image_weight))
            need = body.offset + body.limit
            fetch = max(need, 200) if body.facets else need

            where = attribute_filter(flt.attributes if flt else None)
            vec_hits = None
            if vec is not None:  # the unfiltered vector side goes through the batched FAISS search
                vec_hits = await engine.searcher.submit((svc, np.asarray(vec, np.float32), candidates(fetch),
                                                         categories_of(flt), body.route, None, where))
                if isinstance(vec_hits, Exception):
                    raise vec_hits

            def run():
                return svc.search(text, image, k=fetch, mode=mode, understand=body.understand, vector=vec,
                                  categories=categories_of(flt), route=body.route, where=where,
                                  vector_hits=vec_hits)

            res = await asyncio.get_running_loop().run_in_executor(engine.search_pool, run)
            facets = category_counts(res.hits) if body.facets else None
            return respond(res.hits[body.offset:need], body.limit, body.offset, t0, body.attributes_to_retrieve,
                           facets, {"understood": res.understood, "mode": res.mode})
        vec = await engine.query_vector(body.q, image, float(body.image_weight))
        hits, facets = await engine.search(svc, vec, body.limit, body.offset, categories_of(flt),
                                           flt.attributes if flt else None, facets=body.facets, route=body.route)
        return respond(hits, body.limit, body.offset, t0, body.attributes_to_retrieve, facets,
                       {"understood": {}, "mode": "vector"})

    @app.post("/search/image")
    async def search_image(file: Annotated[UploadFile, File(description="the photo")],
                           q: Annotated[Optional[str], Form()] = None,
                           limit: Annotated[int, Form(ge=1, le=1000)] = 10,
                           offset: Annotated[int, Form(ge=0, le=10000)] = 0,
                           category: Annotated[Optional[list[str]], Form()] = None,
                           facets: Annotated[bool, Form()] = False):
        t0 = time.perf_counter()
        svc = engine.svc
        data = await file.read(opts.max_upload_bytes + 1)
        image = await asyncio.get_running_loop().run_in_executor(
            None, decode_upload, data, f"file {file.filename or ''}".strip(), opts.max_upload_bytes)
        vec = await engine.query_vector((q or "").strip() or None, image)
        hits, fac = await engine.search(svc, vec, limit, offset, category or None, facets=facets)
        return respond(hits, limit, offset, t0, None, fac)

    @app.post("/recommend")
    async def recommend(body: RecommendBody):
        t0 = time.perf_counter()
        check_fields(body.attributes_to_retrieve)
        svc = engine.svc
        flt = body.filter
        loop = asyncio.get_running_loop()

        def run():
            return svc.search_products(body.item_ids, body.offset + body.limit, exclude_group=not body.include_group,
                                       categories=categories_of(flt),
                                       where=attribute_filter(flt.attributes if flt else None))

        hits = await loop.run_in_executor(engine.search_pool, run)
        return respond(hits[body.offset:], body.limit, body.offset, t0, body.attributes_to_retrieve)

    async def item(item_id: str) -> Hit:  # off the event loop: a sharded service asks its shards
        return await asyncio.get_running_loop().run_in_executor(engine.search_pool, engine.svc.item, item_id)

    @app.get("/products/{item_id}")
    async def product(item_id: str):
        return hit_json(await item(item_id), None) | {"score": None}

    @app.get("/images/{item_id}/{n}")
    async def image(item_id: str, n: int):
        hit = await item(item_id)  # 404 for an unknown item: only catalog images are ever served
        if not 0 <= n < len(hit.images):
            raise ApiError(404, f"item {item_id!r} has {len(hit.images)} image(s); no image {n}")
        ref = hit.images[n]
        if ref.startswith(("http://", "https://")):
            return RedirectResponse(ref, status_code=307)
        path = resolve_path(ref, None) if ref != "embedded" else None
        if path is None or not path.is_absolute() or not path.is_file():
            why = "embedded in the catalog file" if ref == "embedded" else "missing on disk"
            raise ApiError(404, f"image {n} of item {item_id!r} is {why}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, engine, opts.api_key)


def app_from_env():
    """uvicorn factory for ``moonsearch serve --workers N`` (each worker process loads its own copy)."""
    return create_app(ServeOptions.from_env())


def serve(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          log_level: str = "info", access_log: bool = False) -> None:
    import os
    import signal

    import uvicorn

    if workers > 1:
        os.environ.update(opts.to_env())
        uvicorn.run("moonsearch.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5)
        return
    app = create_app(opts)
    engine = app.engine
    try:
        signal.signal(signal.SIGHUP, lambda *_: engine.reload_if_changed(force=True))
    except (ValueError, AttributeError):  # not the main thread, or no SIGHUP on this platform
        pass
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5)
