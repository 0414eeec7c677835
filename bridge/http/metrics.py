"""Prometheus metrics of the HTTP face, on the bridge instance's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.heartbeats = Counter(
            "kb_http_heartbeats",
            "Accepted HTTP heartbeats, by transport",
            ["transport"],
            registry=registry,
        )
        self.refused = Counter(
            "kb_http_refused", "Device requests refused, by reason", ["reason"], registry=registry
        )
        self.lost = Counter(
            "kb_http_timeouts", "HTTP-only devices declared lost by the sweeper", registry=registry
        )
