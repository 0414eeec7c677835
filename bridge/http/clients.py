"""The client address a request is limited by: the TCP peer, or, when the peer is a
trusted reverse proxy, the nearest untrusted hop of ``X-Forwarded-For``.

uvicorn's own proxy-header handling is switched off (``HttpFace``): it trusts loopback
by default, which would let any local client pick its address by sending the header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import Scope

from bridge.http.settings import Network

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Where the resolved address is kept for the app (``request.state.client_address``).
STATE_KEY = "client_address"
#: No peer (a Unix socket, a test transport): one shared bucket.
UNKNOWN = "unknown"


def _parse(value: str) -> IpAddress | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "192.0.2.1:443"
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IpAddress, proxies: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def client_address(scope: Scope, proxies: Sequence[Network]) -> str:
    """The address to limit the request by (see the module docstring)."""
    client = scope.get("client")
    peer = _parse(str(client[0])) if client else None
    if peer is None:
        return str(client[0]) if client else UNKNOWN
    if not proxies or not _trusted(peer, proxies):
        return str(peer)
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            hops.extend(value.decode("latin-1").split(","))
    address = peer
    # Right to left: each trusted proxy vouches for the hop before it; the first hop
    # that is not a trusted proxy is the client. A malformed hop ends the walk there.
    for hop in reversed(hops):
        parsed = _parse(hop)
        if parsed is None:
            break
        address = parsed
        if not _trusted(address, proxies):
            break
    return str(address)


def scope_client(scope: Scope) -> str:
    """The address the middleware resolved for this request."""
    state = scope.get("state") or {}
    return str(state.get(STATE_KEY, UNKNOWN))


def limit_key(address: str) -> str:
    """The bucket an address is counted in: itself for IPv4, its /64 for IPv6 (one
    subscriber gets a whole /64, so single IPv6 addresses cost an attacker nothing)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return address
