"""Clause verdicts from recorded observations: pure functions, no I/O, no clock."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bridge.conformance.clauses import BY_ID, CLAUSES, Outcome, Verdict
from bridge.conformance.observations import LinkRecord, Observations
from bridge.conformance.wire import Connect, Publish
from schemas import (
    Ack,
    AckState,
    ContractError,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    decode,
    decode_presence,
    device_topic,
)
from schemas.codec import PresenceMessage

FINAL_STATES = frozenset({AckState.SUCCEEDED, AckState.FAILED, AckState.REJECTED})
BIRTH_WINDOW_S = 5.0
HEAL_WINDOW_S = 5.0
KILL_WINDOW_S = 10.0
#: The broker should act after 1.5 x keepalive; Mosquitto 2 under load was seen taking
#: up to 4.5 x a 2 s keepalive, so the kit allows 3 x keepalive + this margin.
SILENT_MARGIN_S = 5.0
RECONNECT_TOLERANCE_S = 0.25
RECONNECT_WITHIN_S = 20.0
CONFIG_WINDOW_S = 5.0


class _Fail(Exception):
    """Raised inside a check: the clause fails with this text."""


@dataclass(frozen=True, slots=True)
class AckSeen:
    t: float
    link: LinkRecord
    publish: Publish
    ack: Ack


def _topic(device_id: str, kind: TopicKind) -> str:
    return device_topic(device_id, kind)


def _presence(payload: bytes) -> PresenceMessage | None:
    try:
        return decode_presence(payload)
    except ContractError:
        return None


def will_session(link: LinkRecord) -> int | None:
    if link.connect is None or link.connect.will is None:
        return None
    seen = _presence(link.connect.will.payload)
    return seen.session if isinstance(seen, PresenceLost) else None


def births(link: LinkRecord) -> list[tuple[float, Publish, PresenceOnline]]:
    topic = _topic(link.device_id, TopicKind.PRESENCE)
    found = []
    for t, pub in link.publishes:
        seen = _presence(pub.payload) if pub.topic == topic else None
        if isinstance(seen, PresenceOnline):
            found.append((t, pub, seen))
    return found


def offlines(link: LinkRecord) -> list[tuple[float, Publish, PresenceOffline]]:
    topic = _topic(link.device_id, TopicKind.PRESENCE)
    found = []
    for t, pub in link.publishes:
        seen = _presence(pub.payload) if pub.topic == topic else None
        if isinstance(seen, PresenceOffline):
            found.append((t, pub, seen))
    return found


def link_session(link: LinkRecord) -> int | None:
    """The connection's session: its Will's, else its first birth's."""
    session = will_session(link)
    if session is not None:
        return session
    born = births(link)
    return born[0][2].session if born else None


def acks(obs: Observations, device_id: str) -> list[AckSeen]:
    """Every ack the kiosk published, on whatever topic."""
    skip = {_topic(device_id, TopicKind.PRESENCE), _topic(device_id, TopicKind.STATUS)}
    found = []
    for link in obs.device_links(device_id):
        for t, pub in link.publishes:
            if pub.topic in skip:
                continue
            try:
                ack = decode(Ack, pub.payload)
            except ContractError:
                continue
            found.append(AckSeen(t, link, pub, ack))
    return sorted(found, key=lambda a: a.t)


def _acks_for(obs: Observations, purpose: str, after: float | None = None) -> list[AckSeen]:
    sent = obs.commands.get(purpose)
    if sent is None:
        raise _Fail(obs.skipped.get(purpose, f"not checked: the {purpose} command was not sent"))
    since = sent.sent_t if after is None else after
    return [
        a for a in acks(obs, obs.device_id) if str(a.ack.id) == sent.command_id and a.t >= since
    ]


def _states(found: list[AckSeen]) -> str:
    return ", ".join(a.ack.state.value for a in found) or "no ack"


def _end(obs: Observations) -> float:
    times = [m.t for m in obs.broker_messages]
    for link in obs.links:
        times += [link.opened_t] + [t for t, _ in link.publishes]
        times += [t for t in (link.closed_t, link.connect_t, link.connack_t) if t is not None]
    return max(times, default=0.0)


def _active_at(obs: Observations, device_id: str, t: float) -> LinkRecord | None:
    """The accepted connection open at ``t`` (the newest one)."""
    found = None
    for link in obs.device_links(device_id):
        began = link.accepted and link.connect_t is not None and link.connect_t <= t
        if began and (link.closed_t is None or link.closed_t >= t):
            found = link
    return found


