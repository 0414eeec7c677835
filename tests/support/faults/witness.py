"""What the broker delivered, as a third party saw it."""

from __future__ import annotations

import asyncio
from typing import Self

from bridge.broker_url import parse_broker_url
from schemas import ContractError, TopicKind, decode_presence, device_filter, parse_topic
from tests.support.mqtt import PahoClient

#: (device, state, session): one presence message as the contract sees it.
PresenceKey = tuple[str, str, int]


class PresenceWitness:
    """A plain subscriber to every device's presence: the record of what happened.

    Every (device, state, session) it receives must end up in the bridge's history: the
    bridge subscribes to the same filter with QoS 1 and a persistent session, and records
    every presence event it receives, applied or not.
    """

    def __init__(self, broker_url: str) -> None:
        address = parse_broker_url(broker_url)
        self.client = PahoClient(address.host, address.port)
        self._seen: set[PresenceKey] = set()

    async def start(self) -> Self:
        await asyncio.to_thread(self.client.connect)
        await asyncio.to_thread(self.client.subscribe, device_filter(TopicKind.PRESENCE), 1)
        return self

    def collect(self) -> set[PresenceKey]:
        """Everything received so far (drains the client's queue)."""
        while not self.client.messages.empty():
            message = self.client.messages.get_nowait()
            try:
                where = parse_topic(message.topic)
                presence = decode_presence(message.payload)
            except ContractError:
                continue
            self._seen.add((where.device_id, presence.state.value, presence.session))
        return set(self._seen)

    def close(self) -> None:
        self.client.close()
