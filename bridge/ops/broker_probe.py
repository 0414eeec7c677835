"""``doctor``'s look at what the broker does with the features the bridge relies on:
each node of the broker list, probed as the bridge probes at every connect
(:mod:`bridge.service.probe`), and what the bridge makes of the answers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import aiomqtt

from bridge.broker_url import BrokerAddress
from bridge.service.probe import (
    Answer,
    BrokerFeatures,
    BrokerUnsuitable,
    ProbeInconclusive,
    choose_mode,
    probe_features,
    probe_mqtt5,
)
from schemas.topics import bridge_sync_topic


@dataclass(frozen=True, slots=True)
class NodeProbe:
    node: str
    mqtt5: Answer | None = None
    features: BrokerFeatures | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "mqtt5": self.mqtt5.value if self.mqtt5 is not None else None,
            **({"features": self.features.to_json()} if self.features is not None else {}),
            **({"error": self.error} if self.error is not None else {}),
        }


async def probe_nodes(
    address: BrokerAddress, *, prefix: str, timeout_s: float = 3.0
) -> list[NodeProbe]:
    """Every node of the list, in order. The probe topic is a sync topic (the one kind
    the read-only ``_ops`` user may publish)."""
    found: list[NodeProbe] = []
    for node in address.nodes:
        name = f"kb-doctor-probe-{uuid.uuid4().hex[:8]}"
        try:
            mqtt5 = await probe_mqtt5(node, identifier=name, timeout_s=timeout_s)
            features = await probe_features(
                node,
                topic=bridge_sync_topic(uuid.uuid4().hex, prefix),
                identifier=name,
                timeout_s=timeout_s,
            )
        except (aiomqtt.MqttError, ProbeInconclusive, OSError) as exc:
            found.append(NodeProbe(node.url, error=str(exc) or type(exc).__name__))
            continue
        found.append(NodeProbe(node.url, mqtt5, features))
    return found


def describe(probes: list[NodeProbe]) -> tuple[str, str, str | None]:
    """``(level, message, hint)``: OK when the bridge can run on every node that
    answered (a missing feature names the mode the bridge uses instead), WARN when a
    node did not answer the probe, FAIL when none did or one replays no retained
    messages at all."""
    lines: list[str] = []
    level = "OK"
    hint: str | None = None
    answered = [probe for probe in probes if probe.features is not None]
    for probe in probes:
        if probe.features is None:
            lines.append(f"{probe.node}: probe failed: {probe.error}")
            level = "WARN" if level == "OK" else level
            continue
        f = probe.features
        mqtt5 = probe.mqtt5.value if probe.mqtt5 is not None else "?"
        lines.append(
            f"{probe.node}: MQTT 5 {mqtt5}, retained {f.retained.value}, retained to "
            f"wildcards {f.wildcard_retained.value}, shared subscriptions "
            f"{f.shared_subscriptions.value} ({f.took_ms} ms)"
        )
        try:
            mode = choose_mode(f, reconcile="auto", shared_group=None)
        except BrokerUnsuitable as exc:
            level, hint = "FAIL", str(exc)
            continue
        if probe.mqtt5 is Answer.NO:
            lines.append("  commands travel on MQTT 3.1.1 (no message expiry on the broker)")
        if mode.per_device_reconcile:
            lines.append("  the bridge reads the retained presence device by device")
        if f.shared_subscriptions is not Answer.YES:
            lines.append(
                "  no shared subscriptions: run bridges without --shared-group (leader and "
                "standbys over the database lease)"
            )
    if not answered:
        level = "FAIL"
    return level, "\n".join(lines), hint


def wildcard_replay(probes: list[NodeProbe]) -> bool:
    """Whether a wildcard subscription gets the retained state (else: exact topics)."""
    return all(
        probe.features is None or probe.features.wildcard_retained is Answer.YES for probe in probes
    )


__all__ = ["NodeProbe", "describe", "probe_nodes", "wildcard_replay"]
