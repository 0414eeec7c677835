"""The presence healing rule of contract 1.1 (KB-PRES-5 to KB-PRES-7), as a pure function.

A kiosk watches its own retained presence. The broker keeps one topic's messages in
order, so the last value the kiosk has received there is what the broker retains now.
The one thing worth answering is that last value being of an **older** session while
this session is live: typically the late Last Will of a connection that died before
this one, which overwrote the birth. Re-publishing the birth puts the retained truth
right for whoever reads it next.

Only the last value counts, and only once it has stood for a moment (``SETTLE_S``):
right after CONNACK the backlog of the persistent session arrives first (the old
connection's subscription outlives it, so its own Will waits there), and a kiosk that
subscribes before publishing its birth is first sent the previous session's end. Both
are followed within milliseconds by the kiosk's own birth, and answering them would be
a second birth on every connect, which 1.0's "anything other than my birth" caused.

Never answered: the kiosk's own announced ``offline`` (healing it would undo a clean
stop and leave a finished session's birth retained), the echo of its own birth, a newer
session's value (another client with this id: answering would start a fight), and an
empty or unreadable payload.
"""

from __future__ import annotations

import enum
from typing import Final

from schemas import PresenceLost, PresenceOffline, PresenceOnline

PresenceValue = PresenceOnline | PresenceOffline | PresenceLost

#: How long an older session's value must stay the last one seen before the birth is
#: re-published (KB-PRES-7): long enough for a reconnect's backlog, well inside the
#: 5 s a conformance run allows.
SETTLE_S: Final = 1.0


class Seen(enum.Enum):
    """What the last value on the kiosk's own presence topic is, and whether to answer."""

    #: Our own birth (its echo, or the retained replay after subscribing).
    OWN_BIRTH = "own_birth"
    #: An offline or Will of the current session: the session is over, nothing to heal.
    OWN_END = "own_end"
    #: The session is not live any more (we announced offline, or are stopping).
    NOT_LIVE = "not_live"
    #: A newer session than ours: another client uses this device id.
    NEWER = "newer"
    #: Empty (retained value cleared) or not a presence payload.
    UNREADABLE = "unreadable"
    #: An older session's value overwrote our birth: re-publish the birth (KB-PRES-6).
    HEAL = "heal"


def classify_presence(seen: PresenceValue | None, session: int, *, live: bool) -> Seen:
    """Classify the value that has stood last on the kiosk's own presence topic for
    ``SETTLE_S``; ``session`` is the current connection's, ``live`` is true from the
    birth's publish until the kiosk announces ``offline`` (or starts stopping)."""
    if seen is None:
        return Seen.UNREADABLE
    if seen.session == session:
        return Seen.OWN_BIRTH if isinstance(seen, PresenceOnline) else Seen.OWN_END
    if seen.session > session:
        return Seen.NEWER
    if not live:
        return Seen.NOT_LIVE
    return Seen.HEAL
