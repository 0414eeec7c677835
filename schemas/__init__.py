"""kiosk-bridge wire contract v1: topics, payload models and their codec.

This package is the single source of the contract; ``docs/CONTRACT.md``, the JSON
Schemas in ``schemas/json/`` and ``docs/asyncapi.yaml`` are derived from it.
"""

from schemas.codec import PresenceMessage, decode, decode_for_kind, decode_presence, encode
from schemas.constants import DEFAULT_PREFIX, MAX_PAYLOAD_BYTES, SCHEMA_VERSION
from schemas.device_id import DEVICE_ID_PATTERN, DeviceId, is_valid_device_id, validate_device_id
from schemas.errors import (
    ContractError,
    InvalidDeviceId,
    InvalidPayload,
    InvalidTopic,
    PayloadTooLarge,
)
from schemas.payloads import (
    Ack,
    AckState,
    BridgePresence,
    Command,
    CommandType,
    DeviceConfig,
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    PresenceState,
    ReconnectArgs,
    RefreshArgs,
    RotateTokenArgs,
    Status,
    WipeArgs,
)
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_request,
    decode_provision_response,
)
from schemas.topics import (
    DeviceTopic,
    TopicKind,
    all_filter,
    bridge_presence_topic,
    device_filter,
    device_topic,
    parse_topic,
    provision_topic,
    shared,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DEVICE_ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "Ack",
    "AckState",
    "BridgePresence",
    "Command",
    "CommandType",
    "ContractError",
    "DeviceConfig",
    "DeviceId",
    "DeviceTopic",
    "InvalidDeviceId",
    "InvalidPayload",
    "InvalidTopic",
    "OfflineReason",
    "PayloadTooLarge",
    "PresenceLost",
    "PresenceMessage",
    "PresenceOffline",
    "PresenceOnline",
    "PresenceState",
    "ProvisionAccepted",
    "ProvisionRefused",
    "ProvisionRequest",
    "ReconnectArgs",
    "RefreshArgs",
    "RefusalReason",
    "RotateTokenArgs",
    "Status",
    "TopicKind",
    "WipeArgs",
    "all_filter",
    "bridge_presence_topic",
    "decode",
    "decode_for_kind",
    "decode_presence",
    "decode_provision_request",
    "decode_provision_response",
    "device_filter",
    "device_topic",
    "encode",
    "is_valid_device_id",
    "parse_topic",
    "provision_topic",
    "shared",
    "validate_device_id",
]
