"""The kiosk's side of credentials: claim a token at first boot, store it, rotate it.

    answer = claim_credentials(url, "_claim", claim_password, "kiosk-0042")
    if isinstance(answer, ProvisionAccepted):
        TokenFile(state_dir).save(answer.token)
        agent = KioskAgent("kiosk-0042", url, password=answer.token, state_dir=state_dir)
        install_rotation(agent, TokenFile(state_dir))

The reference agent (``bridge.kiosk``) does not know about any of this yet; these
helpers plug in from outside (``KioskAgent.on_command``) until it does.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.broker_url import parse_broker_url
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.commands import CommandHandler
from bridge.security.operations import ROTATE_TOKEN
from bridge.security.passwords import is_token
from schemas import DEFAULT_PREFIX, Command, ContractError, encode
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    decode_provision_response,
)
from schemas.topics import provision_topic

TOKEN_FILE = "credential.json"


class ClaimError(RuntimeError):
    """The claim credential was refused, or no answer came in time."""


class TokenFile:
    """The device's token, next to the agent's state; written atomically, mode 0600."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / TOKEN_FILE

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
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"token": token}))
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(self.path)


def set_agent_password(agent: KioskAgent, token: str) -> None:
    """Use ``token`` from the agent's next connection on.

    The agent has no public setter yet: this sets the attribute its connect reads
    (``KioskCore._password``). The lead's agent should grow ``set_password``.
    """
    agent.core._password = token


def rotate_token_handler(agent: KioskAgent, tokens: TokenFile) -> CommandHandler:
    """The ``rotate_token`` command: store the new token, then use it from the next
    connection on. Acking ``succeeded`` tells the bridge the token is safe on the
    device; only then does the broker switch (and disconnect us to reconnect with it)."""

    def handle(command: Command) -> None:
        token = command.args.get("token")
        if not is_token(token):
            raise ValueError("rotate_token needs args.token: 64 lowercase hex characters")
        assert isinstance(token, str)
        tokens.save(token)
        set_agent_password(agent, token)

    return handle


def install_rotation(agent: KioskAgent, tokens: TokenFile) -> None:
    agent.on_command(ROTATE_TOKEN, rotate_token_handler(agent, tokens))


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
    ca_file: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 15.0,
) -> ProvisionAccepted | ProvisionRefused:
    """Blocking: ask the bridge for a credential with the shared claim credential.

    The claim connection uses its own client id (never the device id: taking over the
    device's persistent session would discard its queued commands).
    """
    request = ProvisionRequest(
        device_id=device_id,
        nonce=nonce or secrets.token_urlsafe(24),
        app_version=app_version,
        android_version=android_version,
        ip_address=ip_address,
        mac_address=mac_address,
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
    ``expect_nonce`` when given, or without one). Also the tests' way to send junk."""
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
    client.connect(address.host, address.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise ClaimError(f"no CONNACK from {address.url} within {timeout_s:g}s")
        if outcome["rc"].is_failure:
            raise ClaimError(f"claim credential refused: {outcome['rc']}")
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
