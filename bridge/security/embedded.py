"""The embedded broker, secure by default: its fixed principals' credentials and wiring.

Without ``--broker``, ``kiosk-bridge run`` (and ``demo``) start the amqtt broker with
:class:`bridge.security.amqtt_plugins.DatabaseSecurityPlugin`: devices authenticate
against ``kb_device_credentials`` and the ACL of :mod:`bridge.security.acl` applies. The
fixed principals (``_bridge``, ``_ops``, ``_claim``) have their passwords in a JSON file
(mode 0600) next to the SQLite database, ``<db stem>.broker-credentials.json``, or
``./kiosk-bridge.broker-credentials.json`` for other databases; ``KB_EMBEDDED_CREDENTIALS``
names another. The first start writes it with random passwords; later starts, and the
CLI on the same machine (``watch``, ``doctor``, ``device revoke``, ...), read it.

Why a file and not the database: the bridge needs the passwords in clear to log in, the
operator needs them for the CLI and for the claim credential the app ships, and a file
readable only by its owner is what ``~/.ssh`` and ``.pgpass`` already trust.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from sqlalchemy.engine import make_url

from bridge.db.engine import create_schema, make_engine
from bridge.security.acl import StaticUsers
from bridge.security.bootstrap import BootstrapSecrets
from schemas import DEFAULT_PREFIX

log = logging.getLogger(__name__)

CREDENTIALS_SUFFIX: Final = ".broker-credentials.json"
DEFAULT_CREDENTIALS_FILE: Final = Path("kiosk-bridge" + CREDENTIALS_SUFFIX)
_ROLES: Final = ("bridge", "ops", "claim")
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


class CredentialsFileError(ValueError):
    """The credentials file exists but cannot be used."""


def default_credentials_path(db_url: str) -> Path:
    """Next to a SQLite database file, else ``kiosk-bridge.broker-credentials.json``."""
    try:
        url = make_url(db_url)
    except Exception:
        return DEFAULT_CREDENTIALS_FILE
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return DEFAULT_CREDENTIALS_FILE
    if database.startswith("file:"):
        return DEFAULT_CREDENTIALS_FILE
    db_path = Path(database)
    return db_path.with_name(db_path.stem + CREDENTIALS_SUFFIX)


def generate_credentials(users: StaticUsers | None = None) -> BootstrapSecrets:
    return BootstrapSecrets(
        bridge_password=secrets.token_urlsafe(24),
        ops_password=secrets.token_urlsafe(24),
        claim_password=secrets.token_urlsafe(24),
        users=users or StaticUsers(),
    )


def _document(creds: BootstrapSecrets) -> dict[str, Any]:
    users = creds.users
    return {
        "_comment": "kiosk-bridge embedded broker: fixed credentials (keep this file 0600)",
        "bridge": {"username": users.bridge, "password": creds.bridge_password},
        "ops": {"username": users.ops, "password": creds.ops_password},
        "claim": {"username": users.claim, "password": creds.claim_password},
    }


def _parse(path: Path, text: str) -> BootstrapSecrets:
    try:
        doc = json.loads(text)
        entries = {role: doc[role] for role in _ROLES}
        names = {role: str(entry["username"]) for role, entry in entries.items()}
        passwords = {role: str(entry["password"]) for role, entry in entries.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsFileError(
            f"{path}: not a credentials file ({exc}); expected bridge, ops and claim, each "
            '{"username": ..., "password": ...}'
        ) from None
    for role, name in names.items():
        # A fixed principal named like a device would get that device's topics.
        if not name.startswith("_"):
            raise CredentialsFileError(f"{path}: the {role} username must start with '_'")
    try:
        return BootstrapSecrets(
            bridge_password=passwords["bridge"],
            ops_password=passwords["ops"],
            claim_password=passwords["claim"],
            users=StaticUsers(names["bridge"], names["ops"], names["claim"]),
        )
    except ValueError as exc:
        raise CredentialsFileError(f"{path}: {exc}") from None


def read_credentials(path: Path) -> BootstrapSecrets | None:
    """The credentials in ``path``, ``None`` if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsFileError(f"cannot read {path}: {exc}") from None
    return _parse(path, text)


def load_or_create_credentials(
    path: Path, users: StaticUsers | None = None
) -> tuple[BootstrapSecrets, bool]:
    """The credentials in ``path``; if it does not exist, random ones written there
    (mode 0600). Returns ``(credentials, created)``."""
    found = read_credentials(path)
    if found is not None:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "%s is readable by others (mode %o); it holds the broker's passwords: chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )
        return found, False
    created = generate_credentials(users)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting at once must not hand out different passwords.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        again = read_credentials(path)
        if again is None:
            raise CredentialsFileError(f"{path} vanished while it was being created") from None
        return again, False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(_document(created), indent=2) + "\n")
    return created, True


def broker_url(
    host: str, port: int, username: str | None = None, password: str | None = None
) -> str:
    """``mqtt://[user:pass@]host:port``."""
    shown = f"[{host}]" if ":" in host else host
    auth = ""
    if username is not None:
        auth = quote(username, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"mqtt://{auth}{shown}:{port}"


def local_host(listen_host: str) -> str:
    """Where a client on this machine reaches a broker listening on ``listen_host``."""
    if listen_host in _WILDCARD_HOSTS:
        return "::1" if listen_host == "::" else "127.0.0.1"
    return listen_host


@dataclass(frozen=True, slots=True)
class BrokerSecurity:
    """What the embedded broker needs to enforce the security model."""

    db_url: str
    credentials: BootstrapSecrets
    prefix: str = DEFAULT_PREFIX
    #: How often the plugin looks for revoked or changed credentials.
    poll_s: float = 0.25

    def prepare(self) -> None:
        """Blocking: create the credential tables the plugin reads before anyone connects."""
        engine = make_engine(self.db_url)
        try:
            create_schema(engine)
        finally:
            engine.dispose()

    def plugins(self) -> dict[str, dict[str, Any]]:
        """The amqtt ``plugins`` map: only the database plugin, which both authenticates
        and filters topics (an open auth plugin next to it would let everyone in)."""
        # Imported here: reading settings (which name the credentials file) needs no amqtt.
        from bridge.security.amqtt_plugins import DatabaseSecurityPlugin

        creds = self.credentials
        name = f"{DatabaseSecurityPlugin.__module__}.{DatabaseSecurityPlugin.__qualname__}"
        return {
            name: {
                "db_url": self.db_url,
                "prefix": self.prefix,
                "bridge_username": creds.users.bridge,
                "bridge_password": creds.bridge_password,
                "ops_username": creds.users.ops,
                "ops_password": creds.ops_password,
                "claim_username": creds.users.claim,
                "claim_password": creds.claim_password,
                "poll_s": self.poll_s,
            }
        }
