"""Prometheus text-format metrics, kept in memory (one set per server, so tests can run several)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """A Prometheus histogram: counts of observations at or under each bucket's upper bound."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, cumulative = [], 0
        for upper, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{upper:g}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Request counts and latencies by route, the queue depth, the memory held, and the micro-batch sizes,
    rendered as Prometheus text by `render` (GET /metrics)."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, memory_held: Callable[[], int] = lambda: 0) -> None:
        self._lock = threading.Lock()
        self.queue_depth = queue_depth
        self.memory_held = memory_held
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status) -> count
        self.latency: dict[str, Histogram] = {}  # route -> seconds
        self.images_generated = 0
        self.batch_requests = Histogram(BATCH_BUCKETS)  # requests served by one model.generate call
        self.batch_images = Histogram(BATCH_BUCKETS)  # images made by one model.generate call
        self.max_batch_requests = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, requests: int, images: int) -> None:
        with self._lock:
            self.batch_requests.observe(requests)
            self.batch_images.observe(images)
            self.max_batch_requests = max(self.max_batch_requests, requests)
            self.images_generated += images

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP blip3o_requests_total HTTP requests by route and status.",
                     "# TYPE blip3o_requests_total counter"]
            lines += [f'blip3o_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                      for (m, r, s), n in sorted(self.requests.items())]
            lines += ["# HELP blip3o_request_duration_seconds Time to the response's start, by route.",
                      "# TYPE blip3o_request_duration_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("blip3o_request_duration_seconds", f'route="{route}"')
            lines += ["# HELP blip3o_queue_depth Requests waiting for the model.", "# TYPE blip3o_queue_depth gauge",
                      f"blip3o_queue_depth {self.queue_depth()}",
                      "# HELP blip3o_memory_held_bytes Bytes of the memory budget held by queued and running requests.",
                      "# TYPE blip3o_memory_held_bytes gauge", f"blip3o_memory_held_bytes {self.memory_held()}",
                      "# HELP blip3o_images_generated_total Images generated.",
                      "# TYPE blip3o_images_generated_total counter",
                      f"blip3o_images_generated_total {self.images_generated}",
                      "# HELP blip3o_batch_requests Requests served by one generate call (micro-batch size).",
                      "# TYPE blip3o_batch_requests histogram", *self.batch_requests.lines("blip3o_batch_requests"),
                      "# HELP blip3o_batch_images Images made by one generate call.",
                      "# TYPE blip3o_batch_images histogram", *self.batch_images.lines("blip3o_batch_images"),
                      "# HELP blip3o_batch_requests_max Largest micro-batch so far, in requests.",
                      "# TYPE blip3o_batch_requests_max gauge",
                      f"blip3o_batch_requests_max {self.max_batch_requests}"]
        return "\n".join(lines) + "\n"
