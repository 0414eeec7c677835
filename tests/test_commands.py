"""Commands end to end: outbox -> bridge -> broker -> reference kiosk agent -> acks."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import typer
from sqlalchemy import insert
from typer.testing import CliRunner

from bridge.cli import send_cmd
from bridge.clock import now_ms
from bridge.db.command_store import CommandStore, NewCommand
from bridge.db.engine import create_schema
from bridge.db.models import CommandRecord, Remote
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from bridge.embedded_broker import EmbeddedBroker
from bridge.outbox.api import CommandRequestError, enqueue
from bridge.testing.mosquitto import MosquittoProcess
from schemas import Ack, AckState, Command, TopicKind, device_topic, encode
from tests.support.agents import Agents
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw
from tests.support.mqtt import PahoClient
from tests.support.ports import free_port

TERMINAL = {"succeeded", "failed", "rejected", "expired", "cancelled", "superseded"}


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Db]:
    handle = Db(sqlite_url)
    create_schema(handle.engine)
    yield handle
    handle.close()


async def command(db: Db, command_id: str) -> Any:
    store = CommandStore(db.engine, clock=now_ms)
    rows = await asyncio.to_thread(store.get, [command_id])
    return rows[0] if rows else None


async def finished(db: Db, command_id: str, within: float = 20.0) -> Any:
    return await eventually(
        lambda: command(db, command_id),
        lambda row: row is not None and row.state in TERMINAL,
        within=within,
        what=f"command {command_id} finished",
    )


async def online(db: Db, device_id: str) -> None:
    await eventually(lambda: db.status_of(device_id), lambda s: s == "Connected")


@pytest.fixture(params=["mosquitto", "embedded"])
async def any_broker(
    request: pytest.FixtureRequest, mosquitto_factory: Any
) -> AsyncIterator[tuple[str, str | None]]:
    """(url, protocol): Mosquitto with MQTT 5, or the embedded amqtt broker (3.1.1)."""
    if request.param == "mosquitto":
        yield mosquitto_factory().url, None
        return
    async with EmbeddedBroker(host="127.0.0.1", port=free_port()) as broker:
        yield broker.url, "3.1.1"


async def test_refresh_goes_through_every_state(
    any_broker: tuple[str, str | None], sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    url, protocol = any_broker
    async with running_bridge(url, sqlite_url, protocol=protocol):
        agent = await agents.start(url, "cmd-1", protocol="3.1.1" if protocol else "auto")
        await online(sqlite_db, "cmd-1")
        [cid] = await asyncio.to_thread(
            enqueue, sqlite_db.engine, "refresh", ["cmd-1"], {"url": "https://x.test/a"}
        )
        row = await finished(sqlite_db, cid)
        assert row.state == "succeeded"
        assert row.sent_at and row.delivered_at and row.acked_at and row.finished_at
        assert row.sent_at <= row.delivered_at and row.acked_at <= row.finished_at
        assert row.attempts == 1
        assert agent.executed[uuid.UUID(cid)] == 1


async def test_command_waits_for_offline_device_and_delivers_on_reconnect(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url):
        first = await agents.start(mosquitto.url, "late-1")
        await online(sqlite_db, "late-1")
        await asyncio.to_thread(first.stop)
        await eventually(lambda: db_state(sqlite_db, "late-1"), lambda s: s == "offline")
        ids = [
            (await asyncio.to_thread(enqueue, sqlite_db.engine, "refresh", ["late-1"]))[0]
            for _ in range(3)
        ]
        states = [(await command(sqlite_db, i)).state for i in ids]
        # A day offline must not mean forty refreshes: only the newest waits.
        assert states == ["superseded", "superseded", "queued"]
        again = await agents.start(mosquitto.url, "late-1")
        row = await finished(sqlite_db, ids[-1])
        assert row.state == "succeeded"
        assert sum(again.executed.values()) == 1


async def db_state(db: Db, device_id: str) -> str | None:
    row = await db.connectivity(device_id)
    return None if row is None else str(row.state)


async def test_expired_while_offline_is_never_executed(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url):
        first = await agents.start(mosquitto.url, "exp-1")
        await online(sqlite_db, "exp-1")
        await asyncio.to_thread(first.stop)
        await eventually(lambda: db_state(sqlite_db, "exp-1"), lambda s: s == "offline")
        [cid] = await asyncio.to_thread(enqueue, sqlite_db.engine, "refresh", ["exp-1"], ttl_s=1)
        row = await finished(sqlite_db, cid)
        assert row.state == "expired"
        again = await agents.start(mosquitto.url, "exp-1")
        await asyncio.sleep(0)  # let the agent settle; the assertion below is on state
        assert (await command(sqlite_db, cid)).state == "expired"
        assert again.executed[uuid.UUID(cid)] == 0


class SilentKiosk:
    """Online (birth published) and subscribed to its commands, but it acks only from
    the ``ack_from``-th delivery on: a device whose first acks got lost."""

    def __init__(self, url: str, device_id: str, ack_from: int | None) -> None:
        self.kiosk = FakeKiosk(url, device_id, session=now_ms())
        self.ack_from = ack_from
        self.deliveries: list[Command] = []

    async def start(self) -> None:
        await self.kiosk.come_online()
        await asyncio.to_thread(
            self.kiosk.client.subscribe, device_topic(self.kiosk.device_id, TopicKind.CMD)
        )

    async def pump(self) -> None:
        """Answer deliveries as they come (runs until cancelled)."""
        from schemas import decode

        while True:
            try:
                msg = await asyncio.to_thread(self.kiosk.client.expect, None, 0.5)
            except TimeoutError:
                continue
            if not msg.topic.endswith("/cmd"):
                continue
            cmd = decode(Command, msg.payload)
            self.deliveries.append(cmd)
            if self.ack_from is not None and len(self.deliveries) >= self.ack_from:
                for state in (AckState.RECEIVED, AckState.SUCCEEDED):
                    await asyncio.to_thread(
                        self.kiosk.client.publish,
                        device_topic(self.kiosk.device_id, TopicKind.ACK),
                        encode(Ack(id=cmd.id, state=state, ts=now_ms())),
                    )

    def close(self) -> None:
        self.kiosk.close()


@pytest.mark.parametrize(("ack_from", "expected"), [(2, "succeeded"), (None, "failed")])
async def test_retry_until_acked_or_attempts_exhausted(
    mosquitto: MosquittoProcess,
    sqlite_url: str,
    sqlite_db: Db,
    ack_from: int | None,
    expected: str,
) -> None:
    device = SilentKiosk(mosquitto.url, "quiet-1", ack_from)
    overrides = {"command_ack_timeout_s": 0.4, "command_max_attempts": 3, "command_poll_s": 0.1}
    try:
        async with running_bridge(mosquitto.url, sqlite_url, **overrides):
            await device.start()
            await online(sqlite_db, "quiet-1")
            pump = asyncio.create_task(device.pump())
            try:
                [cid] = await asyncio.to_thread(enqueue, sqlite_db.engine, "refresh", ["quiet-1"])
                row = await finished(sqlite_db, cid, within=30)
            finally:
                pump.cancel()
            assert row.state == expected
            assert all(str(c.id) == cid for c in device.deliveries)
            if expected == "succeeded":
                assert row.attempts == 2
            else:
                assert row.attempts == 3 and "3 attempts" in row.last_error
    finally:
        device.close()


def cms_insert(db: Db, command_id: str, device_id: str) -> None:
    """What the Laravel app does: a plain INSERT, no MQTT."""
    now = utc_naive(now_ms())
    with db.engine.begin() as conn:
        conn.execute(
            insert(CommandRecord.__table__).values(
                id=command_id,
                device_id=device_id,
                type="refresh",
                args="{}",
                state="queued",
                created_at=now,
                expires_at=now + timedelta(minutes=5),
                attempts=0,
                requested_by="cms",
            )
        )


async def test_outbox_row_inserted_by_sql_is_delivered(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url):
        agent = await agents.start(mosquitto.url, "cms-1")
        await online(sqlite_db, "cms-1")
        cid = str(uuid.uuid4())
        await asyncio.to_thread(cms_insert, sqlite_db, cid, "cms-1")
        assert (await finished(sqlite_db, cid)).state == "succeeded"
        assert agent.executed[uuid.UUID(cid)] == 1


async def test_outbox_probe_picks_up_an_insert_between_full_passes(
    mosquitto: MosquittoProcess, db_url: str, agents: Agents
) -> None:
    """With the full outbox pass only every 10 s, the read-only probe alone must find a
    row the CMS inserted; the deadline is well inside one pass."""
    db = Db(db_url)
    try:
        async with running_bridge(mosquitto.url, db_url, command_poll_s=10):
            agent = await agents.start(mosquitto.url, "probe-1")
            await online(db, "probe-1")
            cid = str(uuid.uuid4())
            await asyncio.to_thread(cms_insert, db, cid, "probe-1")
            assert (await finished(db, cid, within=6)).state == "succeeded"
            assert agent.executed[uuid.UUID(cid)] == 1
    finally:
        db.close()


async def test_received_command_whose_result_was_lost_is_sent_again(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    """A bridge killed after the broker acknowledged a device's result ack, but before
    writing it, leaves the command ``received``; it must be re-sent (the device answers
    from memory, or runs it if it never finished) instead of waiting for its TTL."""
    async with running_bridge(mosquitto.url, sqlite_url):
        agent = await agents.start(mosquitto.url, "lost-result-1")
        await online(sqlite_db, "lost-result-1")
        cid = str(uuid.uuid4())
        now = utc_naive(now_ms())

        def stranded() -> None:
            with sqlite_db.engine.begin() as conn:
                conn.execute(
                    insert(CommandRecord.__table__).values(
                        id=cid,
                        device_id="lost-result-1",
                        type="refresh",
                        args="{}",
                        state="received",
                        created_at=now - timedelta(seconds=30),
                        sent_at=now - timedelta(seconds=30),
                        acked_at=now - timedelta(seconds=29),
                        retry_at=now - timedelta(seconds=1),
                        expires_at=now + timedelta(minutes=5),
                        attempts=1,
                        requested_by="test",
                    )
                )

        await asyncio.to_thread(stranded)
        row = await finished(sqlite_db, cid)
        assert row.state == "succeeded"
        assert agent.executed[uuid.UUID(cid)] == 1
        assert row.attempts == 2


async def test_command_published_by_another_client_is_tracked(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url):
        await agents.start(mosquitto.url, "obs-1")
        await online(sqlite_db, "obs-1")
        cid = uuid.uuid4()
        issued = now_ms()
        payload = encode(
            Command(id=cid, type="refresh", issued_at=issued, expires_at=issued + 60_000)
        )
        await publish_raw(mosquitto.url, device_topic("obs-1", TopicKind.CMD), payload)
        row = await finished(sqlite_db, str(cid))
        assert (row.state, row.requested_by) == ("succeeded", "observed:mqtt")


async def test_bad_acks_are_rejected_and_counted(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url) as bridge:
        await agents.start(mosquitto.url, "own-1")
        await agents.start(mosquitto.url, "other-1")
        await online(sqlite_db, "own-1")
        await online(sqlite_db, "other-1")
        await asyncio.to_thread(agents.made[0].stop)
        [cid] = await asyncio.to_thread(enqueue, sqlite_db.engine, "refresh", ["own-1"])
        ack = encode(Ack(id=uuid.UUID(cid), state=AckState.SUCCEEDED, ts=now_ms()))
        # other-1 claims own-1's command, an unknown id, and garbage.
        await publish_raw(mosquitto.url, device_topic("other-1", TopicKind.ACK), ack)
        unknown = encode(Ack(id=uuid.uuid4(), state=AckState.SUCCEEDED, ts=now_ms()))
        await publish_raw(mosquitto.url, device_topic("own-1", TopicKind.ACK), unknown)
        await publish_raw(mosquitto.url, device_topic("own-1", TopicKind.ACK), b'{"id":"nope"}')
        await eventually(
            bridge.metrics.rejected_total, lambda n: n >= 3, what="three rejected acks"
        )
        labels = {
            s.labels["reason"]: s.value
            for m in bridge.metrics.rejected.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert labels == {"wrong_device": 1, "unknown_command": 1, "bad_payload": 1}
        assert (await command(sqlite_db, cid)).state == "queued"


def test_ack_before_puback_is_recorded_and_never_moves_back(sqlite_db: Db) -> None:
    store = CommandStore(sqlite_db.engine, clock=now_ms)
    [cid] = store.enqueue([NewCommand("fast-1", "refresh", {}, 60)])
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            CommandRecord.__table__.update()
            .where(CommandRecord.__table__.c.id == cid)
            .values(state="sent", sent_at=utc_naive(now_ms()), attempts=1)
        )
    ack_id = uuid.UUID(cid)
    store.apply_acks([("fast-1", Ack(id=ack_id, state=AckState.RECEIVED, ts=1), now_ms())])
    store.mark_delivered([cid])  # the PUBACK arrives after the device's ack
    [row] = store.get([cid])
    assert row.state == "received" and row.delivered_at is not None and row.acked_at is not None
    store.apply_acks([("fast-1", Ack(id=ack_id, state=AckState.SUCCEEDED, ts=2), now_ms())])
    store.apply_acks([("fast-1", Ack(id=ack_id, state=AckState.RECEIVED, ts=3), now_ms())])
    [row] = store.get([cid])
    assert row.state == "succeeded"


def test_acks_arriving_together_apply_in_order_as_one(sqlite_db: Db) -> None:
    store = CommandStore(sqlite_db.engine, clock=now_ms)
    cids = store.enqueue(
        [NewCommand("both-1", "refresh", {}, 60), NewCommand("both-2", "reconnect", {}, 60)]
    )
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            CommandRecord.__table__.update()
            .where(CommandRecord.__table__.c.id.in_(cids))
            .values(state="sent", sent_at=utc_naive(now_ms()), attempts=1)
        )
    first, second = uuid.UUID(cids[0]), uuid.UUID(cids[1])
    t0 = 1_764_000_000_000
    outcomes = store.apply_acks(
        [
            ("both-1", Ack(id=first, state=AckState.RECEIVED, ts=1), t0),
            ("both-2", Ack(id=second, state=AckState.RECEIVED, ts=1), t0 + 1),
            # A redelivered "received" after the first: a duplicate, not a new time.
            ("both-1", Ack(id=first, state=AckState.RECEIVED, ts=2), t0 + 2),
            ("both-1", Ack(id=first, state=AckState.SUCCEEDED, ts=3), t0 + 3),
            ("both-2", Ack(id=second, state=AckState.FAILED, ts=3, detail="no route"), t0 + 4),
        ]
    )
    assert [(o.verdict, o.state) for o in outcomes] == [
        ("applied", "received"),
        ("applied", "received"),
        ("duplicate", "received"),
        ("applied", "succeeded"),
        ("applied", "failed"),
    ]
    by_id = {row.id: row for row in store.get(cids)}
    ok, failed = by_id[cids[0]], by_id[cids[1]]
    assert (ok.state, ok.acked_at, ok.finished_at) == (
        "succeeded",
        utc_naive(t0),
        utc_naive(t0 + 3),
    )
    assert (failed.state, failed.acked_at, failed.finished_at, failed.last_error) == (
        "failed",
        utc_naive(t0 + 1),
        utc_naive(t0 + 4),
        "no route",
    )


async def test_set_config_publishes_retained_config_and_device_reports_it(
    mosquitto: MosquittoProcess, sqlite_url: str, sqlite_db: Db, agents: Agents
) -> None:
    async with running_bridge(mosquitto.url, sqlite_url):
        agent = await agents.start(mosquitto.url, "cfg-1")
        await online(sqlite_db, "cfg-1")
        [cid] = await asyncio.to_thread(
            enqueue,
            sqlite_db.engine,
            "set_config",
            ["cfg-1"],
            {"status_interval_s": 7, "remote_control_enabled": True},
        )
        assert (await finished(sqlite_db, cid)).state == "succeeded"
        assert agent.status_interval_s == pytest.approx(7)
        remote = await sqlite_db.remote("cfg-1")
        assert bool(remote.remote_control_enabled) is True
        conn = await eventually(
            lambda: sqlite_db.connectivity("cfg-1"),
            lambda c: c.config_version == 1,
            what="reported config version",
        )
        assert conn.config_version == 1
        # The retained config is there for a kiosk that connects later.
        reader = PahoClient(mosquitto.host, mosquitto.port)
        await asyncio.to_thread(reader.connect)
        try:
            await asyncio.to_thread(reader.subscribe, device_topic("cfg-1", TopicKind.CONFIG))
            got = await asyncio.to_thread(reader.expect, device_topic("cfg-1", TopicKind.CONFIG))
            assert got.retain and json.loads(got.payload)["version"] == 1
        finally:
            await asyncio.to_thread(reader.disconnect)


def test_wipe_rails(sqlite_db: Db) -> None:
    with pytest.raises(CommandRequestError, match="reason"):
        enqueue(sqlite_db.engine, "wipe", ["w-1"], {}, ttl_s=60)
    with pytest.raises(CommandRequestError, match="maximum"):
        enqueue(sqlite_db.engine, "wipe", ["w-1"], {}, ttl_s=3600, reason="stolen")
    enqueue(sqlite_db.engine, "wipe", [f"w-{n}" for n in range(10)], {}, ttl_s=60, reason="x")
    with pytest.raises(CommandRequestError, match="rate limit"):
        enqueue(sqlite_db.engine, "wipe", ["w-99"], {}, ttl_s=60, reason="one more")
    with pytest.raises(CommandRequestError, match="unknown command type"):
        enqueue(sqlite_db.engine, "selfdestruct", ["w-1"], {})
    # Only the credential rotation may send a token: the broker must know it first.
    with pytest.raises(CommandRequestError, match="device rotate-token"):
        enqueue(sqlite_db.engine, "rotate_token", ["w-1"], {"token": "0" * 64})
    with pytest.raises(CommandRequestError, match="delay_s"):
        enqueue(sqlite_db.engine, "reconnect", ["w-1"], {"delay_s": -1})


def test_a_command_answered_before_its_puback_never_reads_finished_but_undelivered(
    sqlite_db: Db,
) -> None:
    store = CommandStore(sqlite_db.engine, clock=now_ms)
    [cid] = store.enqueue([NewCommand("fast-2", "refresh", {}, 60)])
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            CommandRecord.__table__.update()
            .where(CommandRecord.__table__.c.id == cid)
            .values(state="sent", sent_at=utc_naive(now_ms()), attempts=1)
        )
    ack_id = uuid.UUID(cid)
    store.apply_acks(
        [
            ("fast-2", Ack(id=ack_id, state=AckState.RECEIVED, ts=1), now_ms()),
            ("fast-2", Ack(id=ack_id, state=AckState.SUCCEEDED, ts=2), now_ms()),
        ]
    )
    # No PUBACK recorded yet: the ack itself proves the delivery.
    [row] = store.get([cid])
    assert row.state == "succeeded" and row.finished_at is not None
    assert row.delivered_at is not None and row.sent_at <= row.delivered_at <= row.finished_at
    delivered = row.delivered_at
    store.mark_delivered([cid])
    [row] = store.get([cid])
    assert row.delivered_at == delivered


def test_the_readmes_wipe_example_gets_the_wipe_ttl(sqlite_db: Db, sqlite_url: str) -> None:
    """``kiosk-bridge send wipe lobby-1 --yes --reason ...`` as the README shows it: with no
    --ttl a wipe gets its own default (its 600 s maximum), not the hour of other kinds."""
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            insert(table_of(Remote)).values(
                device_identifier="lobby-1", status="Disconnected", remote_control_enabled=False
            )
        )
    app = typer.Typer()
    send_cmd.register(app)
    result = CliRunner().invoke(
        app,
        ["wipe", "lobby-1", "--yes", "--reason", "stolen, ticket 4711", "--db", sqlite_url],
        env={"KB_DB": None},
    )
    assert result.exit_code == 0, result.output
    [row] = CommandStore(sqlite_db.engine, clock=now_ms).get(
        [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    )
    assert row.type == "wipe"
    assert (row.expires_at - row.created_at).total_seconds() == pytest.approx(600, abs=1)
    # Other kinds keep the hour.
    [refresh] = enqueue(sqlite_db.engine, "refresh", ["lobby-1"], {})
    [made] = CommandStore(sqlite_db.engine, clock=now_ms).get([refresh])
    assert (made.expires_at - made.created_at).total_seconds() == pytest.approx(3600, abs=1)


def test_send_offers_the_contracts_kinds_and_any_of_their_args(
    sqlite_db: Db, sqlite_url: str
) -> None:
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            insert(table_of(Remote)).values(
                device_identifier="kinds-1", status="Disconnected", remote_control_enabled=False
            )
        )
    app = typer.Typer()
    send_cmd.register(app)

    def send(*args: str) -> Any:
        return CliRunner().invoke(app, [*args, "--db", sqlite_url], env={"KB_DB": None})

    assert set(send_cmd.SENDABLE) == {"refresh", "reconnect", "wipe", "set-config"}
    refused = send("rotate-token", "kinds-1")
    assert refused.exit_code == 2 and "rotate-token" in refused.output
    queued = send("refresh", "kinds-1", "--arg", "url=https://cms.example.com/d/1", "--json")
    assert queued.exit_code == 0, queued.output
    [command_id] = json.loads(queued.output)["queued"]
    [row] = CommandStore(sqlite_db.engine, clock=now_ms).get([command_id])
    assert json.loads(row.args) == {"url": "https://cms.example.com/d/1"}
    typed = send("reconnect", "kinds-1", "--arg", "delay_s=5", "--json")
    assert typed.exit_code == 0, typed.output
    [row] = CommandStore(sqlite_db.engine, clock=now_ms).get(json.loads(typed.output)["queued"])
    assert json.loads(row.args) == {"delay_s": 5}
    for bad in (["--arg", "no-equals"], ["--arg", "delay_s=-1"]):
        result = send("reconnect", "kinds-1", *bad)
        assert result.exit_code == 2, result.output
