"""Broker addresses as the CLI and settings take them: ``mqtt[s]://[user:pass@]host[:port]``,
or a comma-separated list of them (the nodes of a cluster, tried in order).

A list parses into the first node's :class:`BrokerAddress` with the others in
:attr:`BrokerAddress.others`, so every part that takes one address takes a list too;
the code that connects walks :attr:`BrokerAddress.nodes` (see :class:`NodeCursor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    #: The further nodes of a broker list, in the order given (empty for one URL).
    others: tuple[BrokerAddress, ...] = field(default=(), compare=False)

    @property
    def url(self) -> str:
        """The address without credentials, safe to log."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def nodes(self) -> tuple[BrokerAddress, ...]:
        """Every node, this one first, each without ``others``."""
        return (replace(self, others=()), *self.others)

    @property
    def urls(self) -> str:
        """All nodes, comma-separated, without credentials: safe to log."""
        return ",".join(node.url for node in self.nodes)


class NodeCursor:
    """Which node of a broker list to try next: in order, one step on at every failed
    attempt or lost connection, wrapping around. ``round_done`` tells the caller when
    every node has failed once since the last success (time for a backoff delay)."""

    def __init__(self, address: BrokerAddress) -> None:
        self.nodes = address.nodes
        self.index = 0
        self._failed_in_round = 0

    @property
    def current(self) -> BrokerAddress:
        return self.nodes[self.index]

    def failed(self) -> bool:
        """The current node failed: move on; True when the whole list has failed since
        the last :meth:`succeeded` (back off before the next round)."""
        self.index = (self.index + 1) % len(self.nodes)
        self._failed_in_round += 1
        if self._failed_in_round >= len(self.nodes):
            self._failed_in_round = 0
            return True
        return False

    def succeeded(self) -> None:
        self._failed_in_round = 0


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://`` or ``mqtts://``; raises ``ValueError`` with a readable message.

    A comma-separated list is parsed by :func:`parse_broker_list` (a comma is never part
    of a host, and one in a password is written ``%2C``)."""
    if "," in url:
        return parse_broker_list(url)
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(
            f"broker URL {url!r} must start with mqtt:// or mqtts:// (e.g. mqtt://127.0.0.1:1883)"
        )
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port") from exc
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def parse_broker_list(value: str) -> BrokerAddress:
    """One URL or a comma-separated list of them (``mqtt://n1:1883,mqtt://n2:1883``): the
    first node with the rest in ``others``. Credentials given on the first URL only apply
    to every node (a cluster has one user database); raises ``ValueError``."""
    parts = [part.strip() for part in value.split(",")]
    if not parts or any(not part for part in parts):
        raise ValueError(f"broker list {value!r} has an empty entry")
    nodes = [parse_broker_url(part) for part in parts]
    first = nodes[0]
    others = tuple(
        replace(
            node,
            username=node.username if node.username is not None else first.username,
            password=node.password if node.password is not None else first.password,
        )
        for node in nodes[1:]
    )
    seen = {(node.host, node.port) for node in others}
    if len(seen) != len(others) or (first.host, first.port) in seen:
        raise ValueError(f"broker list {value!r} names a node twice")
    return replace(first, others=others)