def _accepted(obs: Observations, device_id: str) -> list[LinkRecord]:
    return [link for link in obs.device_links(device_id) if link.accepted]


def _both(obs: Observations) -> Iterator[LinkRecord]:
    for device in (obs.device_id, obs.second_device_id):
        yield from obs.device_links(device)


def _connects(obs: Observations) -> list[tuple[LinkRecord, Connect]]:
    """Every link of both kiosks that carried a CONNECT, with it; none is a failure."""
    found = [(link, link.connect) for link in _both(obs) if link.connect is not None]
    if not found:
        raise _Fail("no CONNECT seen")
    return found


def _lost_after(obs: Observations, device_id: str, session: int, t: float) -> float | None:
    topic = _topic(device_id, TopicKind.PRESENCE)
    for msg in obs.broker_messages:
        if msg.topic == topic and msg.t >= t:
            seen = _presence(msg.payload)
            if isinstance(seen, PresenceLost) and seen.session == session:
                return msg.t
    return None


def _presence_after(obs: Observations, device_id: str, t: float) -> str:
    topic = _topic(device_id, TopicKind.PRESENCE)
    seen = [m.payload.decode(errors="replace") for m in obs.broker_messages if m.topic == topic]
    later = [m for m, msg in zip(seen, obs.broker_messages, strict=False) if msg.t >= t]
    return "; ".join(later[-3:]) or "no presence message"


# -- connecting ------------------------------------------------------------------------------


def check_conn_1(obs: Observations) -> str:
    links = _connects(obs)
    for link, connect in links:
        if connect.client_id != link.device_id:
            raise _Fail(f"client id {connect.client_id!r}, not {link.device_id!r}")
        if connect.username is not None and connect.username != link.device_id:
            raise _Fail(f"username {connect.username!r}, not {link.device_id!r}")
    return f"{len(links)} CONNECTs"


def check_conn_2(obs: Observations) -> str:
    links = _connects(obs)
    for link, connect in links:
        if connect.protocol_level not in (4, 5):
            raise _Fail(f"protocol level {connect.protocol_level} (3.1.1 or 5 required)")
        if connect.clean:
            name = "Clean Start=1" if connect.v5 else "clean_session=1"
            raise _Fail(f"{name} on CONNECT {link.number}")
        if connect.v5 and not connect.session_expiry:
            raise _Fail(
                f"MQTT 5 CONNECT {link.number} without a Session Expiry Interval > 0 "
                "(the session ends with the connection)"
            )
    return f"{len(links)} CONNECTs persistent"


def check_conn_3(obs: Observations) -> str:
    low, high = obs.keepalive_range
    values = sorted({link.connect.keepalive for link in _both(obs) if link.connect is not None})
    if not values:
        raise _Fail("no CONNECT seen")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise _Fail(f"keepalive {bad[0]} s, outside {low}..{high} s")
    return f"keepalive {', '.join(map(str, values))} s"


# -- presence --------------------------------------------------------------------------------


def check_pres_1(obs: Observations) -> str:
    links = _connects(obs)
    for link, connect in links:
        will = connect.will
        if will is None:
            raise _Fail(f"CONNECT {link.number} has no Will")
        topic = _topic(link.device_id, TopicKind.PRESENCE)
        if will.topic != topic:
            raise _Fail(f"Will on {will.topic!r}, not {topic!r}")
        if will.qos != 1:
            raise _Fail(f"Will QoS {will.qos}, not 1")
        if not will.retain:
            raise _Fail("Will not retained")
        seen = _presence(will.payload)
        if not isinstance(seen, PresenceLost):
            raise _Fail(f"Will payload {will.payload[:120]!r} is not a valid lost")
        born = births(link)
        if born and born[0][2].session != seen.session:
            raise _Fail(f"Will session {seen.session}, birth session {born[0][2].session}")
    return f"{len(links)} Wills, retained QoS 1, of the current session"


