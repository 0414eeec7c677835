"""Where a device credential is enforced: Mosquitto's dynamic-security plugin, or the
bridge's own table (read by the embedded broker's plugin).

Either way ``kb_device_credentials`` keeps the bridge's record; the backend does the
broker's side. Both disconnect a live connection when its credential is disabled or its
password replaced (Mosquitto at once; the embedded broker within its poll interval).
"""

from __future__ import annotations

from typing import Literal, Protocol

from bridge.security.dynsec import DynsecClient

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

    def __init__(self, dynsec: DynsecClient) -> None:
        self.dynsec = dynsec

    async def upsert(self, username: str, token: str) -> bool:
        # clientid = username: the credential cannot be used under another client id,
        # which is what makes the "%u" patterns equal to the device's own topics and
        # keeps a device from reading provisioning answers meant for another client id.
        created = await self.dynsec.create_client(
            username, token, clientid=username, textname="kiosk"
        )
        if not created:
            await self.dynsec.execute(
                [
                    {"command": "setClientPassword", "username": username, "password": token},
                    {"command": "enableClient", "username": username},
                ]
            )
        return created

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
