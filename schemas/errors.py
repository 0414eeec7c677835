"""Errors raised when a message or topic breaks the contract.

    ContractError (ValueError)
     ├── InvalidTopic        the topic is not one of the contract's topics
     ├── InvalidDeviceId     the device id does not match the id grammar
     └── InvalidPayload      the payload is not valid JSON, too large, or fails validation
          └── PayloadTooLarge

Every error carries ``field``: the dotted path of the offending field ("" for the whole
message), so a log line or a CLI message can name it.
"""

from __future__ import annotations


class ContractError(ValueError):
    """A topic or payload that does not follow the contract."""

    #: Short machine-readable reason, used as a metrics label.
    reason: str = "invalid"

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class InvalidTopic(ContractError):
    reason = "bad_topic"


class InvalidDeviceId(ContractError):
    reason = "bad_device_id"


class InvalidPayload(ContractError):
    reason = "bad_payload"


class PayloadTooLarge(InvalidPayload):
    reason = "too_large"
