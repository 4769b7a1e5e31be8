"""A real moonsearch server on a loopback port, in a thread of the test process (uvicorn, real HTTP)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve ``app`` on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def start(index_dir, encoder, **opts):
    """create_app over ``index_dir`` with an already-built encoder (the test session's)."""
    from moonsearch.serve.app import create_app
    from moonsearch.serve.engine import Engine, ServeOptions

    o = ServeOptions(index_dir, **opts)
    return create_app(o, Engine(o, encoder=encoder))


@contextmanager
def hammering(url: str, body: dict, clients: int = 4):
    """``clients`` threads POST ``body`` to ``url``/search in a loop while the block runs; yields
    (requests done: a one-element list, failures: the bodies of non-200 answers)."""
    import httpx

    failures, done, stop = [], [0], threading.Event()

    def hammer():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json=body)
                if r.status_code != 200:
                    failures.append(r.text)
                done[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield done, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


@contextmanager
def static_http(respond):
    """A plain HTTP server on a loopback port (a CDN, a web page): ``respond(path)`` -> (status, body bytes)
    or (status, body, headers) answers each GET and HEAD; yields (base URL, the requests asked, in order,
    as "GET /path" / "HEAD /path")."""
    import http.server

    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self, head=False):
            asked.append(f"{self.command} {self.path}")
            status, body, *more = respond(self.path)
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(more[0] if more else {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET(head=True)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", asked
    finally:
        srv.shutdown()
