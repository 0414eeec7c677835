"""The reference kiosk agent against a real Mosquitto (MQTT 5)."""

from __future__ import annotations

import json
import queue
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.clock import now_ms
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.credentials import TokenFile
from bridge.kiosk.options import MqttProtocol
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    Ack,
    AckState,
    Command,
    DeviceConfig,
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    decode,
    decode_presence,
    device_topic,
    encode,
)
from tests.support.mqtt import PahoClient, Received
from tests.support.ports import free_port

AgentFactory = Callable[..., KioskAgent]
DEVICE = "lobby-1"


def topic(kind: TopicKind, device_id: str = DEVICE) -> str:
    return device_topic(device_id, kind)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def retained(broker: MosquittoProcess, name: str) -> Received:
    """The message the broker holds retained on ``name`` right now."""
    client = PahoClient(broker.host, broker.port).connect()
    try:
        client.subscribe(name)
        msg = client.expect(name, timeout=10)
    finally:
        client.close()
    assert msg.retain, f"{name}: message is not retained"
    return msg


def make_command(
    type_: str, *, device_id: str | None = None, args: dict[str, Any] | None = None, **times: int
) -> Command:
    issued = times.get("issued_at", now_ms())
    return Command(
        id=uuid.uuid4(),
        type=type_,
        issued_at=issued,
        expires_at=times.get("expires_at", issued + 60_000),
        device_id=device_id,
        args=args or {},
    )


def expect_ack(observer: PahoClient, device_id: str = DEVICE) -> Ack:
    return decode(Ack, observer.expect(topic(TopicKind.ACK, device_id)).payload)


def expect_presence(observer: PahoClient, device_id: str = DEVICE) -> Any:
    return decode_presence(observer.expect(topic(TopicKind.PRESENCE, device_id)).payload)


@pytest.fixture(autouse=True)
def no_leaked_agent_threads() -> Iterator[None]:
    yield
    leaked = [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("kiosk-agent-", f"paho-mqtt-client-{DEVICE}"))
    ]
    assert leaked == []


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[AgentFactory]:
    made: list[KioskAgent] = []

    def make(url: str, device_id: str = DEVICE, **kwargs: Any) -> KioskAgent:
        kwargs.setdefault("state_dir", tmp_path / "state" / device_id)
        kwargs.setdefault("backoff_base_s", 0.2)
        kwargs.setdefault("backoff_cap_s", 2.0)
        agent = KioskAgent(device_id, url, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def observer(mosquitto: MosquittoProcess) -> Iterator[PahoClient]:
    """Subscribed to everything of DEVICE before the agent starts."""
    client = PahoClient(mosquitto.host, mosquitto.port).connect()
    client.subscribe(device_topic(DEVICE, TopicKind.PRESENCE))
    client.subscribe(device_topic(DEVICE, TopicKind.ACK))
    client.subscribe(device_topic(DEVICE, TopicKind.STATUS))
    yield client
    client.close()


def send(observer: PahoClient, command: Command, device_id: str = DEVICE) -> None:
    observer.publish(topic(TopicKind.CMD, device_id), encode(command), qos=1)


# -- presence -------------------------------------------------------------------------------


def test_birth_and_first_status_are_retained_with_metadata(
    mosquitto: MosquittoProcess, agents: AgentFactory
) -> None:
    agent = agents(
        mosquitto.url, app_version="4.2.0", android_version="13", mac_address="02:00:00:00:00:01"
    )
    agent.start(timeout=15)
    assert agent.protocol is MqttProtocol.V5
    birth = decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload)
    assert isinstance(birth, PresenceOnline)
    assert birth.session == agent.session
    assert birth.app_version == "4.2.0"
    assert birth.android_version == "13"
    assert birth.mac_address == "02:00:00:00:00:01"
    assert birth.ip_address == "127.0.0.1"
    assert abs(birth.ts - now_ms()) < 60_000
    status = decode(Status, retained(mosquitto, topic(TopicKind.STATUS)).payload)
    assert (status.session, status.seq) == (agent.session, 0)


def test_kill_makes_the_broker_publish_the_retained_will_with_the_session(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    session = agent.session
    assert isinstance(expect_presence(observer), PresenceOnline)
    agent.kill()
    will = expect_presence(observer)
    assert will == PresenceLost(session=session)
    assert decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload) == will