def check_pres_2(obs: Observations) -> str:
    end = _end(obs)
    count = 0
    for link in _both(obs):
        if not link.accepted or link.connack_t is None:
            continue
        topic = _topic(link.device_id, TopicKind.PRESENCE)
        first = next(((t, p) for t, p in link.publishes if p.topic == topic), None)
        if first is None:
            lived = (link.closed_t if link.closed_t is not None else end) - link.connack_t
            if lived >= BIRTH_WINDOW_S:
                raise _Fail(f"no birth on connection {link.number} in {lived:.1f} s")
            continue
        t, pub = first
        if t < link.connack_t:
            raise _Fail("presence published before CONNACK")
        seen = _presence(pub.payload)
        if not isinstance(seen, PresenceOnline):
            raise _Fail(f"first presence publish is not a valid birth: {pub.payload[:120]!r}")
        if not pub.retain or pub.qos != 1:
            raise _Fail(f"birth retain={int(pub.retain)} QoS {pub.qos} (retained QoS 1 needed)")
        will = will_session(link)
        if will is not None and seen.session != will:
            raise _Fail(f"birth session {seen.session}, Will session {will}")
        count += 1
    if not count:
        raise _Fail("no accepted connection with a birth")
    return f"{count} births"


def check_pres_3(obs: Observations) -> str:
    count = 0
    for device in (obs.device_id, obs.second_device_id):
        previous: int | None = None
        for link in sorted(_accepted(obs, device), key=lambda li: li.connect_t or 0.0):
            session = link_session(link)
            if session is None:
                continue
            count += 1
            if previous is not None and session <= previous:
                raise _Fail(f"{device}: session {session} after session {previous}")
            previous = session
    if count < 2:
        raise _Fail(f"only {count} connection(s) with a session seen")
    return f"{count} connections, sessions strictly increasing"


def check_pres_4(obs: Observations) -> str:
    if obs.sigterm_t is None:
        raise _Fail(obs.skipped.get("sigterm", "not checked: SIGTERM was not sent"))
    link = _active_at(obs, obs.device_id, obs.sigterm_t)
    if link is None:
        raise _Fail("no connection open at SIGTERM")
    session = link_session(link)
    sent = [o for o in offlines(link) if o[0] >= obs.sigterm_t]
    if not sent:
        raise _Fail("no offline published after SIGTERM")
    t, pub, offline = sent[0]
    if not pub.retain or pub.qos != 1:
        raise _Fail(f"offline retain={int(pub.retain)} QoS {pub.qos} (retained QoS 1 needed)")
    if offline.session != session:
        raise _Fail(f"offline of session {offline.session}, current is {session}")
    if link.disconnect is None or link.disconnect_t is None or link.disconnect_t < t:
        raise _Fail("no DISCONNECT after the offline (the connection was just closed)")
    if link.connect is not None and link.connect.v5 and link.disconnect.reason_code != 0:
        raise _Fail(f"DISCONNECT reason code {link.disconnect.reason_code}, not 0")
    will_t = _lost_after(obs, obs.device_id, session, obs.sigterm_t) if session else None
    # Until the kit looked (later, a restart reusing the session may die with its Will).
    if will_t is not None and (obs.stop_checked_t is None or will_t <= obs.stop_checked_t):
        raise _Fail("the broker published the Will after the clean stop")
    if obs.stop_exited is None:
        raise _Fail("announced offline but did not exit within 10 s of SIGTERM")
    return f"offline ({offline.reason.value}), DISCONNECT, no Will, exit {obs.stop_exited}"


def check_pres_5(obs: Observations) -> str:
    checked = 0
    for device in (obs.device_id, obs.second_device_id):
        for link in obs.device_links(device):
            for t_off, _pub, off in offlines(link):
                checked += 1
                # Within the connection: a later connection reusing the session is
                # KB-PRES-3's failure, not a healed stop.
                for t_on, _p, on in births(link):
                    if t_on > t_off and on.session == off.session:
                        raise _Fail(
                            f"online of session {on.session} re-published "
                            f"{t_on - t_off:.2f} s after its own offline"
                        )
    if obs.stop_retained is not None:
        seen = _presence(obs.stop_retained)
        if isinstance(seen, PresenceOnline):
            raise _Fail(
                f"retained presence after the clean stop is online (session {seen.session})"
            )
    if not checked:
        raise _Fail(obs.skipped.get("sigterm", "no offline was published, nothing to check"))
    return f"{checked} offline(s), none healed"


