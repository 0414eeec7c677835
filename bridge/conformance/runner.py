"""The kit's run: start the broker, proxies and kiosks, act, record (no verdicts here).

Two kiosk instances run at once, each behind its own proxy, so that the slow checks
overlap: the *main* one (``--device-id``) takes the commands, the healing, the clean
stop, a restart and ``kill -9``; the *second* one (``<id>-b``) takes the refused
reconnect attempts (backoff) and the silent network.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bridge.clock import now_ms
from bridge.conformance.broker import BrokerInfo, BrokerKind, BrokerUnavailable, KitBroker
from bridge.conformance.client import KitClient
from bridge.conformance.network import KioskNetwork, Refuser
from bridge.conformance.observations import LinkRecord, Observations, SentCommand
from bridge.conformance.process import KioskCommandError, KioskProcess, render_command
from bridge.conformance.verdicts import (
    FINAL_STATES,
    acks,
    births,
    link_session,
)
from schemas import (
    Command,
    DeviceConfig,
    PresenceLost,
    Status,
    TopicKind,
    decode,
    device_topic,
    encode,
)
from schemas.errors import ContractError

POLL_S = 0.02
ACK_WAIT_S = 5.0
#: How long the kit waits for the kiosk's command subscription before its first command.
SUBSCRIBE_WAIT_S = 5.0
BACKOFF_ATTEMPTS = 5
BACKOFF_WINDOW_S = 20.0
BACKOFF_RETURN_S = 45.0
STOP_WAIT_S = 10.0
#: After a clean stop, how long a Will would take to show (Mosquitto sends it at once).
NO_WILL_WAIT_S = 1.0


class KitError(Exception):
    """The run cannot go on: ``code`` 2 for the kiosk command, 3 for the broker."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class KitOptions:
    kiosk_cmd: str
    work_dir: Path
    device_id: str
    broker_url: str | None = None
    broker_kind: BrokerKind = BrokerKind.AUTO
    keepalive_range: tuple[int, int] = (10, 30)
    connect_timeout_s: float = 30.0
    reconnect_delay_s: int = 2


@dataclass
class KitRun:
    observations: Observations
    broker: str = ""
    duration_s: float = 0.0
    logs: dict[str, Path] = field(default_factory=dict)


async def wait_until(predicate: Callable[[], object], within_s: float) -> bool:
    """Poll ``predicate`` until it is true or ``within_s`` seconds pass."""
    deadline = time.monotonic() + within_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)