def test_clean_stop_announces_offline_and_the_will_is_not_sent(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    session = agent.session
    agent.stop(OfflineReason.SHUTDOWN)
    observer.subscribe("test/marker")
    # Published after the agent's DISCONNECT was processed: a Will, had there been one,
    # reaches the observer before the marker.
    observer.publish("test/marker", b"x", qos=1)
    presence = []
    while (msg := observer.expect()).topic != "test/marker":
        if msg.topic == topic(TopicKind.PRESENCE):
            presence.append(decode_presence(msg.payload))
    assert [p.state for p in presence] == ["online", "offline"]
    offline = presence[-1]
    assert isinstance(offline, PresenceOffline)
    assert (offline.session, offline.reason) == (session, OfflineReason.SHUTDOWN)
    assert decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload) == offline


def test_session_strictly_increases_across_agent_restarts(
    mosquitto: MosquittoProcess, agents: AgentFactory, tmp_path: Path, observer: PahoClient
) -> None:
    state_dir = tmp_path / "same-state"
    sessions = []
    for _ in range(3):
        agent = agents(mosquitto.url, state_dir=state_dir)
        agent.start(timeout=15)
        sessions.append(agent.session)
        birth = expect_presence(observer)
        assert isinstance(birth, PresenceOnline)
        assert birth.session == agent.session
        agent.stop()
        assert expect_presence(observer).state == "offline"
    assert sessions == sorted(sessions)
    assert len(set(sessions)) == 3


def test_reconnects_with_a_new_session_after_the_broker_restarts(
    mosquitto: MosquittoProcess, agents: AgentFactory
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    first = agent.session
    mosquitto.restart()

    def newer_birth() -> bool:
        presence = decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload)
        return isinstance(presence, PresenceOnline) and presence.session > first

    wait_until(newer_birth, "a birth with a newer session", timeout=30)
    # The agent calls itself connected once the broker has acknowledged the birth and
    # its subscriptions, a moment after the birth is visible to others.
    wait_until(agent.connected.is_set, "the agent connected again", timeout=30)
    assert agent.session > first
    assert agent.sessions == sorted(set(agent.sessions))


def test_self_heals_when_a_late_will_overwrites_the_birth(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    assert isinstance(expect_presence(observer), PresenceOnline)
    late_will = PresenceLost(session=agent.session - 1)
    observer.publish(topic(TopicKind.PRESENCE), encode(late_will), qos=1, retain=True)
    assert expect_presence(observer) == late_will
    healed = expect_presence(observer)
    assert isinstance(healed, PresenceOnline)
    assert healed.session == agent.session
    current = decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload)
    assert isinstance(current, PresenceOnline)
    assert current.session == agent.session
    assert agent.counters["heals"] == 1


def _presence_until_marker(observer: PahoClient, marker: str) -> list[Any]:
    """Presence values the observer got before ``marker`` came back: everything the
    broker had forwarded by the time it handled the marker's publish."""
    observer.subscribe(marker)
    observer.publish(marker, b"x", qos=1)
    seen = []
    while (msg := observer.expect()).topic != marker:
        if msg.topic == topic(TopicKind.PRESENCE):
            seen.append(decode_presence(msg.payload))
    return seen


def test_one_birth_per_connect_and_a_clean_stop_stays_stopped(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient, tmp_path: Path
) -> None:
    # KB-PRES-5/6: the previous session's retained offline, replayed when the agent
    # subscribes, is no reason for a second birth; the agent's own offline is not healed.
    state_dir = tmp_path / "restarts"
    first = agents(mosquitto.url, state_dir=state_dir)
    first.start(timeout=15)
    first.stop(OfflineReason.SHUTDOWN)
    second = agents(mosquitto.url, state_dir=state_dir)
    second.start(timeout=15)
    time.sleep(0.5)  # room for a wrong second birth to show
    seen = _presence_until_marker(observer, "test/marker-1")
    assert [(p.state, p.session) for p in seen] == [
        ("online", first.session),
        ("offline", first.session),
        ("online", second.session),
    ]
    assert second.counters["births"] == 1
    assert second.counters["heals"] == 0
    second.stop(OfflineReason.SHUTDOWN)
    time.sleep(0.5)
    assert [p.state for p in _presence_until_marker(observer, "test/marker-2")] == ["offline"]
    retained_now = decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload)
    assert isinstance(retained_now, PresenceOffline)
    assert retained_now.session == second.session


