"""Per-key token buckets (rate limits) and the request body size limit.

The buckets live in memory, in the process serving the request: with several bridge
instances behind a balancer each enforces its own share, which is enough to stop a
kiosk stuck in a tight loop. The map is bounded (least recently used keys go first).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(
        self,
        burst: int,
        per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self._burst = float(burst)
        self._per_s = per_s
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, key: str) -> float | None:
        """Take one token for ``key``: ``None`` when allowed, else seconds to wait."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._per_s)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self._per_s

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, rounded up: ``Retry-After`` takes no fractions."""
    return str(max(1, math.ceil(wait_s)))


TooLargeResponder = Callable[[int], tuple[int, list[tuple[bytes, bytes]], bytes]]


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the app parses them.

    The rest of the body is read and dropped first (up to ``drain`` bytes): a server that
    answers and closes while the client is still sending makes the client's socket see a
    reset instead of the 413. A declared ``Content-Length`` over ``drain`` is refused at
    once; the app never sees an oversized body.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, respond: TooLargeResponder, drain: int = 1 << 20
    ) -> None:
        self.app = app
        self.limit = limit
        self.respond = respond
        self.drain = max(drain, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            if declared <= self.drain:
                await _discard(receive, self.drain)
            await self._refuse(send)
            return
        state = {"seen": 0, "refused": False}

        async def limited_receive() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["refused"] = True
                    if message.get("more_body", False):
                        await _discard(receive, self.drain - state["seen"])
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            # Once the 413 went out, whatever the app answers to the "disconnect" is moot.
            if not state["refused"]:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        status, headers, body = self.respond(self.limit)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _discard(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
