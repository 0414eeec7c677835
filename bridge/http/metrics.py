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
        self.ignored_fields = Counter(
            "kb_http_ignored_fields",
            "Heartbeat metrics left out (out of the contract's range or of the wrong type), "
            "by field",
            ["field"],
            registry=registry,
        )
        self.slow_clients = Counter(
            "kb_http_slow_clients",
            "Connections cut for sending their request too slowly, by what was late",
            ["phase"],
            registry=registry,
        )
        self.registrations_without_secret = Counter(
            "kb_http_registrations_without_secret",
            "Registrations accepted without X-Registration-Secret (secret mode 'warn')",
            registry=registry,
        )
        self.lost = Counter(
            "kb_http_timeouts", "HTTP-only devices declared lost by the sweeper", registry=registry
        )
