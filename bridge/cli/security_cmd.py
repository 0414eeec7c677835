"""Credential commands: ``device rotate-token|revoke|delete|restore|enroll|allow-claim``
and ``broker init|acl|upgrade``.

``rotate-token`` only writes the database (the running bridge delivers the command and
finishes the rotation); the others talk to the broker directly with the bridge's
credential (``--broker``/``KB_BROKER``), so a revocation takes effect even when no
bridge is running. Without ``--broker`` they reach the embedded broker of a local
``kiosk-bridge run`` (``KB_LISTEN``) with the bridge's password from its credentials
file (:mod:`bridge.security.embedded`); there the database is the credential store.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    # The rest is imported where used: building the CLI for any command imports this
    # module, and the security stack pulls in the whole settings tree and SQLAlchemy.
    from bridge.db.security_store import SecurityStore
    from bridge.security.operations import SecurityAdmin
    from bridge.security.settings import SecuritySettings
    from bridge.settings import Settings

BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="mqtt[s]://user:pass@host:port with the bridge's credential (default: the "
        "embedded broker on KB_LISTEN, with its credentials file)",
    ),
]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL (default: KB_DB)")]
ByOpt = Annotated[
    str | None,
    typer.Option("--requested-by", help="Who asks, for the audit log (default: user@host)"),
]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why, for the audit log")]
DeviceArg = Annotated[str, typer.Argument(metavar="ID", help="Device identifier")]


def _who(requested_by: str | None) -> str:
    import getpass
    import socket

    return requested_by or f"cli:{getpass.getuser()}@{socket.gethostname()}"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _store(settings: Settings, security: SecuritySettings | None = None) -> SecurityStore:
    """``security``: a section adjusted for this command; default the settings' own."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.clock import now_ms
    from bridge.db.engine import create_schema, make_engine
    from bridge.db.security_models import create_security_schema
    from bridge.db.security_store import SecurityStore

    security = security or settings.security
    engine = make_engine(settings.db)
    try:
        create_schema(engine)
        create_security_schema(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise _fail(f"database {settings.db}: {str(exc).splitlines()[0]}", 3) from None
    return SecurityStore(engine, clock=now_ms, token_storage=security.token_storage)


def _embedded_admin_url(settings: Settings) -> str:
    """The embedded broker a local ``run`` listens on, with the bridge's credential from
    its credentials file (none: an open broker)."""
    from bridge.security.embedded import broker_url, local_host, read_credentials

    try:
        listen_host, port = settings.listen_address
        host = local_host(listen_host)
        credentials = read_credentials(settings.embedded_credentials_path)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    if credentials is None:
        return broker_url(host, port)
    return broker_url(host, port, credentials.users.bridge, credentials.bridge_password)


@asynccontextmanager
async def _admin(settings: Settings) -> AsyncIterator[SecurityAdmin]:
    import asyncio

    from bridge.security.admin_link import open_admin_link
    from bridge.security.backend import CredentialBackend, DatabaseBackend, DynsecBackend
    from bridge.security.operations import SecurityAdmin

    security = settings.security
    url = settings.broker
    if url is None:
        # The embedded broker's credential store is the database its plugin reads.
        url = _embedded_admin_url(settings)
        security = security.model_copy(update={"credential_backend": "database"})
    store = await asyncio.to_thread(_store, settings, security)
    try:
        async with open_admin_link(
            url,
            prefix=settings.prefix,
            ca_file=security.tls_ca,
            v5=security.credential_backend == "dynsec",
        ) as link:
            backend: CredentialBackend = (
                DynsecBackend(link.dynsec, prefix=settings.prefix)
                if security.credential_backend == "dynsec"
                else DatabaseBackend()
            )
            yield SecurityAdmin(
                store,
                backend,
                lambda topic, payload, retain: link.publish(topic, payload, retain=retain),
                link.retained,
                settings.prefix,
            )
    finally:
        store.engine.dispose()


def _run(action: Callable[[], Any]) -> Any:
    """Run ``action()`` (a coroutine) and turn the expected failures into messages."""
    import asyncio

    import aiomqtt

    from bridge.security.dynsec import DynsecError
    from bridge.security.operations import UnknownDevice
    from schemas import ContractError

    try:
        return asyncio.run(action())
    except (UnknownDevice, ContractError, LookupError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    except DynsecError as exc:
        raise _fail(f"broker refused: {exc}") from None
    except (OSError, aiomqtt.MqttError) as exc:
        raise _fail(f"cannot reach the broker (or it refused the credential): {exc}") from None


# --- device ... -----------------------------------------------------------------------------


def rotate_token_cmd(
    device_id: DeviceArg,
    deadline: Annotated[
        str,
        typer.Option(help="The old token stops working this long from now at the latest"),
    ] = "1h",
    db: DbOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Give a device a new token, delivered over its own command topic.

    The running bridge sends a rotate_token command; once the device confirms it, the
    new token becomes its only valid one (or at the deadline, confirmed or not).
    """
    from bridge.cli.run_cmd import settings_or_exit
    from bridge.ops.durations import parse_duration
    from bridge.security.operations import request_rotation
    from schemas import ContractError

    settings = settings_or_exit(db=db)
    try:
        deadline_s = parse_duration(deadline) / 1000
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    store = _store(settings)
    try:
        ticket = request_rotation(
            store, device_id, deadline_s=deadline_s, requested_by=_who(requested_by)
        )
    except (LookupError, ContractError) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    finally:
        store.engine.dispose()
    typer.echo(
        f"rotation of {device_id} queued as command {ticket.command_id}; "
        f"the old token stops working once the device confirms, at the latest in {deadline}"
    )


#: Longest claim window: it lets anyone with the claim secret take the device's identity.
MAX_CLAIM_WINDOW_S = 24 * 3600


def allow_claim_cmd(
    device_id: DeviceArg,
    for_: Annotated[
        str, typer.Option("--for", help="How long the window stays open (at most 24h)")
    ] = "15m",
    db: DbOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Let a device that holds a credential be claimed once more without proof: a kiosk
    that lost its token (factory reset, new storage) recovers by claiming again.

    The window is used up by the first accepted claim and audited; until then anybody
    with the claim secret could claim the id, so keep it short.
    """
    from datetime import UTC, datetime

    from sqlalchemy.exc import SQLAlchemyError

    from bridge.cli.run_cmd import settings_or_exit
    from bridge.db.security_store import needs_proof
    from bridge.ops.durations import parse_duration
    from schemas import ContractError
    from schemas.device_id import validate_device_id

    settings = settings_or_exit(db=db)
    try:
        for_ms = parse_duration(for_)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    if not 0 < for_ms <= MAX_CLAIM_WINDOW_S * 1000:
        raise _fail(f"--for must be more than 0 and at most 24h, not {for_}", 2)
    try:
        validate_device_id(device_id)
    except ContractError as exc:
        raise _fail(str(exc), 2) from None
    store = _store(settings)
    try:
        facts = store.facts(device_id)
        if facts.deleted or facts.credential == "revoked":
            what = "deleted" if facts.deleted else "revoked"
            raise _fail(f"{device_id} is {what}: run 'kiosk-bridge device restore {device_id}'")
        if not needs_proof(facts):
            typer.echo(
                f"{device_id} holds no credential: it can claim one without a window; "
                "nothing changed"
            )
            return
        until_ms = store.open_claim_window(device_id, for_ms, _who(requested_by))
    except SQLAlchemyError as exc:
        raise _fail(f"database {settings.db}: {str(exc).splitlines()[0]}", 3) from None
    finally:
        store.engine.dispose()
    until = datetime.fromtimestamp(until_ms / 1000, tz=UTC).isoformat(timespec="seconds")
    typer.echo(
        f"{device_id} may be claimed once without proof until {until}; its current token "
        "keeps working until a claim is accepted"
    )


def revoke_cmd(
    device_id: DeviceArg,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    reason: ReasonOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Disable a device's credential and disconnect it now; it shows offline (revoked).

    It stays locked out (and cannot provision again) until 'device restore'.
    """
    from bridge.cli.run_cmd import settings_or_exit

    settings = settings_or_exit(broker=broker, db=db)

    async def act() -> Any:
        async with _admin(settings) as admin:
            return await admin.revoke(device_id, requested_by=_who(requested_by), reason=reason)

    result = _run(act)
    shown = (
        f"session {result.session} announced offline (revoked)"
        if result.session
        else "it was not online"
    )
    known = "" if result.disabled else " (the broker had no credential for it)"
    typer.echo(
        f"revoked {device_id}{known}: disconnected within {result.kick_s * 1000:.0f} ms; {shown}"
    )


def delete_cmd(
    device_id: DeviceArg,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    reason: ReasonOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Soft-delete a device in the CMS table and revoke its credential.

    A deleted device is refused by provisioning until 'device restore'.
    """
    from bridge.cli.run_cmd import settings_or_exit

    settings = settings_or_exit(broker=broker, db=db)

    async def act() -> Any:
        async with _admin(settings) as admin:
            return await admin.delete(device_id, requested_by=_who(requested_by), reason=reason)

    _run(act)
    typer.echo(f"deleted {device_id}: credential revoked, row soft-deleted")


def restore_cmd(
    device_id: DeviceArg,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Undo 'device delete' / 'device revoke': the device may connect (with its existing
    token) and provision again."""
    from bridge.cli.run_cmd import settings_or_exit

    settings = settings_or_exit(broker=broker, db=db)

    async def act() -> Any:
        async with _admin(settings) as admin:
            return await admin.restore(device_id, requested_by=_who(requested_by))

    undeleted, reactivated = _run(act)
    flags = (("undeleted", undeleted), ("credential re-enabled", reactivated))
    done = [what for what, flag in flags if flag]
    typer.echo(f"restored {device_id}: {', '.join(done) or 'nothing was deleted or revoked'}")


def enroll_cmd(
    device_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Device identifiers")
    ] = None,
    count: Annotated[
        int,
        typer.Option(
            help="Also enroll the ids 'kiosk-bridge simulate --devices N' uses (PREFIX00000...)",
            min=0,
        ),
    ] = 0,
    id_prefix: Annotated[str, typer.Option(help="Prefix for --count")] = "sim-",
    password_env: Annotated[
        str, typer.Option(help="Environment variable holding the password to give them")
    ] = "KB_DEVICE_PASSWORD",
    broker: BrokerOpt = None,
    db: DbOpt = None,
    requested_by: ByOpt = None,
) -> None:
    """Create device credentials by hand, all with one password (labs, simulated fleets).

    Real kiosks provision themselves with the claim credential instead.
    """
    from bridge.cli.run_cmd import settings_or_exit

    password = os.environ.get(password_env, "")
    if len(password) < 16:
        raise _fail(f"${password_env} must hold a password of at least 16 characters", 2)
    # The simulator's naming (bridge.kiosk.simulator.Fleet): zero-padded from 0.
    width = max(5, len(str(count - 1)))
    ids = [*(device_ids or []), *(f"{id_prefix}{n:0{width}d}" for n in range(count))]
    if not ids:
        raise _fail("name at least one device, or use --count", 2)
    settings = settings_or_exit(broker=broker, db=db)

    async def act() -> None:
        async with _admin(settings) as admin:
            for device_id in ids:
                await admin.enroll(device_id, password, requested_by=_who(requested_by))

    _run(act)
    typer.echo(f"enrolled {len(ids)} device(s)")


# --- broker ... -------------------------------------------------------------------------------


def broker_init_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where the broker reads its credentials")],
    generate: Annotated[
        bool, typer.Option(help="Make up random passwords and print them once")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing file")] = False,
    if_missing: Annotated[
        bool, typer.Option(help="Do nothing (and succeed) if the file exists already")
    ] = False,
    prefix: Annotated[str | None, typer.Option(help="Topic prefix (default kiosk/v1)")] = None,
) -> None:
    """Write the dynamic-security plugin's first credential file: the bridge, ops and
    claim credentials and their roles. Passwords come from KB_BRIDGE_PASSWORD,
    KB_OPS_PASSWORD and KB_CLAIM_PASSWORD (or --generate)."""
    import secrets

    from bridge.cli.run_cmd import settings_or_exit
    from bridge.security.acl import StaticUsers
    from bridge.security.bootstrap import BootstrapSecrets, write_dynsec_config

    if if_missing and out.exists():
        typer.echo(f"{out} exists; left as it is")
        return
    settings = settings_or_exit(prefix=prefix)
    security = settings.security
    names = ("KB_BRIDGE_PASSWORD", "KB_OPS_PASSWORD", "KB_CLAIM_PASSWORD")
    if generate:
        values = [secrets.token_urlsafe(24) for _ in names]
    else:
        values = [os.environ.get(name, "") for name in names]
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise _fail(f"set {', '.join(missing)} (or pass --generate)", 2)
    users: StaticUsers = security.users
    try:
        bridge_password, ops_password, claim_password = values
        chosen = BootstrapSecrets(bridge_password, ops_password, claim_password, users=users)
        write_dynsec_config(out, chosen, settings.prefix, overwrite=force)
    except (ValueError, FileExistsError) as exc:
        raise _fail(str(exc), 2) from None
    typer.echo(f"wrote {out}")
    if generate:
        for name, user, value in zip(
            names, (users.bridge, users.ops, users.claim), values, strict=True
        ):
            typer.echo(f"{name}={value}  (username {user})")


def broker_upgrade_cmd(broker: BrokerOpt = None, db: DbOpt = None) -> None:
    """Bring a Mosquitto bootstrapped by an older kiosk-bridge up to date: create the
    kb-device role and the kb-devices group, and put every device client in it (devices
    then have no provisioning rights at the broker). Safe to run again."""
    from bridge.cli.run_cmd import settings_or_exit
    from bridge.security.admin_link import open_admin_link
    from bridge.security.backend import DynsecBackend

    settings = settings_or_exit(broker=broker, db=db)
    url = settings.broker
    if url is None:
        raise _fail("the embedded broker needs no upgrade; pass --broker for Mosquitto", 2)

    async def act() -> int:
        async with open_admin_link(
            url, prefix=settings.prefix, ca_file=settings.security.tls_ca
        ) as link:
            return await DynsecBackend(link.dynsec, prefix=settings.prefix).adopt_devices()

    joined = _run(act)
    typer.echo(f"kb-devices group ready; {joined} device client(s) joined it now")


def broker_acl_cmd(
    prefix: Annotated[str | None, typer.Option(help="Topic prefix (default kiosk/v1)")] = None,
) -> None:
    """Print the ACL pattern file (mosquitto/acl) for a topic prefix."""
    from bridge.cli.run_cmd import settings_or_exit
    from bridge.security.acl import acl_file_text

    settings = settings_or_exit(prefix=prefix)
    typer.echo(acl_file_text(settings.prefix), nl=False)


def _help(command: Callable[..., Any]) -> str:
    """The docstring with each paragraph on one line (typer keeps single line breaks)."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _device_group(app: typer.Typer) -> typer.Typer:
    """The ``device`` group another module registered (``device show``), or a new one."""
    for info in app.registered_groups:
        if info.name == "device" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="One device in detail.", no_args_is_help=True)
    app.add_typer(group, name="device")
    return group


def register(app: typer.Typer) -> None:
    """Add the credential commands; call after the module that adds ``device show``."""
    device = _device_group(app)
    for name, command in (
        ("rotate-token", rotate_token_cmd),
        ("revoke", revoke_cmd),
        ("delete", delete_cmd),
        ("restore", restore_cmd),
        ("enroll", enroll_cmd),
        ("allow-claim", allow_claim_cmd),
    ):
        device.command(name, help=_help(command))(command)
    broker = typer.Typer(help="The broker's credentials and ACL model.", no_args_is_help=True)
    broker.command("init", help=_help(broker_init_cmd))(broker_init_cmd)
    broker.command("acl", help=_help(broker_acl_cmd))(broker_acl_cmd)
    broker.command("upgrade", help=_help(broker_upgrade_cmd))(broker_upgrade_cmd)
    app.add_typer(broker, name="broker")
