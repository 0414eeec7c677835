"""Kiosk behaviour the reference agent does not have, for the faults that need it."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker_url import parse_broker_url
from bridge.clock import now_ms
from schemas import PresenceLost, PresenceOnline, TopicKind, device_topic, encode


class CleanSessionKiosk:
    """One connection of a kiosk app that uses a clean session (as many 3.1.1 apps do):
    on a client-id takeover the broker publishes this connection's Will."""

    def __init__(self, broker_url: str, device_id: str, session: int) -> None:
        self._address = parse_broker_url(broker_url)
        self.device_id = device_id
        self.session = session
        self._topic = device_topic(device_id, TopicKind.PRESENCE)
        self._connected = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=paho.MQTTv311,
            clean_session=True,
            # A dead connection is replaced by a new instance with a new session.
            reconnect_on_failure=False,
        )
        self._client.will_set(self._topic, encode(PresenceLost(session=session)), 1, retain=True)
        self._client.on_connect = lambda *_args: self._connected.set()

    def come_online(self) -> None:
        """Connect and publish the retained birth (blocking; run it in a thread)."""
        self._client.connect(self._address.host, self._address.port, keepalive=60)
        self._client.loop_start()
        if not self._connected.wait(15):
            raise TimeoutError(f"{self.device_id}: no CONNACK")
        birth = PresenceOnline(session=self.session, ts=now_ms())
        self._client.publish(self._topic, encode(birth), 1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        """Forget this connection (it is dead or taken over); sends nothing."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        # Break paho's callback reference cycle (see tests.support.mqtt.PahoClient.close).
        self._client.on_connect = None
