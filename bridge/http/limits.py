"""Per-key token buckets (rate limits), the failed-authentication limit per client
address, and the request body's size and time limits.

The buckets live in memory, in the process serving the request: with several bridge
instances behind a balancer each enforces its own share, which is enough to stop a
kiosk stuck in a tight loop. The map is bounded (least recently used keys go first).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.http.clients import STATE_KEY, client_address, limit_key
from bridge.http.settings import Network


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

    def _refilled(self, key: str, *, create: bool) -> _Bucket | None:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if not create:
                return None
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._per_s)
            bucket.at = now
        return bucket

    def _wait(self, bucket: _Bucket) -> float:
        return (1.0 - bucket.tokens) / self._per_s

    def check(self, key: str) -> float | None:
        """Take one token for ``key``: ``None`` when allowed, else seconds to wait."""
        bucket = self._refilled(key, create=True)
        assert bucket is not None
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return self._wait(bucket)

    def peek(self, key: str) -> float | None:
        """Like ``check`` without taking a token (and without creating a bucket)."""
        bucket = self._refilled(key, create=False)
        if bucket is None or bucket.tokens >= 1.0:
            return None
        return self._wait(bucket)

    def charge(self, key: str) -> None:
        """Take one token after the fact, into debt if need be (down to minus the
        burst): requests let in together by ``peek`` are all paid for, so concurrency
        does not buy an address more attempts than the sustained rate."""
        bucket = self._refilled(key, create=True)
        assert bucket is not None
        bucket.tokens = max(-self._burst, bucket.tokens - 1.0)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, rounded up: ``Retry-After`` takes no fractions."""
    return str(max(1, math.ceil(wait_s)))


RawResponse = tuple[int, list[tuple[bytes, bytes]], bytes]
TooLargeResponder = Callable[[int], RawResponse]


async def send_raw(send: Send, response: RawResponse) -> None:
    status, headers, body = response
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FailedAuthLimit:
    """A token bucket per client address for failed authentication, on every endpoint.

    Each 401 the app answers is charged to the address it came from (see
    ``bridge.http.clients``). An address whose bucket is empty gets 429 with
    ``Retry-After`` for every request, before its credential is looked at, its body read
    or the database asked: a correct credential does not help while it is blocked.
    The resolved address is left in the scope's state for the app's own limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        proxies: tuple[Network, ...],
        respond: Callable[[float], RawResponse],
        on_limited: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.proxies = proxies
        self.respond = respond
        self.on_limited = on_limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = client_address(scope, self.proxies)
        scope.setdefault("state", {})[STATE_KEY] = address
        key = limit_key(address)
        wait = self.limiter.peek(key)
        if wait is not None:
            self.on_limited()
            await send_raw(send, self.respond(wait))
            return

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.limiter.charge(key)
            await send(message)

        await self.app(scope, receive, watching_send)


class BodyTimeout:
    """The whole request body must arrive within ``timeout_s`` of the headers.

    ``receive`` is wrapped in a deadline; when it passes, the client gets 408 with
    ``Connection: close`` (uvicorn then closes the socket) and the app a disconnect.
    (Slow headers are cut in the protocol: ``bridge.http.protocol``.)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout_s: float,
        respond: Callable[[float], RawResponse],
        on_cut: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.respond = respond
        self.on_cut = on_cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        state = {"complete": False, "cut": False, "started": False}

        async def timed_receive() -> Message:
            if state["cut"]:
                return {"type": "http.disconnect"}
            if state["complete"]:
                return await receive()  # the body is in; only a disconnect is left
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                state["cut"] = True
                self.on_cut()
                if not state["started"]:
                    state["started"] = True
                    await send_raw(send, self.respond(self.timeout_s))
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["complete"] = True
            return message

        async def guarded_send(message: Message) -> None:
            if state["cut"]:
                return  # the 408 went out; what the app answers to the disconnect is moot
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


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
        await send_raw(send, self.respond(self.limit))


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
