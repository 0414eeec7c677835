"""Provisioning by claim, the bridge's side: answer each request exactly once.

The rules, in the order they are checked (``mosquitto/README.md`` has them with the
attacker each one stops):

1. The request must come from a claim connection: its client id (the topic's, which the
   broker's ``%c`` pattern ties to the publisher) is ``claim-<random>``; a device's own
   client id never is (``invalid_client_id``).
2. A valid request (``invalid_request``) for an id that is not reserved (``reserved_id``)
   with a fresh nonce (``nonce_reused``).
3. Not soft-deleted (``deleted``) or revoked (``revoked``) until an operator restores it,
   and not online right now with a valid credential (``online``).
4. A device with an active credential is claimed again only with proof: the request
   carries its current token, the one a rotation is delivering, or the one replaced last
   (for ``previous_proof_s``), or an operator opened a claim window for it (``device
   allow-claim``, used up by the claim). Otherwise ``proof_required``. A device never
   provisioned (no credential) is claimed without proof.

Then the bridge issues a fresh token: the broker credential (``upsert``: a re-provisioned
device keeps one credential, with a new password) and the ``remotes`` row (created, or
updated: never a second row for one ``device_identifier``).

Replays: the answer to ``(client id, nonce)`` is kept in memory for ``replay_ttl_s`` and
sent again unchanged; a nonce seen before but not in memory (another instance answered
it, or this one restarted) is refused ``nonce_reused``, never answered with a second
token.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from bridge.db.security_store import DeviceGone, SecurityStore, is_online, needs_proof
from bridge.passwords import hash_password, new_token, nonce_sha256, verify_password
from bridge.security.acl import is_reserved_id
from bridge.security.backend import CredentialBackend
from bridge.security.dynsec import DynsecError
from bridge.security.metrics import SecurityMetrics
from schemas import DEFAULT_PREFIX, ContractError, encode
from schemas.provisioning import (
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    RefusalReason,
    decode_provision_request,
    decode_provision_response,
    is_claim_client_id,
)
from schemas.topics import provision_topic

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
_RETRY_ONLINE_S = 30
_RETRY_UNAVAILABLE_S = 10
#: Refusals that another try may turn into an acceptance: not kept for replays.
_TRANSIENT = frozenset(
    {
        RefusalReason.UNAVAILABLE,
        RefusalReason.NONCE_REUSED,
        RefusalReason.ONLINE,
        RefusalReason.PROOF_REQUIRED,
    }
)


class _Refusal(Exception):
    def __init__(self, reason: RefusalReason, detail: str, retry_after_s: int | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s


class ProvisioningService:
    def __init__(
        self,
        store: SecurityStore,
        backend: CredentialBackend,
        publish: Publish,
        metrics: SecurityMetrics,
        *,
        prefix: str = DEFAULT_PREFIX,
        replay_ttl_s: float = 3600.0,
        replay_max: int = 10_000,
        previous_proof_s: float = 30 * 24 * 3600.0,
        proof_retry_s: int = 60,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._backend = backend
        self._publish = publish
        self._metrics = metrics
        self._prefix = prefix
        self._replay_ttl_s = replay_ttl_s
        self._replay_max = replay_max
        self._previous_proof_ms = int(previous_proof_s * 1000)
        #: A kiosk that lost its token asks again this often, until an operator opens
        #: a claim window for it.
        self._proof_retry_s = proof_retry_s
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._answers: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    async def handle(self, client_id: str, payload: bytes) -> ProvisionAccepted | ProvisionRefused:
        """Answer one request on ``{prefix}/provision/{client_id}/response``."""
        topic = provision_topic(client_id, "response", self._prefix)
        if not is_claim_client_id(client_id):
            # A device's own credential (its client id is its device id), or the claim
            # credential under a device's client id: never a claim. Not remembered: the
            # answer is the same every time and must not fill the replay cache.
            refused = ProvisionRefused(
                reason=RefusalReason.INVALID_CLIENT_ID,
                detail="provisioning requests come from a claim connection, whose client "
                "id is claim-<8 to 58 random characters>",
            )
            self._metrics.provision.labels("refused", RefusalReason.INVALID_CLIENT_ID.value).inc()
            log.warning(
                "refused provisioning request on the topic of client id %r: not a claim "
                "connection (a kiosk's own credential, or the claim credential under a "
                "device's client id)",
                client_id,
            )
            await self._publish(topic, encode(refused))
            return refused
        try:
            request = decode_provision_request(payload)
        except ContractError as exc:
            answer: ProvisionAccepted | ProvisionRefused = ProvisionRefused(
                reason=RefusalReason.INVALID_REQUEST, detail=str(exc)[:512]
            )
            self._metrics.provision.labels("refused", RefusalReason.INVALID_REQUEST.value).inc()
            log.warning(
                "rejected provisioning request from client %s: %s payload=%r",
                client_id,
                exc,
                bytes(payload[:120]),
            )
            await self._publish(topic, encode(answer))
            return answer
        key = (client_id, request.nonce)
        cached = self._cached(key)
        if cached is not None:
            self._metrics.provision.labels("replayed", "").inc()
            log.info("provisioning request of %s replayed (same nonce): same answer", client_id)
            await self._publish(topic, cached[1])
            return cached[0]
        try:
            answer = await self._accept(client_id, request)
        except _Refusal as refusal:
            answer = ProvisionRefused(
                nonce=request.nonce,
                device_id=request.device_id,
                reason=refusal.reason,
                detail=refusal.detail[:512],
                retry_after_s=refusal.retry_after_s,
            )
            self._metrics.provision.labels("refused", refusal.reason.value).inc()
            log.warning(
                "provisioning of %s (client %s) refused: %s",
                request.device_id,
                client_id,
                refusal.detail,
            )
        else:
            self._metrics.provision.labels("accepted", "").inc()
        encoded = encode(answer)
        if not (isinstance(answer, ProvisionRefused) and answer.reason in _TRANSIENT):
            self._remember(key, encoded)
        await self._publish(topic, encoded)
        return answer

    async def _accept(self, client_id: str, request: ProvisionRequest) -> ProvisionAccepted:
        device_id = request.device_id
        if is_reserved_id(device_id):
            raise _Refusal(RefusalReason.RESERVED_ID, f"{device_id!r} is reserved for the bridge")
        nonce_hash = nonce_sha256(request.nonce)
        try:
            facts = await asyncio.to_thread(self._store.facts, device_id)
            owner = await asyncio.to_thread(self._store.nonce_owner, nonce_hash)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if owner is not None:
            raise _Refusal(
                RefusalReason.NONCE_REUSED, "this nonce was used before; send a fresh one"
            )
        if facts.deleted:
            raise _Refusal(
                RefusalReason.DELETED,
                f"{device_id} was deleted in the CMS; an operator must run "
                f"'kiosk-bridge device restore {device_id}'",
            )
        if facts.credential == "revoked":
            raise _Refusal(
                RefusalReason.REVOKED,
                f"the credential of {device_id} was revoked; an operator must run "
                f"'kiosk-bridge device restore {device_id}'",
            )
        if facts.credential == "active" and is_online(facts):
            raise _Refusal(
                RefusalReason.ONLINE,
                f"{device_id} is connected with a valid credential; retry once it is not",
                _RETRY_ONLINE_S,
            )
        granted_by = None
        if needs_proof(facts):
            granted_by = await self._proven(request, facts.claim_window)
        try:
            claimed = await asyncio.to_thread(
                self._store.claim_nonce, nonce_hash, client_id, device_id
            )
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if not claimed:
            raise _Refusal(
                RefusalReason.NONCE_REUSED, "this nonce was used before; send a fresh one"
            )
        token = new_token()
        try:
            await self._backend.upsert(device_id, token)
        except DynsecError as exc:
            raise self._unavailable(exc) from exc
        try:
            done = await asyncio.to_thread(
                functools.partial(
                    self._store.record_provisioned,
                    request,
                    token,
                    hash_password(token),
                    client_id,
                    granted_by=granted_by,
                )
            )
        except DeviceGone:
            await self._backend.disable(device_id)
            raise _Refusal(
                RefusalReason.DELETED, f"{device_id} was deleted in the CMS meanwhile"
            ) from None
        except Exception as exc:
            raise self._unavailable(exc) from exc
        log.info(
            "provisioned %s (client %s): %s remote %d",
            device_id,
            client_id,
            "new" if done.created else "existing",
            done.remote_id,
        )
        return ProvisionAccepted(
            nonce=request.nonce,
            device_id=device_id,
            remote_id=done.remote_id,
            token=token,
            mqtt_username=device_id,
            config=done.config,
        )

    async def _proven(self, request: ProvisionRequest, claim_window: bool) -> str:
        """Why a device with an active credential may be claimed again, or refuse."""
        device_id = request.device_id
        detail = "send its current or previous token as proof_token"
        if request.proof_token is not None:
            since_ms = self._clock_ms() - self._previous_proof_ms
            try:
                hashes = await asyncio.to_thread(self._store.proofs, device_id, since_ms)
            except Exception as exc:
                raise self._unavailable(exc) from exc
            proof = request.proof_token
            if any(verify_password(proof, stored) for stored in hashes):
                return "proof"
            detail = "its proof_token matches none of the device's tokens"
        if claim_window:
            return "claim_window"
        raise _Refusal(
            RefusalReason.PROOF_REQUIRED,
            f"{device_id} already has a credential: {detail}, or ask an operator to run "
            f"'kiosk-bridge device allow-claim {device_id}'",
            self._proof_retry_s,
        )

    def _unavailable(self, exc: BaseException) -> _Refusal:
        log.error("provisioning failed: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
        return _Refusal(
            RefusalReason.UNAVAILABLE,
            "the bridge could not complete the request; retry later",
            _RETRY_UNAVAILABLE_S,
        )

    # -- replay cache ---------------------------------------------------------------------

    def _cached(
        self, key: tuple[str, str]
    ) -> tuple[ProvisionAccepted | ProvisionRefused, bytes] | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        stored_at, encoded = entry
        if time.monotonic() - stored_at > self._replay_ttl_s:
            del self._answers[key]
            return None
        return decode_provision_response(encoded), encoded

    def _remember(self, key: tuple[str, str], encoded: bytes) -> None:
        self._answers[key] = (time.monotonic(), encoded)
        self._answers.move_to_end(key)
        while len(self._answers) > self._replay_max:
            self._answers.popitem(last=False)
