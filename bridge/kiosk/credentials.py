"""The kiosk's own credential: claimed once with the shared claim credential, stored next
to the agent's state, replaced by ``rotate_token``.

    tokens = TokenFile(state_dir)
    if tokens.load() is None:
        answer = claim_until_accepted(url, "_claim", claim_password, "kiosk-0042", stop=quit)
        tokens.save(answer.token)
    agent = KioskAgent("kiosk-0042", url, state_dir=state_dir)   # uses the stored token

The agent itself handles ``rotate_token`` (:meth:`bridge.kiosk.core.KioskCore.adopt_token`)
and, at start, prefers the stored token to a password it is given: a rotation makes the
password it was first given stale, and the file is what a restarted app still has.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.backoff import Backoff
from bridge.broker_url import parse_broker_url
from schemas import DEFAULT_PREFIX, ContractError, encode
from schemas.constants import TOKEN_PATTERN
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_response,
)
from schemas.topics import provision_topic

logger = logging.getLogger(__name__)

TOKEN_FILE: Final = "credential.json"
_TOKEN_RE: Final = re.compile(TOKEN_PATTERN)
#: Refusals that another request may turn into an acceptance; the others need an operator.
#: ``proof_required`` is retried too (slowly, as the bridge asks): an operator's ``device
#: allow-claim`` lets the next try in, with no change to the kiosk.
RETRYABLE: Final = frozenset(
    {
        RefusalReason.ONLINE,
        RefusalReason.UNAVAILABLE,
        RefusalReason.NONCE_REUSED,
        RefusalReason.PROOF_REQUIRED,
    }
)


def is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


class ClaimError(RuntimeError):
    """No answer came in time, or the broker could not be reached: worth retrying."""


class ClaimCredentialRefused(ClaimError):
    """The broker refused the claim credential itself: retrying will not help."""


class ClaimRefused(RuntimeError):
    """The bridge refused the request for a reason only an operator can lift."""

    def __init__(self, answer: ProvisionRefused) -> None:
        super().__init__(f"provisioning refused ({answer.reason.value}): {answer.detail}")
        self.answer = answer


class TokenFile:
    """The device's token, next to the agent's state; written atomically, mode 0600."""

    def __init__(self, directory: Path | str, *, fsync: bool = True) -> None:
        self.path = Path(directory) / TOKEN_FILE
        self._fsync = fsync

    def load(self) -> str | None:
        try:
            token = json.loads(self.path.read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            return None
        return token if is_token(token) else None

    def save(self, token: str) -> None:
        if not is_token(token):
            raise ValueError("a token is 64 lowercase hex characters")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{TOKEN_FILE}.tmp")
        # Created 0600 rather than chmod-ed after: the token is never readable by others.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"token": token}))
            if self._fsync:
                handle.flush()
                os.fsync(handle.fileno())
        temp.replace(self.path)


def claim_credentials(
    broker_url: str,
    claim_username: str,
    claim_password: str,
    device_id: str,
    *,
    client_id: str | None = None,
    nonce: str | None = None,
    app_version: str | None = None,
    android_version: str | None = None,
    ip_address: str | None = None,
    mac_address: str | None = None,
    proof_token: str | None = None,
    ca_file: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 15.0,
) -> ProvisionAccepted | ProvisionRefused:
    """Blocking: ask the bridge for a credential with the shared claim credential.

    The claim connection uses a client id of its own, ``claim-<random>`` (the only shape
    the broker and the bridge accept for it; never the device id, whose session it would
    take over). ``proof_token`` is the token the device holds, if any: a device that has
    a credential is claimed again only with it (or in an operator's claim window).
    """
    request = ProvisionRequest(
        device_id=device_id,
        nonce=nonce or secrets.token_urlsafe(24),
        app_version=app_version,
        android_version=android_version,
        ip_address=ip_address,
        mac_address=mac_address,
        proof_token=proof_token if is_token(proof_token) else None,
    )
    return send_claim(
        broker_url,
        claim_username,
        claim_password,
        encode(request),
        client_id=client_id or f"claim-{secrets.token_hex(8)}",
        expect_nonce=request.nonce,
        ca_file=ca_file,
        prefix=prefix,
        timeout_s=timeout_s,
    )


def send_claim(
    broker_url: str,
    claim_username: str,
    claim_password: str,
    payload: bytes,
    *,
    client_id: str,
    expect_nonce: str | None = None,
    ca_file: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 15.0,
) -> ProvisionAccepted | ProvisionRefused:
    """Publish ``payload`` as a request and return the first answer (with
    ``expect_nonce`` when given, or without one). Also the tests' way to send junk.

    Claims over MQTT 3.1.1, which every broker of the contract speaks (amqtt only that).
    """
    address = parse_broker_url(broker_url)
    answers: queue.Queue[bytes] = queue.Queue()
    connected = threading.Event()
    subscribed = threading.Event()
    outcome: dict[str, Any] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.username_pw_set(claim_username, claim_password)
    if address.tls:
        client.tls_set(ca_certs=ca_file)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        outcome["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_args: subscribed.set()
    client.on_message = lambda _c, _u, msg: answers.put(bytes(msg.payload))
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise ClaimError(f"cannot reach {address.url}: {exc}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise ClaimError(f"no CONNACK from {address.url} within {timeout_s:g}s")
        if outcome["rc"].is_failure:
            raise ClaimCredentialRefused(f"claim credential refused: {outcome['rc']}")
        client.subscribe(provision_topic(client_id, "response", prefix), qos=1)
        if not subscribed.wait(timeout_s):
            raise ClaimError("no SUBACK for the provisioning response topic")
        client.publish(provision_topic(client_id, "request", prefix), payload, qos=1)
        while True:
            try:
                raw = answers.get(timeout=timeout_s)
            except queue.Empty:
                raise ClaimError(f"no provisioning answer within {timeout_s:g}s") from None
            try:
                answer = decode_provision_response(raw)
            except ContractError:
                continue
            if expect_nonce is None or answer.nonce in (expect_nonce, None):
                return answer
    finally:
        client.disconnect()
        client.loop_stop()
        client.on_connect = None
        client.on_message = None
        client.on_subscribe = None


def claim_until_accepted(
    broker_url: str,
    claim_username: str,
    claim_password: str,
    device_id: str,
    *,
    stop: threading.Event | None = None,
    backoff: Backoff | None = None,
    timeout_s: float = 10.0,
    **request: Any,
) -> ProvisionAccepted:
    """Blocking: claim until the bridge accepts, as an app at first boot does.

    A broker or bridge that is not there yet, and the refusals another try can turn
    into an acceptance (``online``, ``unavailable``, ``nonce_reused``), are retried with
    backoff (or after the ``retry_after_s`` the bridge asks for). Raises
    :class:`ClaimRefused` for the others (deleted, revoked, ...),
    :class:`ClaimCredentialRefused` for a wrong claim password and :class:`ClaimError`
    when ``stop`` is set.
    """
    stop = stop or threading.Event()
    backoff = backoff or Backoff(base=1.0, cap=30.0, rng=random.Random())
    while not stop.is_set():
        try:
            answer = claim_credentials(
                broker_url,
                claim_username,
                claim_password,
                device_id,
                timeout_s=timeout_s,
                **request,
            )
        except ClaimCredentialRefused:
            raise
        except ClaimError as exc:
            delay = backoff.next_delay()
            logger.info("%s: claim failed (%s); retrying in %.1fs", device_id, exc, delay)
        else:
            if isinstance(answer, ProvisionAccepted):
                return answer
            if answer.reason not in RETRYABLE:
                raise ClaimRefused(answer)
            delay = float(answer.retry_after_s or backoff.next_delay())
            # proof_required waits for an operator: say what they must do, loudly.
            say = logger.warning if answer.reason is RefusalReason.PROOF_REQUIRED else logger.info
            say(
                "%s: claim refused for now (%s: %s); retrying in %.1fs",
                device_id,
                answer.reason.value,
                answer.detail,
                delay,
            )
        stop.wait(delay)
    raise ClaimError("stopped before the claim was accepted")
