"""Token signing keys (ES256): creation, rotation with an overlap window, the JWKS, and signing.

The newest unretired key signs. Rotation retires it and creates a new one; a retired key stays in the
JWKS for ``signing_key_overlap_seconds`` so tokens it signed keep verifying, then it is deleted.
Private keys are stored sealed under the KEK keyring; decrypted keys live only in this process's memory.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from pacslib.keyring import KeyWrapper
from pacslib.tokens import Principal
from services.auth import audit
from services.auth.clock import Clock
from services.auth.ports import AuthStore, Cond, Tx
from services.auth.records import SigningKey, new_id
from services.auth.sealing import seal, unseal

ALGORITHM = "ES256"
_PURPOSE = "signing-key"


def _new_key(now: float, keys: KeyWrapper) -> tuple[SigningKey, ec.EllipticCurvePrivateKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    kid = f"{time.strftime('%Y%m%d', time.gmtime(now))}-{new_id()[:12]}"
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    record = SigningKey(
        id=kid, alg=ALGORITHM, created_at=now, public_jwk=jwk, private=seal(keys, _PURPOSE, kid, der)
    )
    return record, private


class SigningKeys:
    """The signing key set of the issuer (shared by every replica through the store)."""

    def __init__(
        self,
        store: AuthStore,
        keys: KeyWrapper,
        clock: Clock,
        *,
        rotation_seconds: int,
        overlap_seconds: int,
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._rotation = rotation_seconds
        self._overlap = overlap_seconds
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}

    async def _active(self) -> SigningKey | None:
        docs = await self._store.find(
            "signing_keys", {"retired_at": None}, order_by="created_at", descending=True, limit=1
        )
        return SigningKey.from_doc(docs[0]) if docs else None

    async def ensure_current(self) -> str:
        """Make sure a signing key younger than the rotation age exists; return its kid."""
        active = await self._active()
        if active is not None and self._clock() - active.created_at < self._rotation:
            return active.id
        return await self.rotate(None, reason="scheduled" if active is not None else "initial")

    async def rotate(self, actor: Principal | None, *, reason: str = "manual") -> str:
        """Retire the active key(s), create a new active key; return the new kid."""
        now = self._clock()
        record, private = _new_key(now, self._keys)

        async def work(tx: Tx) -> list[str]:
            retired = [
                d["id"] for d in await tx.find("signing_keys", {"retired_at": None}, order_by="created_at")
            ]
            for kid in retired:
                await tx.update("signing_keys", kid, {"retired_at": now})
            await tx.delete_where("signing_keys", {"retired_at": Cond("lt", now - self._overlap)})
            await tx.insert("signing_keys", record.to_doc())
            await audit.emit(
                tx,
                audit.SIGNING_KEY_ROTATED,
                record.id,
                actor=actor,
                kid=record.id,
                retired=retired,
                reason=reason,
            )
            return retired

        await self._store.transact(work)
        self._private[record.id] = private
        return record.id

    async def jwks(self) -> dict[str, Any]:
        """The public keys that verify tokens now: the active key and keys retired within the overlap."""
        now = self._clock()
        docs = await self._store.find("signing_keys", {}, order_by="created_at", descending=True)
        keys = [
            d["public_jwk"]
            for d in docs
            if d.get("retired_at") is None or d["retired_at"] + self._overlap > now
        ]
        return {"keys": keys}

    async def list_keys(self) -> list[SigningKey]:
        docs = await self._store.find("signing_keys", {}, order_by="created_at", descending=True)
        return [SigningKey.from_doc(d) for d in docs]

    async def sign(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` as a JWT with the active key (``kid`` in the header)."""
        active = await self._active()
        if active is None:
            kid = await self.ensure_current()
            active = SigningKey.from_doc(await self._store.get("signing_keys", kid) or {})
        private = self._private.get(active.id)
        if private is None:
            der = unseal(self._keys, _PURPOSE, active.id, active.private)
            loaded = serialization.load_der_private_key(der, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise TypeError("the stored signing key is not an EC key")
            private = loaded
            self._private = {active.id: private}
        return jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": active.id, "typ": "JWT"})
