"""An in-memory map from token hash to device, for tokens the CMS wrote to
``remotes.token`` (the bridge's own are found through ``kb_http_devices``).

``remotes.token`` has no index in the CMS's schema, and the bridge leaves that table's
schema as it is: looking a presented token up there would read every row, for every
unknown token an attacker cares to send. Instead the column is read once at start and
again every ``KB_HTTP__TOKEN_REFRESH_S`` (in the background, in one pass), and kept here
by SHA-256 digest: an unknown token costs a dictionary lookup. A hit is only a
candidate: the device's row is then read by its unique ``device_identifier`` and the
token compared against it, so a stale entry can never authenticate anyone. A token the
CMS writes between two passes is accepted from the next one; a miss brings the next
pass forward (at most one pass per ``MISS_GAP_S``, however many misses), so such a
token is refused for a few seconds at most. Registrations through the bridge are
recorded at once. No token is kept in clear: only the first 64 bits of
digests, and Python's ``hash()`` of each stored value to tell which rows changed without
hashing 100k tokens again at every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import Engine

from bridge.db.models import Remote
from bridge.db.tables import table_of
from bridge.passwords import TokenStorage, token_sha256

log = logging.getLogger(__name__)

REMOTES = table_of(Remote)
#: Shortest time between two passes brought forward by misses.
MISS_GAP_S = 5.0
#: Rows per chunk of a pass, and the pause after each (the GIL goes to the event loop).
_CHUNK = 250
_YIELD_S = 0.0005
_HEX64 = re.compile(r"[0-9a-f]{64}")


#: Entries are keyed by the digest's first 64 bits: a collision only makes a candidate,
#: which the row comparison then refuses, and an int key is half the size of the digest.
Key = int


def _key(digest_hex: str) -> Key:
    return int(digest_hex[:16], 16)


class CmsTokenIndex:
    def __init__(self, engine: Engine, storage: TokenStorage) -> None:
        self._engine = engine
        self._storage = storage
        self._by_key: dict[Key, str] = {}
        #: device -> (hash() of its stored token, the keys it is filed under)
        self._rows: dict[str, tuple[int, tuple[Key, ...]]] = {}
        self._lock = threading.Lock()
        self.loaded_at: float | None = None
        self.last_load_s: float | None = None
        #: Called (from whichever thread looked) when a lookup finds nothing.
        self.on_miss: Callable[[], None] = lambda: None

    def _keys(self, stored: str) -> tuple[Key, ...]:
        """What a presented token's SHA-256 must start with for ``stored`` to match it."""
        if self._storage == "sha256":
            # The column holds the hash; the token itself (the hash presented) is refused.
            return (_key(stored),) if _HEX64.fullmatch(stored) else ()
        digest = token_sha256(stored)
        if _HEX64.fullmatch(stored):
            # Plaintext mode still accepts a column that holds the token's hash.
            return (_key(digest), _key(stored))
        return (_key(digest),)

    def load(self) -> int:
        """Rebuild from ``remotes`` (one pass); returns the number of tokens filed.

        Read with the driver's cursor (not ORM rows: a third of the time at 100k rows)
        in chunks, letting go of the GIL between them: the pass runs in a DB thread
        beside the event loop, and one 0.3 s stretch holding the GIL would be felt by
        every request answered meanwhile.
        """
        started = time.perf_counter()
        with self._lock:
            previous = dict(self._rows)  # a snapshot: put() changes the map in place
        fresh: dict[str, tuple[int, tuple[Key, ...]]] = {}
        by_key: dict[Key, str] = {}
        query = f"SELECT device_identifier, token FROM {REMOTES.name} WHERE token IS NOT NULL"
        with self._engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(query)
                while rows := cursor.fetchmany(_CHUNK):
                    for device_id, stored in rows:
                        if not stored:
                            continue
                        seen = hash(stored)
                        known = previous.get(device_id)
                        if known is not None and known[0] == seen:
                            keys = known[1]
                        else:
                            keys = self._keys(stored)
                        fresh[device_id] = (seen, keys)
                        for key in keys:
                            by_key[key] = device_id
                    time.sleep(_YIELD_S)
            finally:
                cursor.close()
        with self._lock:
            # Registrations recorded while the pass ran are kept (the pass may predate
            # their commit).
            for device_id, entry in self._rows.items():
                if device_id not in previous or previous[device_id] is not entry:
                    fresh[device_id] = entry
                    for key in entry[1]:
                        by_key[key] = device_id
            self._rows, self._by_key = fresh, by_key
        self.loaded_at = time.monotonic()
        self.last_load_s = time.perf_counter() - started
        log.debug("token index: %d tokens in %.3f s", len(fresh), self.last_load_s)
        return len(fresh)

    def put(self, device_id: str, stored: str) -> None:
        """Record a token the bridge just wrote for ``device_id``."""
        keys = self._keys(stored)
        with self._lock:
            self._rows[device_id] = (hash(stored), keys)
            for key in keys:
                self._by_key[key] = device_id

    def lookup(self, hashed: str) -> str | None:
        """The device whose stored token may match a token with this SHA-256 (hex)."""
        found = self._by_key.get(_key(hashed)) if _HEX64.fullmatch(hashed) else None
        if found is None:
            self.on_miss()
        return found

    def __len__(self) -> int:
        return len(self._rows)


class TokenRefresher:
    """Rebuilds the index every ``interval_s``, and sooner after a miss (no more than
    once per ``gap_s``); a failed pass (database down) keeps the previous map."""

    def __init__(
        self,
        index: CmsTokenIndex,
        run_db: Callable[[Callable[[], int]], Awaitable[int]],
        *,
        interval_s: float,
        gap_s: float = MISS_GAP_S,
    ) -> None:
        self._index = index
        self._run_db = run_db
        self._interval_s = interval_s
        self._gap_s = min(gap_s, interval_s)
        self._nudged = asyncio.Event()
        self._pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """The first pass (before the face serves), and the miss hook."""
        self._loop = asyncio.get_running_loop()
        await self._run_db(self._index.load)
        self._index.on_miss = self.nudge

    def nudge(self) -> None:
        """Thread-safe and cheap when repeated: one wake-up until the next pass."""
        if self._pending or self._loop is None:
            return
        self._pending = True
        self._loop.call_soon_threadsafe(self._nudged.set)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), self._interval_s)
            since = loop.time() - (self._index.loaded_at or 0.0)
            if self._nudged.is_set() and since < self._gap_s:
                await asyncio.sleep(self._gap_s - since)
            self._nudged.clear()
            self._pending = False
            try:
                await self._run_db(self._index.load)
            except Exception as exc:  # keep the old map; try again later
                log.warning("token index: refresh failed, keeping the previous map: %s", exc)