class _Kit:
    def __init__(self, options: KitOptions, broker: BrokerInfo, obs: Observations) -> None:
        self.options = options
        self.broker = broker
        self.obs = obs
        self.networks: dict[str, KioskNetwork] = {}
        self.processes: list[KioskProcess] = []
        self.client: KitClient | None = None
        self.logs: dict[str, Path] = {}
        self._starts = 0

    # -- plumbing ----------------------------------------------------------------------------

    def topic(self, device_id: str, kind: TopicKind) -> str:
        return device_topic(device_id, kind)

    @property
    def kit(self) -> KitClient:
        assert self.client is not None
        return self.client

    async def start_kiosk(self, device_id: str) -> KioskProcess:
        net = self.networks[device_id]
        state_dir = self.options.work_dir / "state" / device_id
        state_dir.mkdir(parents=True, exist_ok=True)
        values = {
            "host": net.host,
            "port": str(net.port),
            "device_id": device_id,
            "state_dir": str(state_dir),
            "username": device_id,
            "password": "",
        }
        argv = render_command(self.options.kiosk_cmd, values)
        self._starts += 1
        log = self.options.work_dir / f"kiosk-{device_id}-{self._starts}.log"
        self.logs[f"{device_id}#{self._starts}"] = log
        proc = KioskProcess(argv, log)
        await proc.start()
        self.processes.append(proc)
        return proc

    def online_link(self, device_id: str, since: float) -> LinkRecord | None:
        """An open, accepted connection opened after ``since`` whose birth was published."""
        for link in reversed(self.networks[device_id].recorder.snapshot()):
            fresh = link.opened_t >= since and link.accepted and link.closed_t is None
            if fresh and births(link):
                return link
        return None

    async def wait_online(
        self, device_id: str, proc: KioskProcess, since: float, within_s: float
    ) -> LinkRecord | None:
        found: list[LinkRecord] = []

        def ready() -> bool:
            link = self.online_link(device_id, since)
            if link is not None:
                found.append(link)
                return True
            return proc.returncode is not None

        await wait_until(ready, within_s)
        return found[0] if found else None

    async def first_online(self, device_id: str, proc: KioskProcess) -> LinkRecord:
        """The first start: a kiosk that does not come up is a usage error (exit 2)."""
        link = await self.wait_online(device_id, proc, 0.0, self.options.connect_timeout_s)
        if link is not None:
            return link
        tail = proc.log_tail()
        said = f"; it said: {tail}" if tail else ""
        if proc.returncode is not None:
            raise KitError(
                f"the kiosk command exited with code {proc.returncode} before it was online{said}",
                2,
            )
        seen = self.networks[device_id].recorder.snapshot()
        how = "never connected to" if not seen else "connected but published no birth via"
        raise KitError(
            f"the kiosk {how} the kit's proxy within {self.options.connect_timeout_s:g} s "
            f"(does --kiosk-cmd use {{host}} and {{port}}?){said}",
            2,
        )

    def final_ack(self, command_id: str, after: float) -> bool:
        return any(
            str(a.ack.id) == command_id and a.t >= after and a.ack.state in FINAL_STATES
            for a in acks(self.obs, self.obs.device_id)
        )

    async def command(
        self,
        purpose: str,
        type_: str,
        args: dict[str, object],
        *,
        device_id: str | None = None,
        issued_offset_ms: int = 0,
        ttl_ms: int = 60_000,
    ) -> SentCommand:
        issued = now_ms() + issued_offset_ms
        command = Command(
            id=uuid.uuid4(),
            type=type_,
            issued_at=issued,
            expires_at=issued + ttl_ms,
            device_id=device_id,
            args=args,
        )
        payload = encode(command)
        return await self.send(purpose, str(command.id), payload)

    async def send(self, purpose: str, command_id: str, payload: bytes) -> SentCommand:
        dev = self.obs.device_id
        sent = SentCommand(purpose, command_id, payload, time.monotonic(), self.kit.v5)
        self.obs.commands[purpose] = sent
        await self.kit.publish(
            self.topic(dev, TopicKind.CMD),
            payload,
            response_topic=self.topic(dev, TopicKind.ACK),
            correlation=command_id.encode(),
        )
        return sent

    async def command_and_wait(
        self,
        purpose: str,
        type_: str,
        args: dict[str, object],
        *,
        device_id: str | None = None,
        issued_offset_ms: int = 0,
        ttl_ms: int = 60_000,
    ) -> SentCommand:
        sent = await self.command(
            purpose,
            type_,
            args,
            device_id=device_id,
            issued_offset_ms=issued_offset_ms,
            ttl_ms=ttl_ms,
        )
        await wait_until(lambda: self.final_ack(sent.command_id, sent.sent_t), ACK_WAIT_S)
        return sent

    def lost_seen(self, device_id: str, session: int, after: float) -> bool:
        topic = self.topic(device_id, TopicKind.PRESENCE)
        for msg in list(self.obs.broker_messages):
            if msg.topic == topic and msg.t >= after:
                try:
                    seen = decode(PresenceLost, msg.payload)
                except ContractError:
                    continue
                if seen.session == session:
                    return True
        return False

    def status_with_version(self, version: int, after: float) -> bool:
        topic = self.topic(self.obs.device_id, TopicKind.STATUS)
        for link in self.networks[self.obs.device_id].recorder.snapshot():
            for t, pub in list(link.publishes):
                if pub.topic == topic and t >= after:
                    try:
                        if decode(Status, pub.payload).config_version == version:
                            return True
                    except ContractError:
                        continue
        return False

    # -- the main kiosk ------------------------------------------------------------------------

    async def main_track(self) -> None:
        obs, dev = self.obs, self.obs.device_id
        await self.kit.publish(
            self.topic(dev, TopicKind.CONFIG), encode(DeviceConfig(version=1)), retain=True
        )
        proc = await self.start_kiosk(dev)
        link = await self.first_online(dev, proc)
        status_topic = self.topic(dev, TopicKind.STATUS)
        await wait_until(lambda: any(p.topic == status_topic for _, p in link.publishes), 3.0)
        # KB-PRES-2 has the kiosk subscribe after its birth: a command published before
        # the broker granted that subscription on a new session is dropped by the broker,
        # which says nothing about the kiosk (the bridge retries such a command).
        cmd_topic = self.topic(dev, TopicKind.CMD)
        await wait_until(lambda: link.subscribed_to(cmd_topic), SUBSCRIBE_WAIT_S)

        refresh = await self.command_and_wait("refresh", "refresh", {})
        again = await self.send("redelivery", refresh.command_id, refresh.payload)
        await wait_until(lambda: self.final_ack(refresh.command_id, again.sent_t), ACK_WAIT_S)
        await self.command_and_wait(
            "expired", "refresh", {}, issued_offset_ms=-120_000, ttl_ms=60_000
        )
        await self.command_and_wait("unknown", "dance", {})
        other = "someone-else" if dev != "someone-else" else "someone-other"
        await self.command_and_wait("foreign_wipe", "wipe", {"reason": "test"}, device_id=other)
        obs.config_version = 2
        config = DeviceConfig(version=2).model_dump(mode="json", exclude_none=True)
        set_config = await self.command_and_wait("set_config", "set_config", config)
        await wait_until(lambda: self.status_with_version(2, set_config.sent_t), 5.0)

        await self.heal(link)

        token = secrets.token_hex(32)
        obs.rotate_token = token
        rotate = await self.command_and_wait(
            "rotate_token", "rotate_token", {"token": token}, device_id=dev
        )
        if self.final_ack(rotate.command_id, rotate.sent_t):
            obs.rotate_drop_t = await self.networks[dev].drop()
            back = await self.wait_online(dev, proc, obs.rotate_drop_t, 30.0)
        else:
            obs.skipped["rotate_drop"] = "not checked: rotate_token was not acknowledged"
            back = self.online_link(dev, 0.0)
        if back is None:
            self.skip_rest("the kiosk did not come back after its link was dropped")
            await proc.kill()
            return

        delay = self.options.reconnect_delay_s
        obs.reconnect_delay_s = float(delay)
        recon = await self.command("reconnect", "reconnect", {"delay_s": delay})
        if await self.wait_online(dev, proc, recon.sent_t, delay + 20.0) is None:
            self.skip_rest("the kiosk did not come back after the reconnect command")
            await proc.kill()
            return

        await self.clean_stop(proc)
        await self.restart_and_kill()

    async def heal(self, link: LinkRecord) -> None:
        obs, dev = self.obs, self.obs.device_id
        session = link_session(link)
        if session is None or session < 2:
            obs.skipped["heal"] = "not checked: no session to be older than"
            return
        stale = session - 1
        obs.heal_injected_session = stale
        obs.heal_injected_t = time.monotonic()
        await self.kit.publish(
            self.topic(dev, TopicKind.PRESENCE),
            encode(PresenceLost(session=stale)),
            retain=True,
        )
        t0 = obs.heal_injected_t

        def healed() -> bool:
            return any(t >= t0 and b.session == session for t, _p, b in births(link))

        await wait_until(healed, 5.0)

    async def clean_stop(self, proc: KioskProcess) -> None:
        obs, dev = self.obs, self.obs.device_id
        link = self.online_link(dev, 0.0)
        session = link_session(link) if link is not None else None
        obs.sigterm_t = time.monotonic()
        proc.signal(signal.SIGTERM)
        obs.stop_exited = await proc.wait(STOP_WAIT_S)
        if obs.stop_exited is None:
            await proc.kill()
        if session is not None:
            t0 = obs.sigterm_t
            # Expected to time out: a Will after a clean stop is the failure.
            await wait_until(lambda: self.lost_seen(dev, session, t0), NO_WILL_WAIT_S)
        obs.stop_retained = await self.kit.fetch_retained(self.topic(dev, TopicKind.PRESENCE))
        obs.stop_checked_t = time.monotonic()

    async def restart_and_kill(self) -> None:
        obs, dev = self.obs, self.obs.device_id
        since = time.monotonic()
        proc = await self.start_kiosk(dev)
        link = await self.wait_online(dev, proc, since, self.options.connect_timeout_s)
        session = link_session(link) if link is not None else None
        if session is None:
            obs.skipped["kill"] = "not checked: the restarted kiosk did not come online"
            await proc.kill()
            return
        obs.kill_t = time.monotonic()
        proc.signal(signal.SIGKILL)
        await proc.wait(STOP_WAIT_S)
        t0 = obs.kill_t
        await wait_until(lambda: self.lost_seen(dev, session, t0), 10.0)

    def skip_rest(self, why: str) -> None:
        for step in ("reconnect", "sigterm", "kill"):
            self.obs.skipped.setdefault(step, f"not checked: {why}")

    # -- the second kiosk ----------------------------------------------------------------------

    async def second_track(self) -> None:
        obs, dev = self.obs, self.obs.second_device_id
        await self.kit.publish(
            self.topic(dev, TopicKind.CONFIG), encode(DeviceConfig(version=1)), retain=True
        )
        proc = await self.start_kiosk(dev)
        try:
            await self.first_online(dev, proc)
            net = self.networks[dev]
            refuser = Refuser()
            port = await refuser.start()
            try:
                net.send_to(port)
                obs.backoff_drop_t = await net.drop()
                await wait_until(
                    lambda: len(refuser.attempts) >= BACKOFF_ATTEMPTS, BACKOFF_WINDOW_S
                )
                net.send_to(net.broker_port)
                obs.backoff_attempts = list(refuser.attempts)
                obs.backoff_restore_t = time.monotonic()
            finally:
                net.send_to(net.broker_port)
                await refuser.stop()
            link = await self.wait_online(dev, proc, obs.backoff_restore_t, BACKOFF_RETURN_S)
            if link is None or link.connect is None:
                obs.skipped["blackhole"] = "not checked: the kiosk did not come back online"
                return
            session = link_session(link)
            obs.blackhole_t = await net.blackhole()
            limit = 3.0 * link.connect.keepalive + 8.0
            if session is not None:
                t0 = obs.blackhole_t
                await wait_until(lambda: self.lost_seen(dev, session, t0), limit)
        finally:
            await proc.kill()
            await self.networks[dev].restore()


