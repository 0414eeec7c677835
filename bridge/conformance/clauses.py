"""The clauses the kit checks: ids as in docs/CONTRACT.md, and what each check does."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True, slots=True)
class Clause:
    id: str
    title: str
    how: str
    mandatory: bool = True


@dataclass(frozen=True, slots=True)
class Verdict:
    clause: Clause
    outcome: Outcome
    detail: str

    @property
    def passed(self) -> bool:
        return self.outcome is not Outcome.FAIL


CLAUSES: tuple[Clause, ...] = (
    Clause(
        "KB-CONN-1",
        "client id = device id",
        "every CONNECT seen by the proxy carries the device id as client id; a username, "
        "when sent, is the device id",
    ),
    Clause(
        "KB-CONN-2",
        "persistent session",
        "3.1.1: clean_session=0; MQTT 5: Clean Start 0 and a Session Expiry Interval > 0, "
        "on every CONNECT",
    ),
    Clause(
        "KB-CONN-3",
        "keepalive in range",
        "the keepalive of every CONNECT is within 10..30 s (--keepalive-range)",
    ),
    Clause(
        "KB-PRES-1",
        "Last Will",
        "every CONNECT has a Will on the own presence topic, QoS 1, retained, payload "
        '{"state":"lost","session":S} with S the session the birth then announces',
    ),
    Clause(
        "KB-PRES-2",
        "birth",
        "after each CONNACK the first presence publish is the birth: retained, QoS 1, "
        "valid (schemas.decode_presence), of the Will's session",
    ),
    Clause(
        "KB-PRES-3",
        "new session per connection",
        "each connection's session is strictly larger than the previous one's (the kit "
        "causes several: dropped link, reconnect command, restart, refused attempts)",
    ),
    Clause(
        "KB-PRES-4",
        "clean stop",
        "on SIGTERM: a retained QoS 1 offline with a reason, of the current session, then "
        "a DISCONNECT with reason 0, and the broker publishes no Will",
    ),
    Clause(
        "KB-PRES-5",
        "a clean stop is not healed",
        "after an offline of session S (SIGTERM, reconnect command) the same connection "
        "publishes no online of S, and the retained value after the stop is not an online",
    ),
    Clause(
        "KB-PRES-6",
        "healing",
        "the kit writes a retained lost of an older session over the live birth; the kiosk "
        "re-publishes its birth (current session) within 5 s",
    ),
    Clause(
        "KB-NET-1",
        "kill -9 yields the Will",
        "after SIGKILL of the kiosk's process group the broker publishes the lost of the "
        "current session within 10 s",
    ),
    Clause(
        "KB-NET-2",
        "silent network yields the Will",
        "the proxy stops forwarding (no FIN, no RST); the lost of the current session "
        "comes within 3 x keepalive + 5 s (the broker acts after 1.5 x keepalive, but "
        "checks coarsely under load)",
    ),
    Clause(
        "KB-NET-3",
        "reconnect with backoff and jitter",
        "the link is dropped and every new attempt refused: up to 5 attempts (20 s at "
        "most) are timed. Fails for no attempt, a fixed interval (all delays within +-20% "
        "of their median), a tight loop (3 delays under 50 ms) or shrinking delays (the "
        "later half sums to under a quarter of the earlier half); then the kiosk must "
        "connect again once attempts are let through",
    ),
    Clause(
        "KB-STAT-1",
        "status",
        "every status is retained, valid (schemas.decode_status), of its connection's "
        "session, with seq increasing within the connection; at least one is sent",
    ),
    Clause(
        "KB-CMD-1",
        "commands acknowledged",
        "a refresh gets received, then a result (succeeded/failed/rejected); every ack of "
        "the run is on kiosk/v1/{id}/ack, QoS 1, not retained, with the command's id; on "
        "MQTT 5 it echoes the Correlation Data (the UUID's UTF-8 text)",
    ),
    Clause(
        "KB-CMD-2",
        "re-delivery runs once",
        "the finished refresh is sent again with the same id: it is acknowledged again "
        "with its result, never with a new received (a second execution)",
    ),
    Clause(
        "KB-CMD-3",
        "reconnect honours its delay",
        "reconnect with delay_s=2: succeeded, an offline (network_change), DISCONNECT, and "
        "no new CONNECT before the delay has passed (0.25 s tolerance), one within 20 s",
    ),
    Clause(
        "KB-CMD-4",
        "set_config reported",
        "set_config with a higher version: succeeded, and a status with that "
        "config_version within 5 s",
    ),
    Clause(
        "KB-CMD-5",
        "foreign wipe refused",
        "wipe carrying another device's id: rejected, without received",
    ),
    Clause(
        "KB-CMD-6",
        "rotate_token adopted",
        "rotate_token: succeeded; the kit then drops the link (as the broker does when it "
        "switches tokens) and the next CONNECT's password is the new token (read on the "
        "wire, so this works on the kit's open broker)",
    ),
    Clause(
        "KB-CMD-7",
        "expired command not run",
        "a refresh whose expires_at has passed: rejected, without received",
    ),
    Clause(
        "KB-CMD-8",
        "unknown type refused",
        "a command of an unknown type: rejected, without received",
    ),
)

BY_ID: dict[str, Clause] = {clause.id: clause for clause in CLAUSES}


def help_text() -> str:
    """One paragraph per clause, for ``kiosk-bridge conformance --help``."""
    return "\n\n".join(f"{c.id} ({c.title}): {c.how}." for c in CLAUSES)
