"""Prometheus metrics of one app instance: requests, latency, batches, queue depth and gallery size."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `*_created` timestamp series double the output and no dashboard uses them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """A private registry per app, so several apps in one process (tests) never clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "idembed_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "idembed_request_duration_seconds",
            "HTTP request latency by route template",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "idembed_batch_size", "images per onnxruntime call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "idembed_inference_seconds", "onnxruntime time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("idembed_queue_depth", "images waiting for inference", registry=r)
        self.gallery_size = Gauge(
            "idembed_gallery_size", "searchable identities by source", ["source"], registry=r
        )
        self.reembed = Gauge(
            "idembed_reembed_identities",
            "identities of the latest gallery re-embedding by a new model (kept images), by state",
            ["state"],
            registry=r,
        )
        self.model_info = Gauge(
            "idembed_model_info", "1 for the model being served", ["model_id"], registry=r
        )
        # (route, method, status) -> (counter, histogram) children; bounded like the labels themselves.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request and observe its latency (label children cached: no lookup per request)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def bind(
        self, queue_depth: Callable[[], float], centers: Callable[[], float], enrolled: Callable[[], float]
    ) -> None:
        """Gauges read live values at scrape time rather than being updated on every change."""
        self.queue_depth.set_function(queue_depth)
        self.gallery_size.labels("center").set_function(centers)
        self.gallery_size.labels("enrolled").set_function(enrolled)

    def bind_reembedding(self, job: Callable[[], object | None]) -> None:
        """`job()`: the latest re-embedding job (with `total`, `done`, `skipped`), or None."""
        for state in ("total", "done", "skipped"):
            self.reembed.labels(state).set_function(lambda state=state: getattr(job(), state, 0))

    def set_model(self, model_id: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_id).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
