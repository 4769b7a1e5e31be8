"""Prometheus text exposition for the server, kept by hand (counters and histograms, no dependency)."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]
        return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.batch = Histogram(BATCH_BUCKETS)
        self.reloads = 0
        self.reload_failures = 0
        self.items = 0

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, method, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if status >= 400:
                self.errors[(endpoint, "client" if status < 500 else "server")] += 1

    def batch_size(self, n: int) -> None:
        with self.lock:
            self.batch.observe(n)

    def render(self) -> str:
        with self.lock:
            out = ["# HELP moonsearch_requests_total HTTP requests by endpoint, method and status.",
                   "# TYPE moonsearch_requests_total counter"]
            out += [f'moonsearch_requests_total{{endpoint="{_escape(e)}",method="{m}",status="{s}"}} {n}'
                    for (e, m, s), n in sorted(self.requests.items())]
            out += ["# HELP moonsearch_request_duration_seconds Request latency by endpoint.",
                    "# TYPE moonsearch_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("moonsearch_request_duration_seconds", f'endpoint="{_escape(e)}"')
            out += ["# HELP moonsearch_errors_total Failed requests (client: 4xx, server: 5xx).",
                    "# TYPE moonsearch_errors_total counter"]
            out += [f'moonsearch_errors_total{{endpoint="{_escape(e)}",kind="{k}"}} {n}'
                    for (e, k), n in sorted(self.errors.items())]
            out += ["# HELP moonsearch_encode_batch_size Queries per encoder call (micro-batching).",
                    "# TYPE moonsearch_encode_batch_size histogram"]
            out += self.batch.lines("moonsearch_encode_batch_size", "")
            out += ["# HELP moonsearch_index_reloads_total Index reloads after the manifest changed.",
                    "# TYPE moonsearch_index_reloads_total counter", f"moonsearch_index_reloads_total {self.reloads}",
                    "# HELP moonsearch_index_reload_failures_total Reloads that failed (the old index kept serving).",
                    "# TYPE moonsearch_index_reload_failures_total counter",
                    f"moonsearch_index_reload_failures_total {self.reload_failures}",
                    "# HELP moonsearch_index_items Items in the served index.",
                    "# TYPE moonsearch_index_items gauge", f"moonsearch_index_items {self.items}"]
        return "\n".join(out) + "\n"
