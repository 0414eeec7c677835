"""``HOST:PORT`` as the CLI and settings take it, for every listener (embedded broker,
HTTP face): one parser, so ``[::1]:1883`` means the same wherever it is given."""

from __future__ import annotations


def parse_host_port(value: str, *, option: str, example: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:1883`` for IPv6) as ``(host, port)``, the host without its
    brackets (what ``bind`` and ``connect`` take); raises ``ValueError`` naming ``option``.
    """
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{option} {value!r} must be HOST:PORT, e.g. {example}")
    return host, int(port)


def host_port(host: str, port: int) -> str:
    """The inverse, for URLs and log lines: an IPv6 host goes back into brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["host_port", "parse_host_port"]
