"""API keys.

Keys come from `--api-key` (repeatable) or KLEINSERVE_API_KEYS (comma-separated). A request carries
`Authorization: Key <key>` (what the fal clients send; `FAL_KEY_ID:FAL_KEY_SECRET` is just a key with
a colon in it) or `Authorization: Bearer <key>` (the OpenAI adapter). Jobs belong to the key that
created them: the owner id is a short sha256 of the key (the raw key is never stored); another key
gets 404 for them. Running without keys needs an explicit `--no-auth` (or KLEINSERVE_NO_AUTH=1):
every request is then owned by "anonymous".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
SCHEMES = ("key", "bearer")


def owner_id(key: str) -> str:
    """The id a key's jobs are stored under: 'k_' + the first 16 hex digits of sha256(key)."""
    return "k_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


class AuthError(Exception):
    status_code = 401

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class AuthConfigError(ValueError):
    """Neither keys nor --no-auth: refuse to start."""


@dataclass(frozen=True)
class Principal:
    owner: str  # the id the caller's jobs are stored under (owner_id(key), never the raw key)


class Authenticator:
    def __init__(self, keys: Iterable[str] = (), no_auth: bool = False):
        self._digests = {hashlib.sha256(k.encode()).digest(): owner_id(k) for k in keys if k}
        self.no_auth = bool(no_auth)
        if not self._digests and not self.no_auth:
            raise AuthConfigError(
                "No API key configured. Pass --api-key KEY (repeatable) or set KLEINSERVE_API_KEYS=k1,k2; "
                "to serve without authentication pass --no-auth (or KLEINSERVE_NO_AUTH=1).")
        if self.no_auth:
            if self._digests:
                log.warning("--no-auth given together with API keys: keys are ignored, anyone can use the API")
            else:
                log.warning("Authentication is OFF (--no-auth): anyone who can reach this port can use the API")

    @classmethod
    def from_settings(cls, settings: Any) -> "Authenticator":
        return cls(getattr(settings, "api_keys", []) or [], getattr(settings, "no_auth", False))

    @property
    def enabled(self) -> bool:
        return not self.no_auth

    def check_key(self, key: str) -> Optional[Principal]:
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Optional[str] = None
        for d, oid in self._digests.items():  # constant time per candidate
            if hmac.compare_digest(d, digest):
                found = oid
        return Principal(found) if found else None

    def authenticate(self, authorization: Optional[str]) -> Principal:
        """The principal of an `Authorization` header value; raises AuthError (401)."""
        if self.no_auth:
            return Principal(ANONYMOUS)
        if not authorization or not authorization.strip():
            raise AuthError("Missing API key: send 'Authorization: Key <your key>'.")
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() not in SCHEMES or not value:
            raise AuthError("Malformed Authorization header: expected 'Key <your key>' (or 'Bearer <your key>').")
        principal = self.check_key(value)
        if principal is None:
            raise AuthError("Invalid API key.")
        return principal