async def run_kit(options: KitOptions) -> KitRun:
    """Run every check's actions; raises :class:`KitError` when the run cannot happen."""
    started = time.monotonic()
    obs = Observations(
        device_id=options.device_id,
        second_device_id=f"{options.device_id}-b",
        keepalive_range=options.keepalive_range,
        reconnect_delay_s=float(options.reconnect_delay_s),
    )
    run = KitRun(obs)
    try:
        async with KitBroker(options.broker_url, options.broker_kind, options.work_dir) as broker:
            run.broker = broker.kind
            kit = _Kit(options, broker, obs)
            try:
                await _run(kit)
            finally:
                run.logs = dict(kit.logs)
    except BrokerUnavailable as exc:
        raise KitError(str(exc), 3) from None
    except KioskCommandError as exc:
        raise KitError(str(exc), 2) from None
    run.duration_s = time.monotonic() - started
    return run


async def _run(kit: _Kit) -> None:
    obs = kit.obs
    for device in (obs.device_id, obs.second_device_id):
        kit.networks[device] = KioskNetwork(device, kit.broker.host, kit.broker.port, obs.links)
    topics = [device_topic(d, TopicKind.PRESENCE) for d in kit.networks]
    kit.client = KitClient(kit.broker, topics, obs.broker_messages)
    try:
        for net in kit.networks.values():
            await net.start()
        try:
            await kit.client.start()
        except ConnectionError as exc:
            raise KitError(str(exc), 3) from None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(kit.main_track())
                group.create_task(kit.second_track())
        except* KitError as errors:
            raise errors.exceptions[0] from None
        except* KioskCommandError as errors:
            raise KitError(str(errors.exceptions[0]), 2) from None
    finally:
        for proc in kit.processes:
            await proc.kill()
        await kit.client.stop()
        for net in kit.networks.values():
            await net.stop()
