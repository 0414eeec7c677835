"""What request handlers share: the bridge, the stores, limits, events, the DB pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from bridge.http.cms_store import CmsStore
from bridge.http.device_store import DeviceStore
from bridge.http.errors import ApiError
from bridge.http.events import CommandPoller, EventHub
from bridge.http.limits import RateLimiter, retry_after_header
from bridge.http.metrics import HttpMetrics
from bridge.http.settings import HttpSettings
from bridge.http.tokens import token_hash

if TYPE_CHECKING:
    from bridge.service.app import Bridge

T = TypeVar("T")

#: Acks come in pairs per command (received, then the outcome): a bigger burst.
_BURST_FACTOR = {"ack": 4}
LIMITED = ("register", "heartbeat", "ack", "refresh")


@dataclass
class HttpContext:
    bridge: Bridge
    settings: HttpSettings
    executor: ThreadPoolExecutor
    clock: Callable[[], int]
    devices: DeviceStore
    cms: CmsStore
    hub: EventHub
    poller: CommandPoller
    metrics: HttpMetrics
    #: Devices whose presence the HTTP face owns; reconciliation must leave them be.
    managed: set[str] = field(default_factory=set)
    limiters: dict[str, RateLimiter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for group in LIMITED:
            self.limiters[group] = RateLimiter(
                self.settings.http_rate_burst * _BURST_FACTOR.get(group, 1),
                self.settings.http_rate_per_s,
            )

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def limit(self, group: str, secret: str) -> None:
        """Take a token from ``secret``'s bucket (kept by hash, never in clear)."""
        wait = self.limiters[group].check(token_hash(secret))
        if wait is not None:
            self.metrics.refused.labels("rate_limited").inc()
            raise ApiError(
                429,
                "rate_limited",
                f"too many {group} requests; retry after the Retry-After delay",
                headers={"Retry-After": retry_after_header(wait)},
            )
