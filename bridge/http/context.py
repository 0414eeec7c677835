"""What request handlers share: the bridge's ports, the stores, limits, events, the DB pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from bridge.db.cms_store import CmsStore
from bridge.db.device_store import DeviceStore
from bridge.http.clients import limit_key
from bridge.http.errors import ApiError
from bridge.http.events import CommandPoller, EventHub
from bridge.http.limits import RateLimiter, retry_after_header
from bridge.http.metrics import HttpMetrics
from bridge.http.settings import HttpSettings
from bridge.http.tokens import token_hash

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bridge.service.ports import AckSink, OutboxPoke, PresenceSink, StatesLiveness
    from bridge.settings import Settings

T = TypeVar("T")

#: Acks come in pairs per command (received, then the outcome): a bigger burst.
_BURST_FACTOR = {"ack": 4}
LIMITED = ("register", "heartbeat", "ack", "refresh")
AUTH_FAILURES = "auth_failures"
REGISTER_ADDRESS = "register_address"
REGISTER_GLOBAL = "register_global"


@dataclass
class HttpContext:
    #: The whole tree: the broker's address and prefix are handed to registering kiosks.
    bridge_settings: Settings
    engine: Engine
    #: Reads that never take SQLite's write lock (pages, lists).
    read_engine: Engine
    #: Presence and telemetry of HTTP kiosks join the MQTT ones here.
    sink: PresenceSink
    outbox: OutboxPoke
    acks: AckSink
    #: Whether the states served are live (a writer's heartbeat, the broker link).
    liveness: Callable[[], StatesLiveness]
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
        settings = self.settings
        for group in LIMITED:
            self.limiters[group] = RateLimiter(
                settings.rate_burst * _BURST_FACTOR.get(group, 1), settings.rate_per_s
            )
        #: Per client address: failed authentication (``limits.FailedAuthLimit``) ...
        self.limiters[AUTH_FAILURES] = RateLimiter(
            settings.auth_fail_burst, settings.auth_fail_per_s
        )
        #: ... and registrations; plus one bucket for all registrations together.
        self.limiters[REGISTER_ADDRESS] = RateLimiter(
            settings.register_address_burst, settings.register_address_per_s
        )
        self.limiters[REGISTER_GLOBAL] = RateLimiter(
            settings.register_global_burst, settings.register_global_per_s, max_keys=1
        )

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def limit(self, group: str, secret: str) -> None:
        """Take a token from ``secret``'s bucket (kept by hash, never in clear)."""
        wait = self.limiters[group].check(token_hash(secret))
        if wait is not None:
            self._refuse("rate_limited", f"too many {group} requests", wait)

    def limit_registration(self, address: str) -> None:
        """The per-address, then the global registration bucket."""
        wait = self.limiters[REGISTER_ADDRESS].check(limit_key(address))
        if wait is not None:
            self._refuse("register_rate_limited", "too many registrations from this address", wait)
        wait = self.limiters[REGISTER_GLOBAL].check("*")
        if wait is not None:
            self._refuse("register_global_limit", "too many registrations right now", wait)

    def _refuse(self, code: str, what: str, wait: float) -> None:
        self.metrics.refused.labels(code).inc()
        raise ApiError(
            429,
            code,
            f"{what}; retry after the Retry-After delay",
            headers={"Retry-After": retry_after_header(wait)},
        )
