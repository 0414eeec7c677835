"""Tunables of a kiosk agent, shared by the standalone agent and the fleet simulator."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.kiosk.mqtt_version import MqttProtocol as MqttProtocol
from schemas import DEFAULT_PREFIX


@dataclass(frozen=True, slots=True)
class AgentOptions:
    keepalive: int = 10
    status_interval_s: float = 30.0
    #: Status is retained either way; QoS 0 trades a lost sample for less traffic.
    status_qos: int = 1
    protocol: MqttProtocol = MqttProtocol.AUTO
    #: How long the broker keeps the session (and queued commands) while we are away.
    session_expiry_s: int = 86_400
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    #: No CONNACK within this time: drop the attempt and back off.
    connect_timeout_s: float = 15.0
    #: With protocol AUTO, an MQTT 5 CONNECT unanswered this long counts as "broker
    #: speaks only 3.1.1" (amqtt, for one, neither answers nor closes).
    protocol_probe_timeout_s: float = 5.0
    #: Wait at most this long for the broker's PUBACK of birth, offline or a final ack.
    publish_timeout_s: float = 5.0
    prefix: str = DEFAULT_PREFIX
    app_version: str | None = None
    android_version: str | None = None
    mac_address: str | None = None
    #: Reported in the birth; by default the local address of the MQTT socket.
    ip_address: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.keepalive <= 65_535:
            raise ValueError(f"keepalive must be 1..65535 seconds, not {self.keepalive}")
        if self.status_interval_s <= 0:
            raise ValueError(f"status interval must be > 0 seconds, not {self.status_interval_s}")
        if self.status_qos not in (0, 1):
            raise ValueError(f"status QoS must be 0 or 1, not {self.status_qos}")
        if self.backoff_base_s <= 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff needs 0 < base <= cap")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError("session expiry must fit in 32 bits")
