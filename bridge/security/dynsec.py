"""A client for Mosquitto's dynamic-security plugin (``$CONTROL/dynamic-security/v1``).

Transport-agnostic: it needs a ``publish(topic, payload)`` coroutine and someone who
feeds it what arrives on :data:`RESPONSE_TOPIC` (:meth:`DynsecClient.feed`). The bridge
plugs it into its own connection (a :class:`bridge.service.mqtt_link.Route`); the CLI
into a short-lived admin connection (:mod:`bridge.security.admin_link`).

Several commands go in one message and are answered in one; every command carries a
``correlationData`` that the plugin echoes, which tells this client's answers from those
of other admins (every subscriber of the response topic sees every answer).

Behaviour of Mosquitto 2.0.11 that the callers rely on (tested in
``tests/test_security_dynsec.py``): ``disableClient``, ``deleteClient`` and
``setClientPassword`` disconnect the client's live connections at once, *without* its
Will; ``createClient`` with a ``clientid`` binds the username to that client id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Final

log = logging.getLogger(__name__)

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"

CLIENT_EXISTS: Final = "Client already exists"
CLIENT_NOT_FOUND: Final = "Client not found"
ROLE_EXISTS: Final = "Role already exists"
ROLE_NOT_FOUND: Final = "Role not found"
GROUP_EXISTS: Final = "Group already exists"
#: ``addGroupClient`` for a client that is in the group already.
CLIENT_IN_GROUP: Final = "Client is already in this group"

Publish = Callable[[str, bytes], Awaitable[None]]


class DynsecError(RuntimeError):
    """The plugin refused a command; ``error`` is its message (e.g. "Client not found")."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynamic-security {command}: {error}")
        self.command = command
        self.error = error


class DynsecUnavailable(DynsecError):
    """No answer in time: plugin not loaded, no admin rights, or the broker is away."""


class DynsecClient:
    def __init__(self, publish: Publish, *, timeout_s: float = 5.0) -> None:
        self._publish = publish
        self._timeout_s = timeout_s
        self._tag = uuid.uuid4().hex[:12]
        self._batches = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}

    # -- plumbing ------------------------------------------------------------------------

    def feed(self, payload: bytes) -> bool:
        """Hand over a message from :data:`RESPONSE_TOPIC`; ``True`` if it was ours."""
        try:
            responses = json.loads(payload)["responses"]
            first = responses[0].get("correlationData", "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return False
        batch = str(first).rpartition(":")[0]
        future = self._waiting.pop(batch, None)
        if future is None or future.done():
            return False
        future.set_result([r for r in responses if isinstance(r, dict)])
        return True

    def fail_pending(self, why: str) -> None:
        """The connection went away: nobody will answer what is outstanding."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(DynsecUnavailable("batch", why))

    async def execute(
        self, commands: Iterable[dict[str, Any]], *, tolerate: Collection[str] = ()
    ) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return the plugin's answers in order.

        An answer with an ``error`` raises :class:`DynsecError`, unless the error text is
        in ``tolerate`` (e.g. :data:`CLIENT_EXISTS` for an idempotent create).
        """
        batch = f"{self._tag}-{next(self._batches)}"
        tagged = [{**cmd, "correlationData": f"{batch}:{i}"} for i, cmd in enumerate(commands)]
        if not tagged:
            return []
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting[batch] = future
        try:
            await self._publish(CONTROL_TOPIC, json.dumps({"commands": tagged}).encode())
            async with asyncio.timeout(self._timeout_s):
                responses = await future
        except TimeoutError:
            raise DynsecUnavailable(
                tagged[0]["command"],
                f"no answer within {self._timeout_s:g}s (is the dynamic-security plugin "
                "loaded, and may this user publish to $CONTROL/dynamic-security/#?)",
            ) from None
        finally:
            self._waiting.pop(batch, None)
        for response in responses:
            error = response.get("error")
            if error and error not in tolerate:
                raise DynsecError(str(response.get("command", "?")), str(error))
        return responses

    async def _one(self, command: dict[str, Any], tolerate: Collection[str] = ()) -> str | None:
        """Run one command; returns its tolerated error, or ``None`` on success."""
        (response,) = await self.execute([command], tolerate=tolerate)
        error = response.get("error")
        return str(error) if error else None

    # -- clients ---------------------------------------------------------------------------

    async def create_client(
        self,
        username: str,
        password: str,
        *,
        clientid: str | None = None,
        roles: Collection[str] = (),
        groups: Collection[str] = (),
        textname: str | None = None,
    ) -> bool:
        """``False`` if the username exists already (nothing is changed then)."""
        command: dict[str, Any] = {
            "command": "createClient",
            "username": username,
            "password": password,
        }
        if clientid is not None:
            command["clientid"] = clientid
        if roles:
            command["roles"] = [{"rolename": role} for role in roles]
        if groups:
            command["groups"] = [{"groupname": group} for group in groups]
        if textname:
            command["textname"] = textname
        return await self._one(command, tolerate=(CLIENT_EXISTS,)) is None

    async def set_client_password(self, username: str, password: str) -> None:
        await self._one(
            {"command": "setClientPassword", "username": username, "password": password}
        )

    async def disable_client(self, username: str) -> bool:
        """Refuse new connections and kick the live ones; ``False`` if unknown."""
        found = await self._one(
            {"command": "disableClient", "username": username}, tolerate=(CLIENT_NOT_FOUND,)
        )
        return found is None

    async def enable_client(self, username: str) -> bool:
        found = await self._one(
            {"command": "enableClient", "username": username}, tolerate=(CLIENT_NOT_FOUND,)
        )
        return found is None

    async def delete_client(self, username: str) -> bool:
        found = await self._one(
            {"command": "deleteClient", "username": username}, tolerate=(CLIENT_NOT_FOUND,)
        )
        return found is None

    async def get_client(self, username: str) -> dict[str, Any] | None:
        (response,) = await self.execute(
            [{"command": "getClient", "username": username}], tolerate=(CLIENT_NOT_FOUND,)
        )
        if response.get("error"):
            return None
        client = response.get("data", {}).get("client")
        return client if isinstance(client, dict) else None

    async def list_clients(self) -> list[str]:
        (response,) = await self.execute([{"command": "listClients", "count": -1}])
        clients = response.get("data", {}).get("clients", [])
        return [str(c) for c in clients]

    # -- roles -------------------------------------------------------------------------------

    async def ensure_role(self, role: dict[str, Any]) -> bool:
        """Create ``role`` (``rolename``, ``acls``...); ``False`` if it existed."""
        command = {"command": "createRole", **role}
        return await self._one(command, tolerate=(ROLE_EXISTS,)) is None

    async def ensure_group(self, group: dict[str, Any]) -> bool:
        """Create ``group`` (``groupname``, ``roles``...); ``False`` if it existed."""
        command = {"command": "createGroup", **group}
        return await self._one(command, tolerate=(GROUP_EXISTS,)) is None

    async def add_group_client(self, groupname: str, username: str) -> bool:
        """``False`` if the client was in the group already."""
        command = {"command": "addGroupClient", "groupname": groupname, "username": username}
        return await self._one(command, tolerate=(CLIENT_IN_GROUP,)) is None

    async def add_client_role(self, username: str, rolename: str) -> None:
        await self._one({"command": "addClientRole", "username": username, "rolename": rolename})

    async def set_default_acl_access(self, defaults: dict[str, bool]) -> None:
        acls = [{"acltype": acltype, "allow": allow} for acltype, allow in defaults.items()]
        await self._one({"command": "setDefaultACLAccess", "acls": acls})