def test_the_will_queued_in_the_persistent_session_is_no_reason_for_a_second_birth(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient, tmp_path: Path
) -> None:
    # The killed agent's own subscription to its presence outlives it (persistent
    # session), so its Will waits there and is delivered right after the next CONNACK,
    # after the new birth was published: it is older than the birth, not an overwrite.
    state_dir = tmp_path / "killed"
    first = agents(mosquitto.url, state_dir=state_dir)
    first.start(timeout=15)
    first.kill()
    assert isinstance(expect_presence(observer), PresenceOnline)
    assert expect_presence(observer) == PresenceLost(session=first.session)
    second = agents(mosquitto.url, state_dir=state_dir)
    second.start(timeout=15)
    time.sleep(0.5)  # room for a wrong second birth to show
    seen = _presence_until_marker(observer, "test/marker")
    assert [(p.state, p.session) for p in seen] == [("online", second.session)]
    assert second.counters["heals"] == 0


def test_a_newer_session_on_the_presence_topic_is_not_fought_over(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    assert isinstance(expect_presence(observer), PresenceOnline)
    clone = PresenceOnline(session=agent.session + 1, ts=now_ms())
    observer.publish(topic(TopicKind.PRESENCE), encode(clone), qos=1, retain=True)
    time.sleep(0.5)
    assert [p.session for p in _presence_until_marker(observer, "test/marker")] == [clone.session]
    assert agent.counters["heals"] == 0
    assert agent.counters["presence_newer_session"] == 1


def test_start_times_out_when_the_broker_is_unreachable(agents: AgentFactory) -> None:
    agent = agents(f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(TimeoutError, match="not online"):
        agent.start(timeout=1.0)
    assert not agent.connected.is_set()


# -- status and config ---------------------------------------------------------------------


def test_significant_changes_are_reported_at_once_small_ones_wait(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    status_topic = topic(TopicKind.STATUS)
    assert decode(Status, observer.expect(status_topic).payload).seq == 0
    agent.update_metrics(battery_level=80, screen_on=True)
    first = decode(Status, observer.expect(status_topic).payload)
    assert (first.seq, first.battery_level, first.screen_on) == (1, 80, True)
    agent.update_metrics(battery_level=78)  # < 5 points: waits for the 30 s timer
    agent.update_metrics(screen_on=False)  # an edge: sent at once, with the battery
    second = decode(Status, observer.expect(status_topic).payload)
    assert (second.seq, second.battery_level, second.screen_on) == (2, 78, False)
    with pytest.raises(ValueError, match="battery_level"):
        agent.update_metrics(battery_level=200)


def test_set_config_changes_the_status_interval(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    assert agent.status_interval_s == 30
    status_topic = topic(TopicKind.STATUS)
    observer.expect(status_topic)
    cmd = make_command("set_config", args={"version": 2, "status_interval_s": 5})
    send(observer, cmd)
    assert [expect_ack(observer).state for _ in range(2)] == [AckState.RECEIVED, AckState.SUCCEEDED]
    applied = time.monotonic()
    assert agent.status_interval_s == 5
    # Next periodic status 5 s +-10% later instead of ~30 s.
    observer.expect(status_topic, timeout=15)
    elapsed = time.monotonic() - applied
    assert 3.5 < elapsed < 10, elapsed
    # An older retained config is refused; a newer one is applied.
    observer.publish(
        topic(TopicKind.CONFIG), encode(DeviceConfig(version=1, status_interval_s=60)), retain=True
    )
    observer.publish(
        topic(TopicKind.CONFIG), encode(DeviceConfig(version=3, status_interval_s=45)), retain=True
    )
    wait_until(lambda: agent.config is not None and agent.config.version == 3, "config v3")
    assert agent.status_interval_s == 45
    assert agent.counters["bad_config"] == 1


# -- commands -------------------------------------------------------------------------------


def test_redelivered_command_runs_once_and_is_acked_twice(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    ran: list[uuid.UUID] = []
    agent = agents(mosquitto.url, handlers={"refresh": lambda cmd: ran.append(cmd.id)})
    agent.start(timeout=15)
    cmd = make_command("refresh", args={"url": "https://example.test/"})
    send(observer, cmd)
    first = [expect_ack(observer) for _ in range(2)]
    send(observer, cmd)
    again = expect_ack(observer)
    assert [(a.id, a.state) for a in first] == [
        (cmd.id, AckState.RECEIVED),
        (cmd.id, AckState.SUCCEEDED),
    ]
    assert (again.id, again.state) == (cmd.id, AckState.SUCCEEDED)
    assert ran == [cmd.id]
    assert agent.executed[cmd.id] == 1


def test_duplicate_ids_are_remembered_across_restarts(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient, tmp_path: Path
) -> None:
    state_dir = tmp_path / "dedup"
    agent = agents(mosquitto.url, state_dir=state_dir)
    agent.start(timeout=15)
    cmd = make_command("refresh")
    send(observer, cmd)
    assert [expect_ack(observer).state for _ in range(2)] == [AckState.RECEIVED, AckState.SUCCEEDED]
    agent.stop()
    again = agents(mosquitto.url, state_dir=state_dir)
    again.start(timeout=15)
    send(observer, cmd)
    ack = expect_ack(observer)
    assert (ack.id, ack.state) == (cmd.id, AckState.SUCCEEDED)
    assert again.executed[cmd.id] == 0


def test_commands_sent_while_offline_are_delivered_on_return(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    agent.stop()
    # The persistent session keeps the subscription and queues the command for us.
    cmd = make_command("refresh")
    send(observer, cmd)
    back = agents(mosquitto.url)
    back.start(timeout=15)
    acks = [expect_ack(observer) for _ in range(2)]
    assert [(a.id, a.state) for a in acks] == [
        (cmd.id, AckState.RECEIVED),
        (cmd.id, AckState.SUCCEEDED),
    ]
    assert back.executed[cmd.id] == 1


def test_expired_command_is_rejected_and_not_run(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    ran: list[uuid.UUID] = []
    agent = agents(mosquitto.url, handlers={"refresh": lambda cmd: ran.append(cmd.id)})
    agent.start(timeout=15)
    issued = now_ms() - 120_000
    cmd = make_command("refresh", issued_at=issued, expires_at=issued + 60_000)
    send(observer, cmd)
    ack = expect_ack(observer)
    assert (ack.id, ack.state, ack.detail) == (cmd.id, AckState.REJECTED, "expired")
    assert ran == []
    assert agent.executed[cmd.id] == 0


def test_unknown_type_is_rejected(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    cmd = make_command("dance")
    send(observer, cmd)
    ack = expect_ack(observer)
    assert (ack.id, ack.state) == (cmd.id, AckState.REJECTED)
    assert "dance" in (ack.detail or "")
    assert agent.executed[cmd.id] == 0


def test_failing_handler_acks_failed_with_the_message(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    def broken(_cmd: Command) -> None:
        raise RuntimeError("webview crashed")

    agent = agents(mosquitto.url, handlers={"refresh": broken})
    agent.start(timeout=15)
    cmd = make_command("refresh")
    send(observer, cmd)
    acks = [expect_ack(observer) for _ in range(2)]
    assert [(a.state, a.detail) for a in acks] == [
        (AckState.RECEIVED, None),
        (AckState.FAILED, "webview crashed"),
    ]


def test_garbage_on_cmd_is_counted_and_ignored(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    observer.publish(topic(TopicKind.CMD), b'{"id": "not-a-uuid"}', qos=1)
    cmd = make_command("refresh")
    send(observer, cmd)
    # The next ack is for the valid command: nothing answered the garbage.
    assert expect_ack(observer).id == cmd.id
    assert agent.counters["bad_commands"] == 1


def test_wipe_for_another_device_is_rejected_then_a_real_wipe_clears_everything(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient, tmp_path: Path
) -> None:
    state_dir = tmp_path / "wipe-me"
    agent = agents(mosquitto.url, state_dir=state_dir)
    agent.start(timeout=15)
    wrong = make_command("wipe", device_id="lobby-2")
    send(observer, wrong)
    ack = expect_ack(observer)
    assert (ack.id, ack.state) == (wrong.id, AckState.REJECTED)
    assert agent.connected.is_set()
    assert state_dir.exists()

    right = make_command("wipe", device_id=DEVICE, args={"reason": "decommissioned"})
    send(observer, right)
    assert [expect_ack(observer).state for _ in range(2)] == [AckState.RECEIVED, AckState.SUCCEEDED]
    assert agent.wait_stopped(15)
    assert agent.wiped
    assert not state_dir.exists()
    assert agent.executed[right.id] == 1
    assert agent.executed[wrong.id] == 0
    # (expect() skips other topics: the presence history is gone, the retained value not.)
    offline = decode_presence(retained(mosquitto, topic(TopicKind.PRESENCE)).payload)
    assert isinstance(offline, PresenceOffline)
    # KB-CMD-9 (contract 1.1): the CMS sees that the device went because it was wiped.
    assert offline.reason is OfflineReason.WIPE


def test_rotate_token_is_checked_stored_privately_then_acked(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient, tmp_path: Path
) -> None:
    state_dir = tmp_path / "rotating"
    agent = agents(mosquitto.url, state_dir=state_dir, password="first-password")
    agent.start(timeout=15)
    token = "ab" * 32
    # Named for another kiosk: rejected. Naming none: not even a valid command (the model
    # refuses to build it, so the wire form a buggy sender would send): no ack.
    send(observer, make_command("rotate_token", device_id="lobby-2", args={"token": token}))
    assert expect_ack(observer).state is AckState.REJECTED
    unnamed = json.loads(encode(make_command("refresh")))
    unnamed |= {"type": "rotate_token", "args": {"token": token}}
    observer.publish(topic(TopicKind.CMD), json.dumps(unnamed).encode(), qos=1)

    rotate = make_command("rotate_token", device_id=DEVICE, args={"token": token})
    send(observer, rotate)
    # The next acks are this command's: nothing answered the unnamed one.
    assert [expect_ack(observer).state for _ in range(2)] == [AckState.RECEIVED, AckState.SUCCEEDED]
    assert agent.counters["bad_commands"] == 1
    tokens = TokenFile(state_dir)
    assert tokens.load() == token
    assert stat.S_IMODE(tokens.path.stat().st_mode) == 0o600
    # The current connection goes on (the broker switches and cuts it: that, and the
    # reconnect with the new token, is tests/test_security_agent_cli.py on Mosquitto).
    assert agent.connected.is_set()
    assert agent.executed[rotate.id] == 1


def test_reconnect_command_announces_and_returns_with_a_new_session(
    mosquitto: MosquittoProcess, agents: AgentFactory, observer: PahoClient
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    first = agent.session
    assert expect_presence(observer).state == "online"
    cmd = make_command("reconnect", args={"delay_s": 0})
    send(observer, cmd)
    assert [expect_ack(observer).state for _ in range(2)] == [AckState.RECEIVED, AckState.SUCCEEDED]
    offline = expect_presence(observer)
    assert isinstance(offline, PresenceOffline)
    assert (offline.session, offline.reason) == (first, OfflineReason.NETWORK_CHANGE)
    birth = expect_presence(observer)
    assert isinstance(birth, PresenceOnline)
    assert birth.session > first
    assert agent.executed[cmd.id] == 1


def _acks_to(
    mosquitto: MosquittoProcess,
    watch: list[str],
    cmd: Command,
    response_topic: str,
    correlation: bytes,
) -> list[paho.MQTTMessage]:
    """Send ``cmd`` over MQTT 5 with a Response Topic and Correlation Data; return the
    two acks (received, then the result) seen on the ``watch`` filters."""
    got: queue.Queue[paho.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.put(msg)
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.subscribe([(f, 1) for f in watch])
        assert subscribed.wait(10)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        client.publish(topic(TopicKind.CMD), encode(cmd), qos=1, properties=props)
        return [got.get(timeout=15) for _ in range(2)]
    finally:
        client.disconnect()
        client.loop_stop()


def test_ack_goes_to_the_response_topic_with_the_correlation_data(
    mosquitto: MosquittoProcess, agents: AgentFactory
) -> None:
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    reply_to = topic(TopicKind.ACK)
    acks = _acks_to(mosquitto, [reply_to], make_command("refresh"), reply_to, b"req-42")
    assert [decode(Ack, m.payload).state for m in acks] == [AckState.RECEIVED, AckState.SUCCEEDED]
    assert [m.properties.CorrelationData for m in acks] == [b"req-42", b"req-42"]


def test_acks_go_to_the_own_ack_topic_whatever_the_response_topic_says(
    mosquitto: MosquittoProcess, agents: AgentFactory
) -> None:
    # KB-CMD-1 (contract 1.1): the Response Topic is informative; the ACL would refuse
    # an ack anywhere else. The Correlation Data (the command id as 36 bytes of UTF-8
    # text, what the bridge sends) is echoed unchanged.
    agent = agents(mosquitto.url)
    agent.start(timeout=15)
    cmd = make_command("refresh")
    acks = _acks_to(
        mosquitto,
        [topic(TopicKind.ACK), "elsewhere/#"],
        cmd,
        "elsewhere/acks",
        str(cmd.id).encode(),
    )
    assert [m.topic for m in acks] == [topic(TopicKind.ACK)] * 2
    assert [m.properties.CorrelationData for m in acks] == [str(cmd.id).encode()] * 2
    assert len(acks[0].properties.CorrelationData) == 36
    assert agent.counters["response_topic_ignored"] >= 1