def check_pres_6(obs: Observations) -> str:
    if obs.heal_injected_t is None:
        raise _Fail(obs.skipped.get("heal", "not checked: nothing was injected"))
    link = _active_at(obs, obs.device_id, obs.heal_injected_t)
    if link is None:
        raise _Fail("no connection open when the stale lost was written")
    session = link_session(link)
    for t, pub, birth in births(link):
        if t >= obs.heal_injected_t and birth.session == session:
            if t - obs.heal_injected_t > HEAL_WINDOW_S:
                break
            if not pub.retain or pub.qos != 1:
                raise _Fail(f"re-birth retain={int(pub.retain)} QoS {pub.qos}")
            return f"birth re-published after {t - obs.heal_injected_t:.2f} s"
    raise _Fail(
        f"no birth re-published within {HEAL_WINDOW_S:g} s of a retained lost of session "
        f"{obs.heal_injected_session}"
    )


# -- network ---------------------------------------------------------------------------------


def check_net_1(obs: Observations) -> str:
    if obs.kill_t is None:
        raise _Fail(obs.skipped.get("kill", "not checked: the kiosk was not killed"))
    link = _active_at(obs, obs.device_id, obs.kill_t)
    session = link_session(link) if link is not None else None
    if session is None:
        raise _Fail("no connection with a session open at kill -9")
    t = _lost_after(obs, obs.device_id, session, obs.kill_t)
    if t is None or t - obs.kill_t > KILL_WINDOW_S:
        seen = _presence_after(obs, obs.device_id, obs.kill_t)
        raise _Fail(f"no lost of session {session} within {KILL_WINDOW_S:g} s; seen: {seen}")
    return f"Will after {t - obs.kill_t:.2f} s"


def check_net_2(obs: Observations) -> str:
    device = obs.second_device_id
    if obs.blackhole_t is None:
        raise _Fail(obs.skipped.get("blackhole", "not checked: the network was not silenced"))
    link = _active_at(obs, device, obs.blackhole_t)
    session = link_session(link) if link is not None else None
    if link is None or link.connect is None or session is None:
        raise _Fail("no connection with a session open when the network went silent")
    limit = 3.0 * link.connect.keepalive + SILENT_MARGIN_S
    t = _lost_after(obs, device, session, obs.blackhole_t)
    if t is None:
        seen = _presence_after(obs, device, obs.blackhole_t)
        raise _Fail(f"no lost of session {session}; seen: {seen}")
    delay = t - obs.blackhole_t
    if delay > limit:
        raise _Fail(f"Will after {delay:.1f} s, limit {limit:.1f} s")
    return f"Will after {delay:.1f} s (limit {limit:.1f} s)"


def backoff_problem(gaps: list[float]) -> str | None:
    """Why these reconnect delays are no backoff with jitter (None: they are)."""
    if not gaps:
        return "no reconnection attempt"
    shown = ", ".join(f"{g:.2f}" for g in gaps)
    if len(gaps) >= 3:
        tight = any(all(g < 0.05 for g in gaps[i : i + 3]) for i in range(len(gaps) - 2))
        if tight:
            return f"tight reconnect loop: delays {shown} s"
        median = statistics.median(gaps)
        if median > 0 and all(abs(g - median) <= 0.2 * median for g in gaps):
            return f"fixed interval, no backoff or jitter: delays {shown} s"
    if len(gaps) >= 4:
        half = len(gaps) // 2
        earlier, later = sum(gaps[:half]), sum(gaps[half:])
        if later < 0.25 * earlier:
            return f"delays shrink: {shown} s"
    return None


