"""A minimal kiosk written from docs/CONTRACT.md, optionally with one deliberate flaw.

    python -m bridge.conformance.specimens.kiosk --host H --port P --device-id ID \\
        --state-dir DIR [--flaw NAME] [--keepalive 2] [--backoff-base 0.25]

Without ``--flaw`` it is a second, independent implementation of the contract (paho,
one thread of its own, no code of the reference agent) and passes the kit. Each flaw
breaks exactly one rule; the kit's tests check that the kit names that clause and no
other. They ship with the package so that a kiosk developer can see what the kit says
about a known-broken kiosk, with the same command line as the tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.clock import now_ms
from schemas import (
    Ack,
    AckState,
    Command,
    ContractError,
    DeviceConfig,
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    decode,
    decode_presence,
    device_topic,
    encode,
)

#: flaw name -> the clause it breaks (the kit's tests read this).
FLAWS: dict[str, tuple[str, ...]] = {
    "none": (),
    "no-will": ("KB-PRES-1", "KB-NET-1", "KB-NET-2"),
    "will-not-retained": ("KB-PRES-1",),
    "heals-clean-stop": ("KB-PRES-5",),
    "no-dedup": ("KB-CMD-2",),
    "wrong-ack-topic": ("KB-CMD-1",),
    "no-backoff": ("KB-NET-3",),
    "reuses-session": ("KB-PRES-3",),
    "ignores-reconnect-delay": ("KB-CMD-3",),
}

Event = tuple[Any, ...]


def _props(**values: Any) -> Any:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


class Kiosk:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.flaw: str = args.flaw
        self.id: str = args.device_id
        self.state = Path(args.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.events: queue.Queue[Event] = queue.Queue()
        self.rng = random.Random()
        self.attempt = 0
        self.session = 0
        self.config_version: int | None = None
        self.status_interval = 30.0
        self.topics = {kind: device_topic(self.id, kind) for kind in TopicKind}

    # -- persisted state -------------------------------------------------------------------

    def _load(self, name: str) -> Any:
        try:
            return json.loads((self.state / name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _save(self, name: str, value: Any) -> None:
        tmp = self.state / f"{name}.tmp"
        tmp.write_text(json.dumps(value))
        tmp.replace(self.state / name)

    def next_session(self) -> int:
        last = self._load("session.json") or 0
        if self.flaw == "reuses-session" and last:
            return int(last)
        session = max(int(last) + 1, now_ms())
        self._save("session.json", session)
        return session

    # -- connecting ------------------------------------------------------------------------

    def backoff(self) -> float:
        if self.flaw == "no-backoff":
            return 0.5
        ceiling = min(30.0, self.args.backoff_base * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def client(self, session: int) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(self.id, self._load("token.json"))
        if self.flaw != "no-will":
            client.will_set(
                self.topics[TopicKind.PRESENCE],
                encode(PresenceLost(session=session)),
                qos=1,
                retain=self.flaw != "will-not-retained",
            )
        put = self.events.put
        client.on_connect = lambda _c, _u, _f, rc, _p: put(("connack", rc.is_failure))
        client.on_disconnect = lambda _c, _u, _f, _rc, _p: put(("gone",))
        client.on_message = lambda _c, _u, msg: put(("msg", msg.topic, msg.payload, msg.properties))
        return client

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda _s, _f: self.events.put(("stop",)))
        while True:
            if self.drain():
                return 0
            self.session = self.next_session()
            client = self.client(self.session)
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 86_400
            try:
                client.connect(
                    self.args.host,
                    self.args.port,
                    self.args.keepalive,
                    clean_start=False,
                    properties=props,
                )
            except OSError:
                if self.wait(self.backoff()):
                    return 0
                continue
            client.loop_start()
            outcome, delay = self.connection(client)
            client.loop_stop()
            if outcome == "stop":
                return 0
            if outcome == "reconnect":
                self.attempt = 0
                wait = 0.0 if self.flaw == "ignores-reconnect-delay" else delay
            else:
                wait = self.backoff()
            if self.wait(wait):
                return 0

    def drain(self) -> bool:
        """Forget what the last connection left in the queue; True if a SIGTERM was in it."""
        stop = False
        while True:
            try:
                stop = stop or self.events.get_nowait()[0] == "stop"
            except queue.Empty:
                return stop

    def wait(self, seconds: float) -> bool:
        """Sleep, but a SIGTERM ends it (True)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self.events.get(timeout=left)[0] == "stop":
                    return True
            except queue.Empty:
                return False
        return False

    # -- one connection --------------------------------------------------------------------

    def connection(self, client: mqtt.Client) -> tuple[str, float]:
        self.client_ = client
        self.seq = 0
        online = False
        next_status = time.monotonic() + 15.0
        while True:
            try:
                event = self.events.get(timeout=max(0.0, next_status - time.monotonic()))
            except queue.Empty:
                if not online:
                    return "lost", 0.0
                self.status()
                next_status = time.monotonic() + self.status_interval
                continue
            kind = event[0]
            if kind == "gone":
                return "lost", 0.0
            if kind == "connack":
                if event[1]:
                    return "lost", 0.0
                topics = (TopicKind.CMD, TopicKind.CONFIG, TopicKind.PRESENCE)
                client.subscribe([(self.topics[k], 1) for k in topics])
                self.birth()
                self.status()
                online = True
                self.attempt = 0
                next_status = time.monotonic() + self.status_interval
            elif kind == "stop":
                self.leave(OfflineReason.SHUTDOWN)
                return "stop", 0.0
            elif kind == "msg" and online:
                result = self.message(event[1], event[2], event[3])
                if result is not None:
                    return result

    def publish(self, topic: str, payload: bytes, retain: bool, props: Any = None) -> None:
        info = self.client_.publish(topic, payload, qos=1, retain=retain, properties=props)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(5.0)

    def birth(self) -> None:
        birth = PresenceOnline(session=self.session, ts=now_ms(), app_version="specimen")
        self.client_.publish(self.topics[TopicKind.PRESENCE], encode(birth), qos=1, retain=True)

    def status(self) -> None:
        status = Status(
            session=self.session, seq=self.seq, ts=now_ms(), config_version=self.config_version
        )
        self.seq += 1
        self.client_.publish(self.topics[TopicKind.STATUS], encode(status), qos=1, retain=True)

    def leave(self, reason: OfflineReason) -> None:
        offline = PresenceOffline(session=self.session, ts=now_ms(), reason=reason)
        self.publish(self.topics[TopicKind.PRESENCE], encode(offline), True)
        if self.flaw == "heals-clean-stop":
            # The literal 1.0 rule: "anything other than my birth" includes my own offline.
            deadline = time.monotonic() + 2.0
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = self.events.get(timeout=left)
                except queue.Empty:
                    break
                if event[0] == "msg" and event[1] == self.topics[TopicKind.PRESENCE]:
                    info = self.client_.publish(
                        self.topics[TopicKind.PRESENCE],
                        encode(PresenceOnline(session=self.session, ts=now_ms())),
                        qos=1,
                        retain=True,
                    )
                    info.wait_for_publish(5.0)
                    break
        self.client_.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection")
        )

    def message(self, topic: str, payload: bytes, props: Any) -> tuple[str, float] | None:
        if topic == self.topics[TopicKind.PRESENCE]:
            try:
                seen = decode_presence(payload) if payload else None
            except ContractError:
                seen = None
            mine = seen is not None and seen.session == self.session
            if not (mine and isinstance(seen, PresenceOnline | PresenceOffline)):
                self.birth()
        elif topic == self.topics[TopicKind.CONFIG]:
            with contextlib.suppress(ContractError, ValueError):
                self.apply(decode(DeviceConfig, payload))
        elif topic == self.topics[TopicKind.CMD]:
            return self.command(payload, props)
        return None

    def apply(self, config: DeviceConfig) -> None:
        if self.config_version is not None and config.version < self.config_version:
            raise ValueError(f"config {config.version} is older than {self.config_version}")
        self.status_interval = float(config.status_interval_s)
        if config.version != self.config_version:
            self.config_version = config.version
            self.status()

    # -- commands --------------------------------------------------------------------------

    def command(self, payload: bytes, props: Any) -> tuple[str, float] | None:
        try:
            command = decode(Command, payload)
        except ContractError:
            return None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        done: dict[str, list[Any]] = self._load("commands.json") or {}
        key = str(command.id)

        def ack(state: AckState, detail: str | None = None) -> None:
            body = encode(Ack(id=command.id, state=state, ts=now_ms(), detail=detail))
            topic = self.topics[TopicKind.ACK]
            if self.flaw == "wrong-ack-topic":
                topic = f"kiosk/v1/{self.id}/reply"
            extra = _props(CorrelationData=correlation) if correlation else None
            self.publish(topic, body, False, extra)
            if state is not AckState.RECEIVED:
                done[key] = [state.value, detail]
                self._save("commands.json", dict(list(done.items())[-1000:]))

        if key in done and self.flaw != "no-dedup":
            state, detail = done[key]
            ack(AckState(state), detail)
            return None
        if command.expires_at < now_ms():
            ack(AckState.REJECTED, "expired")
            return None
        if command.known_type is None:
            ack(AckState.REJECTED, f"unknown command type {command.type!r}")
            return None
        if command.type in ("wipe", "rotate_token") and command.device_id != self.id:
            ack(AckState.REJECTED, f"addressed to {command.device_id!r}")
            return None
        ack(AckState.RECEIVED)
        if command.type == "set_config":
            try:
                self.apply(DeviceConfig.model_validate(command.args))
            except ValueError as exc:
                ack(AckState.FAILED, str(exc)[:1000])
                return None
        elif command.type == "rotate_token":
            self._save("token.json", command.args["token"])
        ack(AckState.SUCCEEDED)
        if command.type == "reconnect":
            self.leave(OfflineReason.NETWORK_CHANGE)
            return "reconnect", float(command.args.get("delay_s", 0))
        if command.type == "wipe":
            self.leave(OfflineReason.SHUTDOWN)
            for name in ("session.json", "commands.json", "token.json"):
                (self.state / name).unlink(missing_ok=True)
            return "stop", 0.0
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--keepalive", type=int, default=10)
    parser.add_argument("--backoff-base", type=float, default=1.0)
    parser.add_argument("--flaw", choices=sorted(FLAWS), default="none")
    return Kiosk(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
