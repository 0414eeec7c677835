"""Small synchronous paho clients for tests: a subscriber that collects messages and a
"device" whose connection can be dropped without DISCONNECT (what a crash looks like)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

DEFAULT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class WillSpec:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class PahoClient:
    """A paho client on its own network thread that records what it receives."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
        clean_session: bool = True,
        keepalive: int = 60,
        will: WillSpec | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:12]}"
        self.keepalive = keepalive
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connect_rc: ReasonCode | None = None
        self.session_present: bool | None = None
        kwargs: dict[str, Any] = {}
        if protocol is not MQTTProtocolVersion.MQTTv5:
            kwargs["clean_session"] = clean_session
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            **kwargs,
        )
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # paho callbacks run on its network thread; they only hand data over.
    def _on_connect(
        self, _c: paho.Client, _u: object, flags: Any, rc: ReasonCode, _p: object
    ) -> None:
        self._connect_rc = rc
        self.session_present = bool(flags.session_present)
        self._disconnected.clear()
        self._connected.set()

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _f: object, _rc: ReasonCode, _p: object
    ) -> None:
        self._connected.clear()
        self._disconnected.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    @property
    def paho(self) -> paho.Client:
        return self._client

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> PahoClient:
        self._client.connect(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"{self.client_id}: no CONNACK from {self.host}:{self.port}")
        if self._connect_rc is not None and self._connect_rc.is_failure:
            raise ConnectionError(f"{self.client_id}: CONNACK {self._connect_rc}")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        acked = threading.Event()
        self._client.on_subscribe = lambda *_args: acked.set()
        result, _mid = self._client.subscribe(topic, qos)
        if result != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"subscribe {topic!r} failed: {result}")
        if not acked.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic!r}")

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10
    ) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)

    def expect(self, topic: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Received:
        """The next message (on ``topic`` if given), or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.client_id}: no message on {topic!r} in {timeout}s")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic is None or msg.topic == topic:
                return msg

    def wait_disconnected(self, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
        return self._disconnected.wait(timeout)

    def disconnect(self) -> None:
        """Clean DISCONNECT (no Will)."""
        self._client.disconnect()
        self._client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT: stop the network thread, then close the socket."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            # RDWR shutdown sends FIN at once even if paho still references the socket.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Best-effort teardown for finalizers; the client is unusable afterwards."""
        # disconnect() wakes paho's network thread at once; loop_stop() alone waits out
        # its 1 s select timeout.
        self._client.disconnect()
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        # The bound-method callbacks make a reference cycle with paho's client, whose
        # internal socketpair is closed only in its __del__; in a cycle the GC may
        # finalize those sockets first, raising ResourceWarning (an error under
        # filterwarnings=error) in whichever test happens to be running.
        self._client.on_connect = None
        self._client.on_disconnect = None
        self._client.on_message = None
        self._client.on_subscribe = None

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
