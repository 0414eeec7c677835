"""Prometheus metrics of credential management, on the registry the caller owns (the
bridge's, so ``/metrics`` shows them next to the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter


@dataclass
class SecurityMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.provision = Counter(
            "kb_provision_requests",
            "Provisioning requests by outcome (accepted, refused, replayed) and reason",
            ["outcome", "reason"],
            registry=r,
        )
        self.rotations = Counter(
            "kb_token_rotations", "Token rotations ended, by how", ["action"], registry=r
        )
