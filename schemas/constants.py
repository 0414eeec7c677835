"""Numbers and names that the whole contract shares."""

from __future__ import annotations

from typing import Final

#: Bumped when a payload changes incompatibly; also the ``vN`` in the default prefix.
SCHEMA_VERSION: Final = 1
DEFAULT_PREFIX: Final = f"kiosk/v{SCHEMA_VERSION}"
#: The revision of docs/CONTRACT.md. A minor revision only adds (optional fields, enum
#: values a newer kiosk may send, clarified rules): ``schema_version`` stays 1 and a
#: kiosk written for 1.0 keeps working.
CONTRACT_VERSION: Final = "1.1"

#: Larger payloads are rejected before they are parsed.
MAX_PAYLOAD_BYTES: Final = 16 * 1024

#: Reserved pseudo-device under the prefix for the bridge's own presence.
BRIDGE_SEGMENT: Final = "_bridge"
PROVISION_SEGMENT: Final = "provision"

#: 64 lowercase hex characters (256 random bits): a device's MQTT password, handed out by
#: provisioning and by ``rotate_token``.
TOKEN_PATTERN: Final = r"^[0-9a-f]{64}$"

# Largest value a signed 64-bit SQL column holds; sessions and seqs must fit in one.
MAX_INT64: Final = 2**63 - 1
