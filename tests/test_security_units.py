"""The pure parts of the security package: password format, tokens, the provisioning
schema and topics, the ACL model, the bootstrap file, the route and rotation rules."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from bridge.db.security_store import PendingRotation
from bridge.passwords import (
    PasswordHash,
    hash_password,
    is_token,
    new_token,
    token_sha256,
    verify_password,
)
from bridge.security.acl import (
    DEFAULT_ACL_ACCESS,
    ROLE_BRIDGE,
    ROLE_DYNSEC_ADMIN,
    Access,
    Role,
    StaticUsers,
    allowed,
    is_reserved_id,
    static_roles,
)
from bridge.security.bootstrap import BootstrapSecrets, dynsec_config, write_dynsec_config
from bridge.security.dynsec import RESPONSE_TOPIC, DynsecClient, DynsecUnavailable
from bridge.security.metrics import SecurityMetrics
from bridge.security.rotation import RotationFinisher
from bridge.security.runtime import SecurityRoute
from schemas import ContractError, InvalidDeviceId, InvalidPayload, InvalidTopic, encode
from schemas.provisioning import (
    PROVISIONING_MODELS,
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_request,
    decode_provision_response,
    parse_provision_topic,
    provision_request_filter,
)

SECRETS = BootstrapSecrets("b" * 16, "o" * 16, "c" * 16)


# --- passwords ---------------------------------------------------------------------------------


def test_hash_matches_what_mosquitto_ctrl_wrote() -> None:
    # From `mosquitto_ctrl dynsec init` (Mosquitto 2.0.11) with password "secretpw".
    stored = PasswordHash(
        "7iL1mlZnGtpBTp/L7eNgt7ySlHv/v/whn+FCzSbCoAnsSDgLvC6esjTvjuGlVGNOsRih6JpGWxi6vWd5x5INMg==",
        "mOMtZh3cYeK8PRWw",
        101,
    )
    assert verify_password("secretpw", stored)
    assert not verify_password("secretpW", stored)
    assert not verify_password("secretpw", PasswordHash("!!", "mOMtZh3cYeK8PRWw", 101))


def test_hashes_are_salted_and_tokens_are_64_hex() -> None:
    token = new_token()
    assert is_token(token) and len(token) == 64
    first, second = hash_password(token), hash_password(token)
    assert first.salt_b64 != second.salt_b64 and first.hash_b64 != second.hash_b64
    assert verify_password(token, first) and verify_password(token, second)
    assert token_sha256(token) != token and len(token_sha256(token)) == 64
    for bad in (None, "", token.upper(), token[:-1], token + "0", 5):
        assert not is_token(bad)


# --- the provisioning schema -------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(PROVISIONING_MODELS))
def test_examples_validate_and_round_trip(stem: str) -> None:
    model = PROVISIONING_MODELS[stem]
    for example in model.model_json_schema()["examples"]:
        parsed = model.model_validate_json(json.dumps(example))
        assert model.model_validate_json(encode(parsed)) == parsed


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"nonce": "n" * 22}, "device_id"),
        ({"device_id": "a b", "nonce": "n" * 22}, "device_id"),
        ({"device_id": "ok", "nonce": "n" * 21}, "nonce"),
        ({"device_id": "ok", "nonce": "n" * 129}, "nonce"),
        ({"device_id": "ok", "nonce": "n" * 22 + "/"}, "nonce"),
        ({"device_id": "ok", "nonce": "n" * 22, "mac_address": "0" * 18}, "mac_address"),
        ({"device_id": "ok", "nonce": "n" * 22, "app_version": 3}, "app_version"),
    ],
)
def test_bad_requests_name_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        decode_provision_request(json.dumps(payload))
    assert caught.value.field == field


def test_responses_are_told_apart_by_result() -> None:
    accepted = ProvisionAccepted(
        nonce="n" * 22,
        device_id="k1",
        remote_id=3,
        token=new_token(),
        mqtt_username="k1",
        config={"version": 1},  # type: ignore[arg-type]
    )
    assert decode_provision_response(encode(accepted)) == accepted
    refused = ProvisionRefused(reason=RefusalReason.DELETED, detail="gone")
    assert decode_provision_response(encode(refused)) == refused
    with pytest.raises(InvalidPayload) as caught:
        decode_provision_response(b'{"result": "maybe"}')
    assert caught.value.field == "result"
    with pytest.raises(InvalidPayload):
        decode_provision_response(encode(accepted).replace(b'"token":"', b'"token":"X'))


def test_provisioning_topics() -> None:
    assert provision_request_filter() == "kiosk/v1/provision/+/request"
    assert provision_request_filter("site/a") == "site/a/provision/+/request"
    assert parse_provision_topic("kiosk/v1/provision/c-1/request") == ("c-1", "request")
    assert parse_provision_topic("kiosk/v1/provision/c-1/response") == ("c-1", "response")
    for topic in (
        "kiosk/v1/provision/c-1/other",
        "kiosk/v1/provision/a/b/request",
        "kiosk/v1/c-1/request",
        "kiosk/v2/provision/c-1/request",
    ):
        with pytest.raises(InvalidTopic):
            parse_provision_topic(topic)
    for topic in ("kiosk/v1/provision/_x/request", "kiosk/v1/provision//request"):
        with pytest.raises(InvalidDeviceId):
            parse_provision_topic(topic)
    with pytest.raises(ValueError, match="wildcards"):
        provision_request_filter("a/#")


# --- the ACL model ----------------------------------------------------------------------------


def _ok(role: Role, access: Access, topic: str, user: str = "k-1", cid: str | None = "k-1") -> bool:
    return allowed(role, access, topic, username=user, client_id=cid)


def test_device_rules() -> None:
    device = Role.DEVICE
    for kind in ("presence", "status", "ack"):
        assert _ok(device, Access.PUBLISH, f"kiosk/v1/k-1/{kind}")
        assert not _ok(device, Access.PUBLISH, f"kiosk/v1/k-2/{kind}")
    for kind in ("cmd", "config"):
        assert not _ok(device, Access.PUBLISH, f"kiosk/v1/k-1/{kind}")
    for kind in ("presence", "cmd", "config"):
        assert _ok(device, Access.SUBSCRIBE, f"kiosk/v1/k-1/{kind}")
        assert _ok(device, Access.RECEIVE, f"kiosk/v1/k-1/{kind}")
        assert not _ok(device, Access.RECEIVE, f"kiosk/v1/k-2/{kind}")
    for wildcard in ("kiosk/v1/+/cmd", "kiosk/v1/#", "#", "kiosk/v1/k-1/+"):
        assert not _ok(device, Access.SUBSCRIBE, wildcard)
    assert not _ok(device, Access.PUBLISH, "kiosk/v1/k-1/status\x00")
    assert not _ok(device, Access.PUBLISH, "kiosk/v1/bad id/status", user="bad id")


def test_claim_ops_and_bridge_rules() -> None:
    claim, c1, c2 = Role.CLAIM, "claim-00000001", "claim-00000002"
    assert _ok(claim, Access.PUBLISH, f"kiosk/v1/provision/{c1}/request", "_claim", c1)
    assert not _ok(claim, Access.PUBLISH, f"kiosk/v1/provision/{c2}/request", "_claim", c1)
    assert _ok(claim, Access.RECEIVE, f"kiosk/v1/provision/{c1}/response", "_claim", c1)
    assert not _ok(claim, Access.SUBSCRIBE, "kiosk/v1/provision/+/response", "_claim", c1)
    assert not _ok(claim, Access.PUBLISH, "kiosk/v1/provision/a/b/request", "_claim", "a/b")
    # Under any other client id (a device's above all) the claim credential may do nothing.
    for other in ("kiosk-g", "c-1", "claim-short", "claim-", "claim-bad/slash"):
        for access, leaf in ((Access.PUBLISH, "request"), (Access.RECEIVE, "response")):
            assert not _ok(claim, access, f"kiosk/v1/provision/{other}/{leaf}", "_claim", other)
    # A device's own credential gets no provisioning topic at all, not even its own id's.
    device = Role.DEVICE
    assert not _ok(device, Access.PUBLISH, "kiosk/v1/provision/k-1/request")
    assert not _ok(device, Access.RECEIVE, "kiosk/v1/provision/k-1/response")
    ops = Role.OPS
    assert _ok(ops, Access.SUBSCRIBE, "kiosk/v1/#", "_ops", "o")
    assert _ok(ops, Access.RECEIVE, "kiosk/v1/k-1/status", "_ops", "o")
    assert not _ok(ops, Access.RECEIVE, "kiosk/v1/k-1/cmd", "_ops", "o")
    assert not _ok(ops, Access.RECEIVE, "kiosk/v1/provision/c/response", "_ops", "o")
    assert _ok(ops, Access.PUBLISH, "kiosk/v1/_bridge/sync/abc", "_ops", "o")
    assert not _ok(ops, Access.PUBLISH, "kiosk/v1/_bridge/sync/a/b", "_ops", "o")
    bridge = Role.BRIDGE
    for topic in ("kiosk/v1/k-1/cmd", "kiosk/v1/k-1/config", "kiosk/v1/k-1/presence"):
        assert _ok(bridge, Access.PUBLISH, topic, "_bridge", "b")
    for topic in ("kiosk/v1/k-1/status", "kiosk/v1/k-1/ack", "kiosk/v2/k-1/cmd"):
        assert not _ok(bridge, Access.PUBLISH, topic, "_bridge", "b")
    assert _ok(bridge, Access.PUBLISH, "kiosk/v1/provision/c/response", "_bridge", "b")
    assert not _ok(bridge, Access.PUBLISH, "kiosk/v1/provision/c/request", "_bridge", "b")


def test_static_users_and_reserved_ids() -> None:
    users = StaticUsers()
    assert users.role_of("_bridge") is Role.BRIDGE and users.role_of("_ops") is Role.OPS
    assert users.role_of("_claim") is Role.CLAIM and users.role_of("k-1") is Role.DEVICE
    assert users.role_of(None) is Role.DEVICE
    assert is_reserved_id("kiosk-bridge-a") and not is_reserved_id("kiosk-a")
    # A device id never looks like a claim connection's client id.
    assert is_reserved_id("claim-00000001") and not is_reserved_id("claims-1")


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_config(tmp_path: Path) -> None:
    config = dynsec_config(SECRETS)
    clients = {c["username"]: c for c in config["clients"]}
    assert set(clients) == {"_bridge", "_ops", "_claim"}
    assert {r["rolename"] for r in clients["_bridge"]["roles"]} == {ROLE_BRIDGE, ROLE_DYNSEC_ADMIN}
    bridge = clients["_bridge"]
    stored = PasswordHash(bridge["password"], bridge["salt"], bridge["iterations"])
    assert verify_password("b" * 16, stored)
    assert "b" * 16 not in json.dumps(config)
    assert config["defaultACLAccess"] == DEFAULT_ACL_ACCESS
    assert not any(DEFAULT_ACL_ACCESS[k] for k in ("publishClientSend", "publishClientReceive"))
    assert [r["rolename"] for r in config["roles"]] == [r["rolename"] for r in static_roles()]
    path = write_dynsec_config(tmp_path / "d" / "dynsec.json", SECRETS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_dynsec_config(path, SECRETS)
    write_dynsec_config(path, SECRETS, overwrite=True)
    with pytest.raises(ValueError, match="at least 16"):
        BootstrapSecrets("short", "o" * 16, "c" * 16)


# --- dynsec client, route, rotation rules ------------------------------------------------------


async def test_dynsec_timeout_and_failure_of_pending() -> None:
    async def publish(_topic: str, _payload: bytes) -> None:
        return None

    dynsec = DynsecClient(publish, timeout_s=0.05)
    with pytest.raises(DynsecUnavailable, match="no answer"):
        await dynsec.list_clients()
    slow = DynsecClient(publish, timeout_s=5)
    pending = asyncio.create_task(slow.list_clients())
    await asyncio.sleep(0)
    slow.fail_pending("connection lost")
    with pytest.raises(DynsecUnavailable, match="connection lost"):
        await pending


def test_route_filters_matches_and_rejects() -> None:
    submitted: list[tuple[str, bytes]] = []
    rejected: list[str] = []

    async def publish(_topic: str, _payload: bytes) -> None:
        return None

    route = SecurityRoute(
        prefix="kiosk/v1",
        shared_group="g",
        dynsec=DynsecClient(publish),
        submit=lambda cid, payload: submitted.append((cid, payload)),
        reject=rejected.append,
    )
    assert route.filters() == ["$share/g/kiosk/v1/provision/+/request", RESPONSE_TOPIC]
    assert route.matches(RESPONSE_TOPIC) and route.matches("kiosk/v1/provision/x/request")
    assert not route.matches("kiosk/v1/x/status")
    client: Any = None
    route.handle(client, "kiosk/v1/provision/c-1/request", b"r", 0)
    route.handle(client, "kiosk/v1/provision/c-1/response", b"ignored", 0)
    route.handle(client, "kiosk/v1/provision/bad id/request", b"r", 0)
    route.handle(client, "kiosk/v1/provision/a/b/request", b"r", 0)
    route.handle(client, RESPONSE_TOPIC, b"not json", 0)
    assert submitted == [("c-1", b"r")]
    assert rejected == ["bad_device_id", "bad_topic"]
    plain = SecurityRoute(
        prefix="kiosk/v1", shared_group=None, dynsec=None, submit=print, reject=print
    )
    assert plain.filters() == ["kiosk/v1/provision/+/request"]


@pytest.mark.parametrize(
    ("state", "token", "deadline", "action"),
    [
        ("succeeded", "t", 10**15, "rotated"),
        ("delivered", "t", 10**15, None),
        ("queued", "t", 10**15, None),
        ("queued", "t", 0, "rotate_forced"),
        ("expired", "t", 10**15, "rotate_forced"),
        ("rejected", "t", 10**15, "rotate_aborted"),
        ("failed", "t", 0, "rotate_aborted"),
        (None, "t", 10**15, "rotate_aborted"),
        ("succeeded", None, 10**15, "rotate_aborted"),
    ],
)
def test_rotation_decisions(
    state: str | None, token: str | None, deadline: int, action: str | None
) -> None:
    finisher = RotationFinisher(None, None, SecurityMetrics(), clock=lambda: 1000)  # type: ignore[arg-type]
    rotation = PendingRotation("d", "d", "c", deadline, state, token, None)
    assert finisher._decide(rotation) == action


def test_contract_errors_are_value_errors() -> None:
    with pytest.raises(ContractError):
        decode_provision_request(b"")
    assert isinstance(ProvisionRequest(device_id="a", nonce="n" * 22), ProvisionRequest)
