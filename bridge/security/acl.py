"""Who may publish, subscribe to and receive what: the ACL model, in one place.

Mosquitto enforces it in two parts (see ``mosquitto/README.md``):

* Static ``pattern`` lines in ``mosquitto/acl`` (:func:`acl_file_text`): the per-device and
  per-claimant rules, which need ``%u``/``%c`` substitution. Mosquitto 2.0's dynamic
  security plugin has no such substitution in its ACL topics.
* Dynamic-security roles for the few fixed principals (:func:`static_roles`). Device
  clients get no role at all: with every default access set to deny, dynsec *defers* a
  decision it has no rule for, and the pattern lines decide.

:func:`allowed` states the same rules as one function; the embedded amqtt broker's
plugin enforces them with it, and the tests use it as the expected answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from schemas import DEFAULT_PREFIX, ContractError, TopicKind, device_topic, parse_topic
from schemas.constants import BRIDGE_SEGMENT, PROVISION_SEGMENT
from schemas.provisioning import CLAIM_CLIENT_ID_PREFIX, is_claim_client_id, parse_provision_topic
from schemas.topics import provision_topic

ROLE_BRIDGE: Final = "kb-bridge"
ROLE_DYNSEC_ADMIN: Final = "kb-dynsec-admin"
ROLE_OPS: Final = "kb-ops"
ROLE_CLAIM: Final = "kb-claim"
ROLE_DEVICE: Final = "kb-device"
#: Every device's dynsec client is in this group (created so at provisioning and
#: enrolment; ``kiosk-bridge broker upgrade`` adds clients made before it existed).
GROUP_DEVICES: Final = "kb-devices"
CONTROL_FILTER: Final = "$CONTROL/dynamic-security/#"

#: What a device may publish on its own topics, and what it may read of its own.
DEVICE_PUBLISHES: Final = (TopicKind.PRESENCE, TopicKind.STATUS, TopicKind.ACK)
DEVICE_READS: Final = (TopicKind.PRESENCE, TopicKind.CMD, TopicKind.CONFIG)
#: Ids a device may not take: the bridge's own client ids, and the claim connections'.
RESERVED_ID_PREFIXES: Final = ("kiosk-bridge-", CLAIM_CLIENT_ID_PREFIX)


class Role(StrEnum):
    DEVICE = "device"
    BRIDGE = "bridge"
    OPS = "ops"
    CLAIM = "claim"


class Access(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class StaticUsers:
    """Usernames of the fixed principals. They start with ``_``, which no device id may,
    so a fixed principal can never be mistaken for a device (nor the ``%u`` patterns
    give it a real device's topics)."""

    bridge: str = "_bridge"
    ops: str = "_ops"
    claim: str = "_claim"

    def role_of(self, username: str | None) -> Role:
        if username == self.bridge:
            return Role.BRIDGE
        if username == self.ops:
            return Role.OPS
        if username == self.claim:
            return Role.CLAIM
        return Role.DEVICE


def is_reserved_id(device_id: str) -> bool:
    return device_id.startswith(RESERVED_ID_PREFIXES)


# --- Mosquitto: the static pattern file ------------------------------------------------


def acl_file_text(prefix: str = DEFAULT_PREFIX) -> str:
    """The content of ``mosquitto/acl``; ``tests`` compare the committed file with it."""
    lines = [
        "# kiosk-bridge ACL patterns; generated from bridge/security/acl.py, keep in sync.",
        "#",
        "# Only rules that need %u (username) or %c (client id) live here: Mosquitto 2.0's",
        "# dynamic-security plugin cannot substitute them. Every other rule is a dynsec",
        "# role. dynsec defers to this file whenever it has no rule of its own (its default",
        "# access is deny for every ACL type), so these lines are all a device gets.",
        "#",
        "# A device's username is its device id, and dynsec binds its client id to it.",
    ]
    for kind in DEVICE_PUBLISHES:
        lines.append(f"pattern write {prefix}/%u/{kind.value}")
    for kind in DEVICE_READS:
        lines.append(f"pattern read {prefix}/%u/{kind.value}")
    lines += [
        "",
        "# Provisioning by claim: every connection of the shared claim credential has its",
        "# own client id (claim-<random>), and may only ask and be answered under it.",
        "# These two lines also match a device's own id; its dynsec group (kb-devices)",
        "# denies it provisioning topics explicitly, which does not defer to this file.",
        f"pattern write {prefix}/{PROVISION_SEGMENT}/%c/request",
        f"pattern read {prefix}/{PROVISION_SEGMENT}/%c/response",
    ]
    return "\n".join(lines) + "\n"


# --- Mosquitto: dynsec roles of the fixed principals ---------------------------------------


def _acl(acltype: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def _readable(topic: str, allow: bool = True, priority: int = 0) -> list[dict[str, Any]]:
    return [
        _acl("subscribePattern", topic, allow, priority),
        _acl("publishClientReceive", topic, allow, priority),
    ]


def static_roles(prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """dynsec roles (``createRole`` payloads, also the ``roles`` of the bootstrap file)."""
    everything = f"{prefix}/#"
    device_shaped = f"{prefix}/+/+"
    bridge_publishes = [
        f"{prefix}/+/{TopicKind.CMD.value}",
        f"{prefix}/+/{TopicKind.CONFIG.value}",
        # Revocation overwrites the retained birth of a kicked device (Mosquitto kicks
        # without publishing the Will).
        f"{prefix}/+/{TopicKind.PRESENCE.value}",
        f"{prefix}/{BRIDGE_SEGMENT}/#",
        f"{prefix}/{PROVISION_SEGMENT}/+/response",
    ]
    return [
        {
            "rolename": ROLE_BRIDGE,
            "textname": "kiosk-bridge service: reads every device, sends commands and config",
            "acls": [
                *(_acl("publishClientSend", topic) for topic in bridge_publishes),
                *_readable(everything),
                # MQTT 5 shared subscriptions of a bridge running as several instances.
                _acl("subscribePattern", f"$share/+/{everything}"),
            ],
        },
        {
            "rolename": ROLE_DYNSEC_ADMIN,
            "textname": "manages credentials over $CONTROL/dynamic-security/v1",
            "acls": [_acl("publishClientSend", CONTROL_FILTER), *_readable(CONTROL_FILTER)],
        },
        {
            "rolename": ROLE_OPS,
            "textname": "read-only operators (kiosk-bridge watch, doctor, device show)",
            "acls": [
                # Commands may carry a new token (rotate_token) and provisioning answers
                # carry tokens: read-only must not mean "can become any device".
                *_readable(f"{prefix}/+/{TopicKind.CMD.value}", allow=False, priority=10),
                *_readable(f"{prefix}/{PROVISION_SEGMENT}/#", allow=False, priority=10),
                *_readable(everything),
                *_readable("$SYS/#"),
                # The snapshot marker of read_retained() (bridge.ops.mqtt).
                _acl("publishClientSend", f"{prefix}/{BRIDGE_SEGMENT}/sync/+", priority=10),
                # An explicit deny, not dynsec's default: a default would defer to the
                # pattern file, which grants "%u" topics (kiosk/v1/_ops/...).
                _acl("publishClientSend", everything, allow=False),
            ],
        },
        {
            "rolename": ROLE_DEVICE,
            "textname": "every kiosk (group kb-devices): no provisioning rights at all",
            "acls": [
                # Explicit denies do not defer to the pattern file, whose provisioning
                # lines ("%c") would otherwise match a device's own client id too.
                _acl("publishClientSend", f"{prefix}/{PROVISION_SEGMENT}/#", allow=False),
                *_readable(f"{prefix}/{PROVISION_SEGMENT}/#", allow=False),
            ],
        },
        {
            "rolename": ROLE_CLAIM,
            "textname": "shared first-boot credential: provisioning requests only",
            "acls": [
                # Device-shaped topics (kiosk/v1/_claim/status via "%u") are refused here;
                # the provisioning topics have one more level and fall to the patterns.
                _acl("publishClientSend", device_shaped, allow=False),
                _acl("publishClientReceive", device_shaped, allow=False),
            ],
        },
    ]


def static_groups() -> list[dict[str, Any]]:
    """dynsec groups (``createGroup`` payloads, also the ``groups`` of the bootstrap file)."""
    return [
        {
            "groupname": GROUP_DEVICES,
            "textname": "kiosks: their own topics only (pattern file), no provisioning",
            "roles": [{"rolename": ROLE_DEVICE}],
        }
    ]


#: Deny by default for every type, so dynsec defers to the pattern file (see above).
DEFAULT_ACL_ACCESS: Final = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


# --- the same rules as a function (embedded broker, tests) ----------------------------------


def _under(topic: str, prefix: str) -> bool:
    return topic.startswith(f"{prefix}/")


def _device_kind(topic: str, prefix: str) -> tuple[str, TopicKind] | None:
    try:
        parsed = parse_topic(topic, prefix)
    except ContractError:
        return None
    return parsed.device_id, parsed.kind


def _provision(client_id: str | None, leaf: str, prefix: str) -> str | None:
    if not client_id:
        return None
    try:
        return provision_topic(client_id, leaf, prefix)
    except ContractError:
        return None


def _device_allowed(
    access: Access, topic: str, username: str, client_id: str | None, prefix: str
) -> bool:
    # No provisioning topics at all: a kiosk's own token is not a claim credential.
    del client_id
    kinds = DEVICE_PUBLISHES if access is Access.PUBLISH else DEVICE_READS
    try:
        own = {device_topic(username, kind, prefix) for kind in kinds}
    except ContractError:
        return False
    return topic in own


def _bridge_allowed(access: Access, topic: str, prefix: str) -> bool:
    if access is not Access.PUBLISH:
        return _under(topic, prefix)
    # By shape, as the broker matches "{prefix}/+/cmd": the id's grammar is not its job.
    rest = topic.removeprefix(f"{prefix}/").split("/")
    if _under(topic, prefix) and len(rest) == 2 and rest[0]:
        return rest[1] in (TopicKind.CMD.value, TopicKind.CONFIG.value, TopicKind.PRESENCE.value)
    if topic.startswith(f"{prefix}/{BRIDGE_SEGMENT}/"):
        return True
    try:
        return parse_provision_topic(topic, prefix)[1] == "response"
    except ContractError:
        return False


def _ops_allowed(access: Access, topic: str, prefix: str) -> bool:
    if access is Access.PUBLISH:
        rest = topic.removeprefix(f"{prefix}/{BRIDGE_SEGMENT}/sync/")
        return rest != topic and rest != "" and "/" not in rest
    if access is Access.SUBSCRIBE:
        return _under(topic, prefix)
    if not _under(topic, prefix) or topic.startswith(f"{prefix}/{PROVISION_SEGMENT}/"):
        return False
    found = _device_kind(topic, prefix)
    return found is None or found[1] is not TopicKind.CMD


def allowed(
    role: Role,
    access: Access,
    topic: str,
    *,
    username: str,
    client_id: str | None,
    prefix: str = DEFAULT_PREFIX,
) -> bool:
    """Whether a client of ``role`` may do ``access`` on ``topic`` (a topic filter for
    SUBSCRIBE). Device subscriptions must name their own topics literally."""
    if "\x00" in topic:
        return False
    if role is Role.DEVICE:
        return _device_allowed(access, topic, username, client_id, prefix)
    if role is Role.BRIDGE:
        return _bridge_allowed(access, topic, prefix)
    if role is Role.OPS:
        return _ops_allowed(access, topic, prefix)
    if not is_claim_client_id(client_id):
        return False
    if access is Access.PUBLISH:
        return topic == _provision(client_id, "request", prefix)
    return topic == _provision(client_id, "response", prefix)
