"""Credential management inside the running bridge, plugged into its command link.

    security = SecurityRuntime(engine, settings.security, client=..., metrics=..., ...)
    link = MqttLink(..., routes=security.routes())  # the link carries its traffic
    async with security:                              # provisioning and rotations run
        ...

:class:`bridge.service.app.Bridge` composes it so. Its :class:`SecurityRoute` is a
:class:`bridge.service.mqtt_link.Route` for provisioning requests and the
dynamic-security plugin's answers: the link's own connection carries them (no second
connection). Work that waits on I/O runs in its own tasks, never on the receive path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiomqtt

from bridge.clock import now_ms
from bridge.db.security_models import create_security_schema
from bridge.db.security_store import SecurityStore
from bridge.security.backend import CredentialBackend, DatabaseBackend, DynsecBackend
from bridge.security.dynsec import RESPONSE_TOPIC, DynsecClient, DynsecUnavailable
from bridge.security.metrics import SecurityMetrics
from bridge.security.operations import SecurityAdmin
from bridge.security.provisioning import ProvisioningService
from bridge.security.rotation import RotationFinisher
from bridge.security.settings import SecuritySettings
from schemas import DEFAULT_PREFIX, ContractError
from schemas.constants import PROVISION_SEGMENT
from schemas.provisioning import parse_provision_topic, provision_request_filter
from schemas.topics import shared

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bridge.service.mqtt_link import Route

log = logging.getLogger(__name__)

#: Provisioning requests waiting for the worker; beyond this they are dropped (and
#: counted): a claimant retries, a flood must not grow memory.
QUEUE_MAX = 10_000
_HOUSEKEEPING_S = 3600.0
_NONCE_KEEP_MS = 7 * 24 * 3600 * 1000


async def _cancel(task: asyncio.Task[None], tries: int = 20) -> None:
    """Cancel ``task`` and wait for it to end. Python 3.11's ``asyncio.wait_for`` (under
    aiomqtt's ``publish``) can swallow a cancellation that coincides with the awaited
    result, leaving the task running on; cancelling again ends it at its next await."""
    for _ in range(tries):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
            return
    log.error("task %s did not stop", task.get_name())


class SecurityRoute:
    """Provisioning requests and dynsec answers, off the bridge's connection."""

    def __init__(
        self,
        *,
        prefix: str,
        shared_group: str | None,
        dynsec: DynsecClient | None,
        submit: Callable[[str, bytes], None],
        reject: Callable[[str], None],
        provisioning: bool = True,
    ) -> None:
        self._prefix = prefix
        self._group = shared_group
        self._dynsec = dynsec
        self._submit = submit
        self._reject = reject
        self._provisioning = provisioning
        self._head = f"{prefix}/{PROVISION_SEGMENT}/"

    def filters(self) -> list[str]:
        found = []
        if self._provisioning:
            found.append(shared(provision_request_filter(self._prefix), self._group))
        if self._dynsec is not None:
            # Never shared: every instance needs the answers to its own commands.
            found.append(RESPONSE_TOPIC)
        return found

    def matches(self, topic: str) -> bool:
        return topic == RESPONSE_TOPIC or topic.startswith(self._head)

    def handle(self, client: aiomqtt.Client, topic: str, payload: bytes, received_ms: int) -> None:
        del client, received_ms
        if topic == RESPONSE_TOPIC:
            if self._dynsec is not None:
                self._dynsec.feed(payload)
            return
        try:
            client_id, leaf = parse_provision_topic(topic, self._prefix)
        except ContractError as exc:
            self._reject(exc.reason)
            log.warning("rejected provisioning message: %s", exc)
            return
        if leaf == "request" and self._provisioning:
            self._submit(client_id, payload)


class SecurityRuntime:
    def __init__(
        self,
        engine: Engine,
        settings: SecuritySettings,
        *,
        client: Callable[[], aiomqtt.Client | None],
        metrics: SecurityMetrics,
        reject: Callable[[str], None] | None = None,
        prefix: str = DEFAULT_PREFIX,
        shared_group: str | None = None,
        read_engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._prefix = prefix
        self._client = client
        self._engine = engine
        self.store = SecurityStore(
            engine, clock=now_ms, token_storage=settings.token_storage, read_engine=read_engine
        )
        self.dynsec: DynsecClient | None = None
        backend: CredentialBackend
        if settings.credential_backend == "dynsec":
            self.dynsec = DynsecClient(self._publish)
            backend = DynsecBackend(self.dynsec, prefix=prefix)
        else:
            backend = DatabaseBackend()
        self.backend = backend
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_MAX)
        self.provisioning = ProvisioningService(
            self.store,
            backend,
            self._publish,
            metrics,
            prefix=prefix,
            previous_proof_s=settings.previous_token_proof_s,
            proof_retry_s=settings.proof_required_retry_s,
            clock_ms=now_ms,
        )
        self.rotations = RotationFinisher(self.store, backend, metrics, clock=now_ms)
        self._reject = reject or (lambda _reason: None)
        self.route = SecurityRoute(
            prefix=prefix,
            shared_group=shared_group,
            dynsec=self.dynsec,
            submit=self._submit,
            reject=self._reject,
            provisioning=settings.provisioning,
        )
        self._tasks: list[asyncio.Task[None]] = []

    def admin(self) -> SecurityAdmin:
        """Operator actions through the bridge's own connection (e.g. for the HTTP API).
        The session to announce offline comes from the database, not a retained read."""

        async def publish(topic: str, payload: bytes, retain: bool) -> None:
            client = self._client()
            if client is None:
                raise DynsecUnavailable("publish", "the bridge is not connected to the broker")
            await client.publish(topic, payload, qos=1, retain=retain)

        async def no_retained(_topic: str) -> bytes | None:
            return None

        return SecurityAdmin(self.store, self.backend, publish, no_retained, self._prefix)

    def routes(self) -> list[Route]:
        return [self.route]

    # -- plumbing ------------------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self._client()
        if client is None:
            raise DynsecUnavailable("publish", "the bridge is not connected to the broker")
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            raise DynsecUnavailable("publish", str(exc)) from exc

    def _submit(self, client_id: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((client_id, payload))
        except asyncio.QueueFull:
            self.metrics.provision.labels("dropped", "queue_full").inc()
            log.error("provisioning queue full (%d); dropped request of %s", QUEUE_MAX, client_id)

    async def _work(self) -> None:
        # One request at a time: two claims for one device never interleave their
        # credential writes, and ~100 answers a second is plenty for a fleet rollout.
        while True:
            client_id, payload = await self._queue.get()
            try:
                await self.provisioning.handle(client_id, payload)
            except Exception:
                log.exception("provisioning request of %s failed", client_id)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(_HOUSEKEEPING_S)
            try:
                await asyncio.to_thread(self.store.prune_nonces, now_ms() - _NONCE_KEEP_MS)
            except Exception:
                log.exception("security housekeeping failed; retrying")

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(create_security_schema, self._engine)
        self._tasks = [
            asyncio.create_task(self._work(), name="kb-provisioning"),
            asyncio.create_task(
                self.rotations.run(self.settings.rotation_poll_s), name="kb-rotations"
            ),
            asyncio.create_task(self._housekeeping(), name="kb-security-housekeeping"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            await _cancel(task)
        self._tasks = []
        if self.dynsec is not None:
            self.dynsec.fail_pending("bridge stopping")
