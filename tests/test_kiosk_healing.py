"""The presence healing rule of contract 1.1 (KB-PRES-5, KB-PRES-6) as a pure function.

1.0 said "re-publish the birth if the retained value is anything other than it"; taken
literally that undoes a clean stop and makes a second birth on every connect. Each case
below is one of the situations the rule has to tell apart.
"""

from __future__ import annotations

import pytest

from bridge.kiosk.healing import PresenceValue, Seen, classify_presence
from schemas import OfflineReason, PresenceLost, PresenceOffline, PresenceOnline

SESSION = 1_764_331_200_000


def _birth(session: int = SESSION) -> PresenceOnline:
    return PresenceOnline(session=session, ts=session + 5)


def _offline(
    session: int = SESSION, reason: OfflineReason = OfflineReason.SHUTDOWN
) -> PresenceOffline:
    return PresenceOffline(session=session, ts=session + 9, reason=reason)


@pytest.mark.parametrize(
    ("seen", "live", "in_place", "expected"),
    [
        # KB-PRES-6: an older session's late Will overwrote the live birth: heal.
        (PresenceLost(session=SESSION - 1), True, True, Seen.HEAL),
        # Any state of an older session, a delayed old birth or offline included.
        (_offline(SESSION - 7), True, True, Seen.HEAL),
        (_birth(SESSION - 7), True, True, Seen.HEAL),
        # The echo of our own birth, live or not, before or after it is in place.
        (_birth(), True, True, Seen.OWN_BIRTH),
        (_birth(), True, False, Seen.OWN_BIRTH),
        (_birth(), False, True, Seen.OWN_BIRTH),
        # KB-PRES-5: our own offline (its echo after a clean stop) is never healed...
        (_offline(), False, True, Seen.OWN_END),
        (_offline(reason=OfflineReason.WIPE), False, True, Seen.OWN_END),
        # ...not even if the kiosk still thought itself live when it arrived.
        (_offline(), True, True, Seen.OWN_END),
        # Our own session's Will (a takeover of our client id): that session is over.
        (PresenceLost(session=SESSION), True, True, Seen.OWN_END),
        # After our own offline, an older value changes nothing either.
        (PresenceLost(session=SESSION - 1), False, True, Seen.NOT_LIVE),
        # A subscribe-first kiosk's replay of the previous session's end: the birth that
        # follows replaces it, so answering would be a second birth.
        (PresenceLost(session=SESSION - 1), True, False, Seen.BEFORE_BIRTH),
        (_offline(SESSION - 1), True, False, Seen.BEFORE_BIRTH),
        # A newer session: another client with our id; answering starts a fight.
        (_birth(SESSION + 1), True, True, Seen.NEWER),
        (PresenceLost(session=SESSION + 1), True, True, Seen.NEWER),
        # Empty (retained cleared) or not a presence payload: nothing to heal.
        (None, True, True, Seen.UNREADABLE),
    ],
)
def test_classify_presence(
    seen: PresenceValue | None, live: bool, in_place: bool, expected: Seen
) -> None:
    assert classify_presence(seen, SESSION, live=live, birth_in_place=in_place) is expected


def test_only_an_older_session_of_a_live_session_with_its_birth_in_place_heals() -> None:
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
            for in_place in (False, True):
                heals = (
                    classify_presence(seen, SESSION, live=live, birth_in_place=in_place)
                    is Seen.HEAL
                )
                older = seen is not None and seen.session < SESSION
                assert heals == (older and live and in_place), (seen, live, in_place)
