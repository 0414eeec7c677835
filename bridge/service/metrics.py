"""Prometheus metrics of one bridge instance, on a registry the instance owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class BridgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.messages = Counter(
            "kb_messages_received", "MQTT messages received", ["kind"], registry=r
        )
        self.rejected = Counter(
            "kb_messages_rejected", "Messages rejected, by reason", ["reason"], registry=r
        )
        self.presence = Counter(
            "kb_presence_events", "Presence events by verdict", ["verdict"], registry=r
        )
        self.status_written = Counter("kb_status_written", "Status rows written", registry=r)
        self.status_skipped = Counter(
            "kb_status_skipped", "Status not written, by reason", ["reason"], registry=r
        )
        self.status_held = Gauge(
            "kb_status_held",
            "Devices whose status waits for its session's birth (telemetry fence)",
            registry=r,
        )
        self.status_coalesced = Counter(
            "kb_status_coalesced", "Status replaced in memory by a newer one", registry=r
        )
        self.status_throttled = Counter(
            "kb_status_throttled", "Status from devices sending too fast", registry=r
        )
        self.db_errors = Counter("kb_db_errors", "Failed database batches", ["op"], registry=r)
        self.buffer_dropped = Counter(
            "kb_presence_buffer_dropped", "Presence events dropped: buffer full", registry=r
        )
        self.buffer_depth = Gauge(
            "kb_presence_buffer_depth", "Presence events waiting for the database", registry=r
        )
        self.status_pending = Gauge(
            "kb_status_pending", "Devices with telemetry waiting for the database", registry=r
        )
        self.batch_seconds = Histogram(
            "kb_db_batch_seconds",
            "Database batch latency",
            ["op"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kb_db_batch_size",
            "Rows per database batch",
            ["op"],
            buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.detection_lag = Histogram(
            "kb_presence_commit_lag_seconds",
            "Broker delivery to committed row, for presence events",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.connects = Counter("kb_broker_connects", "Successful broker connections", registry=r)
        self.connected = Gauge("kb_broker_connected", "1 while connected to the broker", registry=r)
        self.broker_node = Info(
            "kb_broker_node", "The broker node each link uses (or tries) now", ["link"], registry=r
        )
        self.broker_feature = Gauge(
            "kb_broker_feature",
            "1 when the broker's probe found the feature works (wildcard_retained, "
            "shared_subscriptions)",
            ["feature"],
            registry=r,
        )
        self.silent = Counter(
            "kb_presence_silent",
            "Online devices declared lost (silent): nothing heard for their silence bound",
            registry=r,
        )
        self.leader = Gauge(
            "kb_writer", "1 while this instance writes the database (holds the lease)", registry=r
        )
        self.writer_heartbeat_age = Gauge(
            "kb_writer_heartbeat_age_seconds",
            "Seconds since the last heartbeat of a writing instance of this database",
            registry=r,
        )
        self.commands = Counter(
            "kb_command_transitions",
            "Command state changes seen by the bridge",
            ["state"],
            registry=r,
        )
        self.presence_rereads = Counter(
            "kb_presence_rereads",
            "Devices whose retained presence was read again: telemetry of a session whose "
            "birth never arrived",
            registry=r,
        )
        self.reconciled_unknown = Counter(
            "kb_reconciled_unknown", "Devices set unknown by reconciliation", registry=r
        )

    def rejected_total(self) -> float:
        return sum(
            sample.value
            for metric in self.rejected.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
