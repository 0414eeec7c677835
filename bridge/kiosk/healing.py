"""The presence healing rule of contract 1.1 (KB-PRES-5, KB-PRES-6), as a pure function.

A kiosk watches its own retained presence. The one thing worth answering there is a
value of an **older** session that arrived while this session is live: typically the
late Last Will of a connection that died before this one, which overwrote the birth.
Re-publishing the birth puts the retained truth right for whoever reads it next.

Everything else is left alone, which is what 1.0's "anything other than my birth" got
wrong: the kiosk's own announced ``offline`` (healing it would undo a clean stop and
leave a finished session's birth retained), the echo of its own birth, the previous
session's end replayed when a kiosk subscribes before publishing its birth (answering
it is a second birth on every connect), a newer session's value (another client with
this id: answering would start a fight), and an empty or unreadable payload.
"""

from __future__ import annotations

import enum

from schemas import PresenceLost, PresenceOffline, PresenceOnline

PresenceValue = PresenceOnline | PresenceOffline | PresenceLost


class Seen(enum.Enum):
    """What a value on the kiosk's own presence topic is, and whether to answer it."""

    #: Our own birth coming back (the echo, or the retained replay after subscribing).
    OWN_BIRTH = "own_birth"
    #: An offline or Will of the current session: the session is over, nothing to heal.
    OWN_END = "own_end"
    #: Seen before our birth was in place (a subscribe-first kiosk's replay of the
    #: previous session's end): the birth that follows replaces it anyway.
    BEFORE_BIRTH = "before_birth"
    #: The session is not live any more (we announced offline, or are stopping).
    NOT_LIVE = "not_live"
    #: A newer session than ours: another client uses this device id.
    NEWER = "newer"
    #: Empty (retained value cleared) or not a presence payload.
    UNREADABLE = "unreadable"
    #: An older session's value overwrote our birth: re-publish the birth (KB-PRES-6).
    HEAL = "heal"


def classify_presence(
    seen: PresenceValue | None, session: int, *, live: bool, birth_in_place: bool
) -> Seen:
    """Classify a value received on the kiosk's own presence topic.

    ``session`` is the current connection's; ``live`` is true from the birth's publish
    until the kiosk announces ``offline`` (or starts stopping); ``birth_in_place`` is
    true once anything received can only have been published after the birth: at once
    for a kiosk that publishes its birth before subscribing (the broker handles one
    client's packets in order), else from the echo of its own birth on.
    """
    if seen is None:
        return Seen.UNREADABLE
    if seen.session == session:
        return Seen.OWN_BIRTH if isinstance(seen, PresenceOnline) else Seen.OWN_END
    if seen.session > session:
        return Seen.NEWER
    if not live:
        return Seen.NOT_LIVE
    if not birth_in_place:
        return Seen.BEFORE_BIRTH
    return Seen.HEAL
