"""Where a device credential is enforced: Mosquitto's dynamic-security plugin, or the
bridge's own table (read by the embedded broker's plugin).

Either way ``kb_device_credentials`` keeps the bridge's record; the backend does the
broker's side. Both disconnect a live connection when its credential is disabled or its
password replaced (Mosquitto at once; the embedded broker within its poll interval).
"""

from __future__ import annotations

from typing import Literal, Protocol

from bridge.security.acl import GROUP_DEVICES, ROLE_DEVICE, static_groups, static_roles
from bridge.security.dynsec import CLIENT_IN_GROUP, DynsecClient
from schemas import DEFAULT_PREFIX

BackendName = Literal["dynsec", "database"]


class CredentialBackend(Protocol):
    name: BackendName

    async def upsert(self, username: str, token: str) -> bool:
        """Create an enabled credential, or replace the password of (and enable) an
        existing one; ``True`` if it was created."""
        ...

    async def set_password(self, username: str, token: str) -> None: ...

    async def disable(self, username: str) -> bool: ...

    async def enable(self, username: str) -> bool: ...

    async def delete(self, username: str) -> bool: ...


class DynsecBackend:
    name: BackendName = "dynsec"

    def __init__(self, dynsec: DynsecClient, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.dynsec = dynsec
        self._prefix = prefix
        self._group_ready = False

    async def ensure_device_group(self) -> None:
        """The ``kb-device`` role and ``kb-devices`` group, for a broker bootstrapped
        before they existed (idempotent; once per backend)."""
        if self._group_ready:
            return
        (role,) = (r for r in static_roles(self._prefix) if r["rolename"] == ROLE_DEVICE)
        await self.dynsec.ensure_role(role)
        for group in static_groups():
            await self.dynsec.ensure_group(group)
        self._group_ready = True

    async def upsert(self, username: str, token: str) -> bool:
        # clientid = username: the credential cannot be used under another client id,
        # which is what makes the "%u" patterns equal to the device's own topics. The
        # group denies it the provisioning topics, which the "%c" patterns would grant.
        await self.ensure_device_group()
        created = await self.dynsec.create_client(
            username, token, clientid=username, groups=(GROUP_DEVICES,), textname="kiosk"
        )
        if not created:
            await self.dynsec.execute(
                [
                    {"command": "setClientPassword", "username": username, "password": token},
                    {"command": "enableClient", "username": username},
                ]
            )
            # A client made before the group existed joins it now.
            await self.dynsec.add_group_client(GROUP_DEVICES, username)
        return created

    async def adopt_devices(self, *, batch: int = 100) -> int:
        """Put every device client (any username not starting with ``_``) into
        ``kb-devices``: a broker whose clients were made before the group existed.
        Returns how many joined it now."""
        await self.ensure_device_group()
        usernames = [u for u in await self.dynsec.list_clients() if not u.startswith("_")]
        joined = 0
        for start in range(0, len(usernames), batch):
            commands = [
                {"command": "addGroupClient", "groupname": GROUP_DEVICES, "username": name}
                for name in usernames[start : start + batch]
            ]
            answers = await self.dynsec.execute(commands, tolerate=(CLIENT_IN_GROUP,))
            joined += sum(1 for answer in answers if not answer.get("error"))
        return joined

    async def set_password(self, username: str, token: str) -> None:
        await self.dynsec.set_client_password(username, token)

    async def disable(self, username: str) -> bool:
        return await self.dynsec.disable_client(username)

    async def enable(self, username: str) -> bool:
        return await self.dynsec.enable_client(username)

    async def delete(self, username: str) -> bool:
        return await self.dynsec.delete_client(username)


class DatabaseBackend:
    """The embedded broker's plugin reads ``kb_device_credentials`` itself; the store
    has already written it, so there is nothing left to do here."""

    name: BackendName = "database"

    async def upsert(self, username: str, token: str) -> bool:
        del username, token
        return True

    async def set_password(self, username: str, token: str) -> None:
        del username, token

    async def disable(self, username: str) -> bool:
        del username
        return True

    async def enable(self, username: str) -> bool:
        del username
        return True

    async def delete(self, username: str) -> bool:
        del username
        return True
