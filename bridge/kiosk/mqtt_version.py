"""Which MQTT version a kiosk speaks: import-free, so the CLI can offer the choice
without loading the contract's models."""

from __future__ import annotations

from enum import StrEnum


class MqttProtocol(StrEnum):
    #: MQTT 5, falling back to 3.1.1 when the broker refuses 5 (amqtt speaks only 3.1.1).
    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"
