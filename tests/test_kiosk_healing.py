"""The presence healing rule of contract 1.1 (KB-PRES-5 to KB-PRES-7) as a pure function.

1.0 said "re-publish the birth if the retained value is anything other than it"; taken
literally that undoes a clean stop and makes a second birth on every connect. Each case
below is one of the situations the rule has to tell apart.
"""

from __future__ import annotations

import pytest

from bridge.kiosk.healing import SETTLE_S, PresenceValue, Seen, classify_presence
from schemas import OfflineReason, PresenceLost, PresenceOffline, PresenceOnline

SESSION = 1_764_331_200_000


def _birth(session: int = SESSION) -> PresenceOnline:
    return PresenceOnline(session=session, ts=session + 5)


def _offline(
    session: int = SESSION, reason: OfflineReason = OfflineReason.SHUTDOWN
) -> PresenceOffline:
    return PresenceOffline(session=session, ts=session + 9, reason=reason)


@pytest.mark.parametrize(
    ("seen", "live", "expected"),
    [
        # KB-PRES-6: an older session's late Will overwrote the live birth: heal.
        (PresenceLost(session=SESSION - 1), True, Seen.HEAL),
        # Any state of an older session, a delayed old birth or offline included.
        (_offline(SESSION - 7), True, Seen.HEAL),
        (_birth(SESSION - 7), True, Seen.HEAL),
        # The echo of our own birth, live or not.
        (_birth(), True, Seen.OWN_BIRTH),
        (_birth(), False, Seen.OWN_BIRTH),
        # KB-PRES-5: our own offline (its echo after a clean stop) is never healed...
        (_offline(), False, Seen.OWN_END),
        (_offline(reason=OfflineReason.WIPE), False, Seen.OWN_END),
        # ...not even if the kiosk still thought itself live when it arrived.
        (_offline(), True, Seen.OWN_END),
        # Our own session's Will (a takeover of our client id): that session is over.
        (PresenceLost(session=SESSION), True, Seen.OWN_END),
        # After our own offline, an older value changes nothing either.
        (PresenceLost(session=SESSION - 1), False, Seen.NOT_LIVE),
        # A newer session: another client with our id; answering starts a fight.
        (_birth(SESSION + 1), True, Seen.NEWER),
        (PresenceLost(session=SESSION + 1), True, Seen.NEWER),
        # Empty (retained cleared) or not a presence payload: nothing to heal.
        (None, True, Seen.UNREADABLE),
    ],
)
def test_classify_presence(seen: PresenceValue | None, live: bool, expected: Seen) -> None:
    assert classify_presence(seen, SESSION, live=live) is expected


def test_only_an_older_session_of_a_live_session_heals() -> None:
    values: list[PresenceValue | None] = [
        None,
        _birth(SESSION - 1),
        _birth(),
        _birth(SESSION + 1),
        _offline(SESSION - 1),
        _offline(),
        PresenceLost(session=SESSION - 1),
        PresenceLost(session=SESSION),
    ]
    for seen in values:
        for live in (False, True):
            heals = classify_presence(seen, SESSION, live=live) is Seen.HEAL
            older = seen is not None and seen.session < SESSION
            assert heals == (older and live), (seen, live)


def test_the_settle_time_fits_the_conformance_window() -> None:
    # KB-PRES-7: long enough for a reconnect's backlog, short enough that the kit's
    # 5 s for KB-PRES-6 leaves room for the broker and the network.
    assert 0.2 <= SETTLE_S <= 2.0