def check_net_3(obs: Observations) -> str:
    if obs.backoff_drop_t is None:
        raise _Fail(obs.skipped.get("backoff", "not checked: the link was not dropped"))
    times = [obs.backoff_drop_t, *sorted(obs.backoff_attempts)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    problem = backoff_problem(gaps)
    if problem is not None:
        raise _Fail(problem)
    if obs.backoff_restore_t is None:
        raise _Fail("not checked: attempts were never let through")
    back = [
        link
        for link in _accepted(obs, obs.second_device_id)
        if link.connect_t is not None and link.connect_t >= obs.backoff_restore_t
    ]
    if not back:
        raise _Fail("did not connect again after attempts were let through")
    shown = ", ".join(f"{g:.2f}" for g in gaps)
    return f"delays {shown} s; back after the network returned"


# -- status ----------------------------------------------------------------------------------


def check_stat_1(obs: Observations) -> str:
    count = 0
    for link in _both(obs):
        topic = _topic(link.device_id, TopicKind.STATUS)
        session = link_session(link)
        last_seq: int | None = None
        for _t, pub in link.publishes:
            if pub.topic != topic:
                continue
            try:
                status = decode(Status, pub.payload)
            except ContractError as exc:
                raise _Fail(f"invalid status: {exc}") from None
            if not pub.retain:
                raise _Fail("status not retained")
            if session is not None and status.session != session:
                raise _Fail(f"status of session {status.session} on a connection of {session}")
            if last_seq is not None and status.seq <= last_seq:
                raise _Fail(f"seq {status.seq} after {last_seq} in one session")
            last_seq = status.seq
            count += 1
    if not count:
        raise _Fail("no status published")
    return f"{count} statuses"


# -- commands --------------------------------------------------------------------------------


def check_cmd_1(obs: Observations) -> str:
    found = _acks_for(obs, "refresh")
    sent = obs.commands["refresh"]
    again = obs.commands.get("redelivery")
    if again is not None:
        found = [a for a in found if a.t < again.sent_t]
    if not found:
        raise _Fail("refresh not acknowledged")
    if found[0].ack.state is not AckState.RECEIVED:
        raise _Fail(f"first ack {found[0].ack.state.value}, not received")
    if not any(a.ack.state in FINAL_STATES for a in found[1:]):
        raise _Fail(f"no result after received (acks: {_states(found)})")
    topic = _topic(obs.device_id, TopicKind.ACK)
    for a in acks(obs, obs.device_id):
        if a.publish.topic != topic:
            raise _Fail(f"ack on {a.publish.topic!r}, not {topic!r}")
        if a.publish.qos != 1 or a.publish.retain:
            raise _Fail(
                f"ack QoS {a.publish.qos} retain={int(a.publish.retain)} (QoS 1, not retained)"
            )
    correlation = "no correlation (MQTT 3.1.1)"
    v5 = [a for a in found if a.link.connect is not None and a.link.connect.v5]
    if sent.correlated and v5:
        expected = sent.command_id.encode()
        for a in v5:
            if a.publish.correlation_data != expected:
                raise _Fail(
                    f"correlation data {a.publish.correlation_data!r}, expected {expected!r}"
                )
        correlation = "correlation data echoed"
    return f"{_states(found)} on the ack topic; {correlation}"


def check_cmd_2(obs: Observations) -> str:
    again = obs.commands.get("redelivery")
    if again is None:
        raise _Fail(obs.skipped.get("redelivery", "not checked: no re-delivery was sent"))
    found = _acks_for(obs, "refresh", after=again.sent_t)
    if not found:
        raise _Fail("re-delivered command not acknowledged again")
    if any(a.ack.state is AckState.RECEIVED for a in found):
        raise _Fail(f"executed again: acks after the re-delivery: {_states(found)}")
    return f"acked again ({_states(found)}), not re-run"


def _refused(obs: Observations, purpose: str) -> str:
    found = _acks_for(obs, purpose)
    if not found:
        raise _Fail("not acknowledged (rejected expected)")
    states = {a.ack.state for a in found}
    if states & {AckState.RECEIVED, AckState.SUCCEEDED}:
        raise _Fail(f"executed: acks {_states(found)}")
    if AckState.REJECTED not in states:
        raise _Fail(f"acks {_states(found)}, not rejected")
    detail = next((a.ack.detail for a in found if a.ack.detail), None)
    return "rejected" + (f" ({detail})" if detail else "")


def check_cmd_3(obs: Observations) -> str:
    found = _acks_for(obs, "reconnect")
    sent = obs.commands["reconnect"]
    if not any(a.ack.state is AckState.SUCCEEDED for a in found):
        raise _Fail(f"not succeeded (acks: {_states(found)})")
    link = _active_at(obs, obs.device_id, sent.sent_t)
    if link is None:
        raise _Fail("no connection open when reconnect was sent")
    announced = [o for o in offlines(link) if o[0] >= sent.sent_t]
    if not announced:
        raise _Fail("no offline announced before leaving")
    if announced[0][2].reason.value != "network_change":
        raise _Fail(f"offline reason {announced[0][2].reason.value}, not network_change")
    left = link.disconnect_t if link.disconnect_t is not None else link.closed_t
    if left is None:
        raise _Fail("did not disconnect")
    nxt = [
        li
        for li in obs.device_links(obs.device_id)
        if li.connect_t is not None and li.connect_t > left
    ]
    if not nxt or nxt[0].connect_t is None:
        raise _Fail("did not connect again")
    gap = nxt[0].connect_t - left
    if gap < obs.reconnect_delay_s - RECONNECT_TOLERANCE_S:
        raise _Fail(f"connected again after {gap:.2f} s, delay_s was {obs.reconnect_delay_s:g}")
    if gap > obs.reconnect_delay_s + RECONNECT_WITHIN_S:
        raise _Fail(f"connected again only after {gap:.1f} s")
    return f"back after {gap:.2f} s (delay_s {obs.reconnect_delay_s:g})"


def check_cmd_4(obs: Observations) -> str:
    found = _acks_for(obs, "set_config")
    sent = obs.commands["set_config"]
    if not any(a.ack.state is AckState.SUCCEEDED for a in found):
        raise _Fail(f"not succeeded (acks: {_states(found)})")
    topic = _topic(obs.device_id, TopicKind.STATUS)
    reported = []
    for link in obs.device_links(obs.device_id):
        for t, pub in link.publishes:
            if pub.topic == topic and t >= sent.sent_t:
                try:
                    reported.append((t, decode(Status, pub.payload).config_version))
                except ContractError:
                    continue
    for t, version in sorted(reported, key=lambda r: r[0]):
        if version == obs.config_version and t - sent.sent_t <= CONFIG_WINDOW_S:
            return f"config_version {version} reported after {t - sent.sent_t:.2f} s"
    versions = sorted({v for _, v in reported}, key=str)
    raise _Fail(
        f"no status with config_version {obs.config_version} within {CONFIG_WINDOW_S:g} s "
        f"(seen: {versions or 'no status'})"
    )


def check_cmd_5(obs: Observations) -> str:
    return _refused(obs, "foreign_wipe")


def check_cmd_6(obs: Observations) -> str:
    found = _acks_for(obs, "rotate_token")
    if not any(a.ack.state is AckState.SUCCEEDED for a in found):
        raise _Fail(f"not succeeded (acks: {_states(found)})")
    if obs.rotate_drop_t is None or obs.rotate_token is None:
        raise _Fail(obs.skipped.get("rotate_drop", "not checked: the link was not dropped"))
    nxt = [
        li
        for li in obs.device_links(obs.device_id)
        if li.connect is not None and li.connect_t is not None and li.connect_t > obs.rotate_drop_t
    ]
    if not nxt or nxt[0].connect is None:
        raise _Fail("did not connect again after the rotation")
    password = nxt[0].connect.password
    if password != obs.rotate_token.encode():
        shown = "no password" if password is None else "another password"
        raise _Fail(f"next CONNECT has {shown}, not the new token")
    return "next CONNECT uses the new token"


def check_cmd_7(obs: Observations) -> str:
    return _refused(obs, "expired")


def check_cmd_8(obs: Observations) -> str:
    return _refused(obs, "unknown")


CHECKS: dict[str, Callable[[Observations], str]] = {
    "KB-CONN-1": check_conn_1,
    "KB-CONN-2": check_conn_2,
    "KB-CONN-3": check_conn_3,
    "KB-PRES-1": check_pres_1,
    "KB-PRES-2": check_pres_2,
    "KB-PRES-3": check_pres_3,
    "KB-PRES-4": check_pres_4,
    "KB-PRES-5": check_pres_5,
    "KB-PRES-6": check_pres_6,
    "KB-NET-1": check_net_1,
    "KB-NET-2": check_net_2,
    "KB-NET-3": check_net_3,
    "KB-STAT-1": check_stat_1,
    "KB-CMD-1": check_cmd_1,
    "KB-CMD-2": check_cmd_2,
    "KB-CMD-3": check_cmd_3,
    "KB-CMD-4": check_cmd_4,
    "KB-CMD-5": check_cmd_5,
    "KB-CMD-6": check_cmd_6,
    "KB-CMD-7": check_cmd_7,
    "KB-CMD-8": check_cmd_8,
}


def judge(obs: Observations, only: frozenset[str] | None = None) -> list[Verdict]:
    """A verdict for every clause (those outside ``only`` are not applicable)."""
    verdicts = []
    for clause in CLAUSES:
        if only is not None and clause.id not in only:
            verdicts.append(Verdict(clause, Outcome.NOT_APPLICABLE, "not selected"))
            continue
        try:
            detail = CHECKS[clause.id](obs)
        except _Fail as failure:
            verdicts.append(Verdict(clause, Outcome.FAIL, str(failure)))
        else:
            verdicts.append(Verdict(clause, Outcome.PASS, detail))
    return verdicts


__all__ = ["BY_ID", "CHECKS", "backoff_problem", "judge"]
