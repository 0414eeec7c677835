"""The device id grammar: what may stand for ``{id}`` in a topic."""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import AfterValidator, WithJsonSchema

from schemas.errors import InvalidDeviceId

DEVICE_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)


def is_valid_device_id(value: str) -> bool:
    # fullmatch, not match: "$" would accept a trailing newline.
    return _DEVICE_ID_RE.fullmatch(value) is not None


def validate_device_id(value: str) -> str:
    """Return ``value`` if it is a valid device id, else raise :class:`InvalidDeviceId`."""
    if not isinstance(value, str) or not is_valid_device_id(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else repr(value)[:80]
        raise InvalidDeviceId(
            f"invalid device id {shown!r}: must match {DEVICE_ID_PATTERN} "
            "(1-64 characters, letters, digits, '_' or '-', not starting with '_' or '-')",
            field="device_id",
        )
    return value


def _check(value: str) -> str:
    if not is_valid_device_id(value):
        raise ValueError(f"must match {DEVICE_ID_PATTERN}")
    return value


#: A device id as a pydantic field type. The grammar is checked by the AfterValidator
#: (one error message, ``fullmatch`` semantics), which the JSON Schema cannot see, so the
#: schema states it explicitly: on the string itself, where a strict validator (ajv's
#: strictTypes) and code generators expect ``pattern``, never beside an ``anyOf``.
DeviceId = Annotated[
    str,
    AfterValidator(_check),
    WithJsonSchema({"type": "string", "pattern": DEVICE_ID_PATTERN}),
]
