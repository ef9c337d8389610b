"""Scoped API keys: the one check every route makes, FastAPI-routed or hot-dispatched alike.

Three scopes: `read` (embed, identify, verify, list/get identities, the model card, /v2 inference), `write`
(enroll, delete) and `admin` (reload, snapshot). A key has the union of the scopes of the variables it is
listed in (IDEMBED_API_KEYS: all three, as before scopes existed; IDEMBED_READ_KEYS, IDEMBED_WRITE_KEYS,
IDEMBED_ADMIN_KEYS: one each). Reads need a key unless IDEMBED_REQUIRE_KEY_FOR_READS=false.

Keys are compared with `hmac.compare_digest` against every configured key, with no early exit, so timing
tells nothing about which key (or how much of one) matched. Logs and the audit log name a key by its id, a
truncated SHA-256 of the key: stable, unique in practice, and not the key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from service.core.config import Settings
from service.errors import AuthenticationError, ForbiddenError

Scope = Literal["read", "write", "admin"]
SCOPE_VARIABLES = {
    "read": "IDEMBED_READ_KEYS",
    "write": "IDEMBED_WRITE_KEYS",
    "admin": "IDEMBED_ADMIN_KEYS",
}


def key_id(secret: bytes) -> str:
    """The name logs use for a key: 12 hex digits of its SHA-256 (48 bits; the key itself never appears)."""
    return "key-" + hashlib.sha256(secret).hexdigest()[:12]


@dataclass(frozen=True)
class Grant:
    key_id: str
    secret: bytes
    scopes: frozenset[str]


class KeyRing:
    """The configured keys and their scopes; `authorize` is the only way a request gets past auth."""

    def __init__(self, grants: list[Grant], *, reads_open: bool) -> None:
        self.grants = grants
        self.reads_open = reads_open

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        grants = [Grant(key_id(s), s, scopes) for s, scopes in settings.key_scopes().items()]
        return cls(grants, reads_open=not settings.require_key_for_reads)

    def with_scope(self, scope: Scope) -> list[str]:
        return [g.key_id for g in self.grants if scope in g.scopes]

    def _match(self, given: str) -> Grant | None:
        candidate = given.encode()
        found: Grant | None = None
        for grant in self.grants:  # every key is compared: no early exit
            if hmac.compare_digest(candidate, grant.secret):
                found = grant
        return found

    def authorize(self, given: str | None, scope: Scope) -> str | None:
        """The id of the key allowed to do `scope`, None for an open read; raises 401 or 403 otherwise."""
        if scope == "read" and self.reads_open:
            return None
        if not self.with_scope(scope):
            raise AuthenticationError(
                f"this server has no API key with the {scope} scope configured (IDEMBED_API_KEYS or "
                f"{SCOPE_VARIABLES[scope]}); {scope} requests are disabled",
                detail={"scope": scope},
            )
        if not given:
            raise AuthenticationError("missing X-API-Key header", detail={"scope": scope})
        grant = self._match(given)
        if grant is None:
            raise AuthenticationError("wrong API key", detail={"scope": scope})
        if scope not in grant.scopes:
            raise ForbiddenError(
                f"API key {grant.key_id} has the scopes {sorted(grant.scopes)}, not {scope!r}; use a key "
                f"from IDEMBED_API_KEYS or {SCOPE_VARIABLES[scope]}",
                detail={"scope": scope, "key_id": grant.key_id, "key_scopes": sorted(grant.scopes)},
            )
        return grant.key_id
