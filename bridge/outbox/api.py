"""Entering commands: validation, target selection and the rails around ``wipe``.

This is what the CLI (and any Python caller) uses. It only writes the outbox; the
running bridge picks ``queued`` rows up and delivers them, so callers need no MQTT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, func, select

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore, NewCommand
from bridge.db.models import CommandRecord, Connectivity, Remote
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from schemas import CommandType, DeviceConfig, validate_device_id
from schemas.payloads import COMMAND_ARGS

CMD = table_of(CommandRecord)
CONN = table_of(Connectivity)
REMOTES = table_of(Remote)

DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 24 * 3600.0
#: A wipe is never left waiting for days: it must find the device soon or not at all.
WIPE_MAX_TTL_S = 600.0
WIPE_RATE_PER_MINUTE = 10


def default_ttl_s(type_: str) -> float:
    """The TTL a command of ``type_`` gets when the caller names none: a wipe's is its
    maximum (it must find the device soon or not at all), every other kind's an hour."""
    return WIPE_MAX_TTL_S if type_ == CommandType.WIPE else DEFAULT_TTL_S


class CommandRequestError(ValueError):
    """The request is refused; the message says why in words for a person."""


@dataclass(frozen=True, slots=True)
class Targets:
    devices: tuple[str, ...] = ()
    all_devices: bool = False
    #: ``state=online`` style filters on the connectivity row.
    where: tuple[tuple[str, str], ...] = ()


_WHERE_COLUMNS = {"state": CONN.c.state, "flapping": CONN.c.flapping}


def parse_where(expr: str) -> tuple[str, str]:
    key, sep, value = expr.partition("=")
    if not sep or key not in _WHERE_COLUMNS or not value:
        raise CommandRequestError(
            f"--where {expr!r}: use KEY=VALUE with KEY one of {', '.join(sorted(_WHERE_COLUMNS))}"
        )
    return key, value


def resolve_targets(engine: Engine, targets: Targets) -> list[str]:
    """Device ids to address; soft-deleted devices are never targeted."""
    for device_id in targets.devices:
        try:
            validate_device_id(device_id)
        except ValueError as exc:
            raise CommandRequestError(str(exc)) from None
    live = select(REMOTES.c.device_identifier).where(REMOTES.c.deleted_at.is_(None))
    with engine.connect() as conn:
        if targets.devices:
            known = {
                row.device_identifier
                for row in conn.execute(
                    live.where(REMOTES.c.device_identifier.in_(list(targets.devices)))
                )
            }
            missing = [d for d in targets.devices if d not in known]
            if missing:
                raise CommandRequestError(
                    f"unknown or deleted device(s): {', '.join(missing[:10])}"
                    + (" ..." if len(missing) > 10 else "")
                )
            return list(dict.fromkeys(targets.devices))
        if not (targets.all_devices or targets.where):
            raise CommandRequestError("name at least one device, or use --all / --where")
        stmt = select(REMOTES.c.device_identifier).where(REMOTES.c.deleted_at.is_(None))
        if targets.where:
            stmt = stmt.join(CONN, CONN.c.device_id == REMOTES.c.device_identifier)
            for key, value in targets.where:
                column = _WHERE_COLUMNS[key]
                stmt = stmt.where(
                    column.is_(value.lower() in ("1", "true", "yes"))
                    if key == "flapping"
                    else column == value
                )
        return sorted(row.device_identifier for row in conn.execute(stmt))


def validate_args(type_: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        kind = CommandType(type_)
    except ValueError:
        known = ", ".join(t.value for t in CommandType)
        raise CommandRequestError(f"unknown command type {type_!r}; known: {known}") from None
    try:
        model = COMMAND_ARGS[kind].model_validate(args)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise CommandRequestError(f"{type_} {where}: {first['msg']}") from None
    return model.model_dump(mode="json", exclude_none=True, exclude={"schema_version"})


def _check_wipe(engine: Engine, count: int, ttl_s: float, reason: str | None) -> None:
    if not reason or not reason.strip():
        raise CommandRequestError("wipe needs a reason (--reason): it is kept as the audit record")
    if ttl_s > WIPE_MAX_TTL_S:
        raise CommandRequestError(
            f"wipe TTL {ttl_s:.0f}s is above the {WIPE_MAX_TTL_S:.0f}s maximum"
        )
    since = utc_naive(now_ms()) - timedelta(minutes=1)
    with engine.connect() as conn:
        recent = conn.execute(
            select(func.count()).where(CMD.c.type == "wipe", CMD.c.created_at >= since)
        ).scalar_one()
    if recent + count > WIPE_RATE_PER_MINUTE:
        raise CommandRequestError(
            f"wipe rate limit: {recent} wipes in the last minute, {count} more would exceed "
            f"{WIPE_RATE_PER_MINUTE}/min; try again later or wipe fewer devices"
        )


def enqueue(
    engine: Engine,
    type_: str,
    devices: Sequence[str],
    args: dict[str, Any] | None = None,
    *,
    ttl_s: float | None = None,
    requested_by: str | None = None,
    reason: str | None = None,
) -> list[str]:
    """Validate and queue one command per device; returns the command ids in order.
    ``ttl_s`` ``None``: the kind's default (:func:`default_ttl_s`)."""
    if not devices:
        raise CommandRequestError("no device matched")
    if ttl_s is None:
        ttl_s = default_ttl_s(type_)
    if not 0 < ttl_s <= MAX_TTL_S:
        raise CommandRequestError(f"TTL must be between 1s and {MAX_TTL_S / 86400:.0f} days")
    if type_ == CommandType.ROTATE_TOKEN:
        # A token queued here would reach the device without the broker ever learning
        # it: the device would lock itself out at its next connect.
        raise CommandRequestError(
            "rotate_token is sent only by `kiosk-bridge device rotate-token`, which also "
            "prepares the broker for the new token"
        )
    if type_ == CommandType.SET_CONFIG:
        clean = _config_changes(dict(args or {}))
    else:
        clean = validate_args(type_, dict(args or {}))
    if type_ == CommandType.WIPE:
        _check_wipe(engine, len(devices), ttl_s, reason)
    store = CommandStore(engine, clock=now_ms)
    if type_ == CommandType.SET_CONFIG:
        return _enqueue_config(engine, store, devices, clean, ttl_s, requested_by, reason)
    return store.enqueue(
        [
            NewCommand(d, type_, clean, ttl_s, requested_by=requested_by, reason=reason)
            for d in devices
        ]
    )


def _config_changes(args: dict[str, Any]) -> dict[str, Any]:
    allowed = set(DeviceConfig.model_fields) - {"version", "schema_version"}
    unknown = set(args) - allowed
    if unknown:
        raise CommandRequestError(
            f"set_config: unknown setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(allowed))}"
        )
    if not args:
        raise CommandRequestError("set_config: give at least one setting to change")
    # Validate the values now, against a throwaway version number.
    validate_args("set_config", {**args, "version": 0})
    return args


def _enqueue_config(
    engine: Engine,
    store: CommandStore,
    devices: Sequence[str],
    changes: dict[str, Any],
    ttl_s: float,
    requested_by: str | None,
    reason: str | None,
) -> list[str]:
    # Each device's desired config gets a new version; the command carries it whole,
    # and the dispatcher republishes it retained on the device's config topic.
    commands: list[NewCommand] = []
    with engine.begin() as conn:
        for device_id in devices:
            config = validate_args("set_config", store.bump_config(conn, device_id, changes))
            commands.append(
                NewCommand(
                    device_id, "set_config", config, ttl_s, requested_by=requested_by, reason=reason
                )
            )
    return store.enqueue(commands)
