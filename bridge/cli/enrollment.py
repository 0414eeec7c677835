"""``simulate --enroll`` and ``kiosk --enroll``: give kiosks their own credential on the
secure embedded broker of a local ``kiosk-bridge run``, as ``device enroll`` does.

The embedded broker checks device passwords against the bridge's database, so enrolling
is a row per device there (``SecurityStore.enroll``) with a fresh token each; the caller
hands the tokens to its kiosks. Mosquitto keeps credentials in its own plugin: there,
``kiosk-bridge device enroll`` is the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bridge.cli.preflight import PreflightError, check_database
from bridge.exit_codes import ExitCode

if TYPE_CHECKING:
    from bridge.settings import Settings

ENROLL_HELP = (
    "Enroll the kiosk(s) first, each with a fresh token of its own, in the database of "
    "the local `kiosk-bridge run` (--db / KB_DB): what its secure embedded broker needs. "
    "For Mosquitto use `kiosk-bridge device enroll`"
)


def enroll_on_embedded(
    settings: Settings, device_ids: Sequence[str], *, requested_by: str
) -> dict[str, str]:
    """A fresh token per device, recorded as ``device enroll`` records it; raises
    :class:`PreflightError` when the settings do not describe an embedded broker."""
    if settings.broker is not None:
        raise PreflightError(
            "--enroll is for the embedded broker, but KB_BROKER names an external one",
            ExitCode.USAGE,
            "enroll on Mosquitto with `kiosk-bridge device enroll`, or unset KB_BROKER",
        )
    check_database(settings.db, create=False)
    from bridge.clock import now_ms
    from bridge.db.engine import make_engine
    from bridge.db.security_models import create_security_schema
    from bridge.db.security_store import SecurityStore
    from bridge.passwords import hash_password, new_token

    engine = make_engine(settings.db)
    try:
        create_security_schema(engine)
        store = SecurityStore(engine, clock=now_ms, token_storage=settings.security.token_storage)
        tokens = {device_id: new_token() for device_id in device_ids}
        for device_id, token in tokens.items():
            store.enroll(device_id, hash_password(token), requested_by)
    finally:
        engine.dispose()
    return tokens
