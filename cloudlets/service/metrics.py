"""The service's Prometheus metrics (``GET /metrics``), with prometheus-client.

Each :class:`Metrics` has its own registry, so two services in one process
(tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

#: The text exposition format's media type.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Render durations: a tiny tar render takes well under a second, a large
#: EC2 import many minutes.
_RENDER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Answer durations: a poll takes about a millisecond, a create a few.
_REQUEST_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    """Requests and their durations, renders by status, render durations, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cloudlets_http_requests", "HTTP requests answered, by method, route and status",
            ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "cloudlets_http_request_duration_seconds",
            "seconds from a request's handling starting to its answer's last byte handed "
            "to the server, by method and route", ["method", "route"],
            buckets=_REQUEST_BUCKETS, registry=self.registry)
        self.renders = Counter("cloudlets_renders", "renders finished, by status",
                               ["status"], registry=self.registry)
        self.render_seconds = Histogram(
            "cloudlets_render_duration_seconds", "seconds from queueing to the end of a render",
            buckets=_RENDER_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("cloudlets_render_queue_depth",
                                 "renders waiting for a worker", registry=self.registry)
        self.rendering = Gauge("cloudlets_renders_running", "renders being rendered now",
                               registry=self.registry)

    def watch(self, queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the queue depth and the renders running from the executor."""
        self.queue_depth.set_function(lambda: float(queued()))
        self.rendering.set_function(lambda: float(running()))

    def request(self, method: str, route: str, status: int,
                seconds: float | None = None) -> None:
        """Count one answered request, and how long it took."""
        self.requests.labels(method, route, str(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(method, route).observe(seconds)

    def render_finished(self, status: str, seconds: float | None) -> None:
        """Count one finished render and its duration."""
        self.renders.labels(status).inc()
        if seconds is not None:
            self.render_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """:returns: the metrics in the Prometheus text format."""
        return bytes(generate_latest(self.registry))
