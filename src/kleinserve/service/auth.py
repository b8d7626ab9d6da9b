"""API keys.

Keys come from `--api-key` (repeatable) or KLEINSERVE_API_KEYS (comma-separated). A request carries
`Authorization: Key <key>` (what the fal clients send; `FAL_KEY_ID:FAL_KEY_SECRET` is just a key with
a colon in it) or `Authorization: Bearer <key>` (the OpenAI adapter). Jobs belong to the key that
created them: the owner id is a short sha256 of the key (the raw key is never stored); another key
gets 404 for them. Running without keys needs an explicit `--no-auth` (or KLEINSERVE_NO_AUTH=1):
every request is then owned by "anonymous".

Stored keys: `kleinserve serve` without `--api-key` and without `--no-auth` creates a key on its first
start and prints it once; `kleinserve keys create|list|revoke` manage more. They live behind the
small `KeyStore` interface (today `FileKeyStore`: `<data-dir>/keys/api_keys.json`, mode 0600), which
keeps only each key's sha256 digest, a short public id and a label: a key is shown once, when it is
created, and never again. Stored keys are accepted in addition to `--api-key` ones; a revoked key
stops working on the next request (the file is re-read when it changes).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
SCHEMES = ("key", "bearer")


def owner_id(key: str) -> str:
    """The id a key's jobs are stored under: 'k_' + the first 16 hex digits of sha256(key)."""
    return "k_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


KEY_PREFIX = "ks"
KEYS_FILE = Path("keys") / "api_keys.json"  # under the data dir


def _digest_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredKey:
    """What is kept of a key: never the key itself."""

    id: str  # public, short: also part of the key (`ks_<id>_<secret>`), so `list` can name it
    sha256: str  # hex digest of the whole key
    label: str = ""
    created_at: float = 0.0

    @property
    def owner(self) -> str:
        """The owner id of the key's jobs (the same as owner_id(key))."""
        return "k_" + self.sha256[:16]

    @property
    def hint(self) -> str:
        """How the key starts, for humans: `ks_1a2b3c4d_...`."""
        return f"{KEY_PREFIX}_{self.id}_..."


def new_key() -> tuple[str, str]:
    """(id, key) of a fresh random key: `ks_<8 hex id>_<32 hex secret>` (128 random bits)."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_hex(16)}"


class KeyStore(ABC):
    """Where stored API keys live (their digests). Small on purpose, so it can move (e.g. into the
    job store's shared secrets for several replicas) without touching its users."""

    @abstractmethod
    def list(self) -> list[StoredKey]:
        ...

    @abstractmethod
    def add(self, record: StoredKey) -> None:
        ...

    @abstractmethod
    def remove(self, key_id: str) -> bool:
        """Deletes the key with this id (or unique id prefix); False when there is none."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the keys are, for messages."""

    def create(self, label: str = "") -> tuple[StoredKey, str]:
        """Makes, stores and returns a new key: (its record, the key itself: shown once)."""
        key_id, key = new_key()
        record = StoredKey(id=key_id, sha256=_digest_hex(key), label=label, created_at=round(time.time(), 3))
        self.add(record)
        return record, key


class FileKeyStore(KeyStore):
    """A JSON file (mode 0600, written atomically) of StoredKey records; re-read when it changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: tuple[Optional[tuple[int, int]], list[StoredKey]] = (None, [])

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FileKeyStore:
        return cls(Path(data_dir) / KEYS_FILE)

    @property
    def location(self) -> str:
        return str(self.path)

    def _stamp(self) -> Optional[tuple[int, int]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def list(self) -> list[StoredKey]:
        with self._lock:
            stamp = self._stamp()
            if stamp is None:
                return []
            if stamp != self._cache[0]:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8"))
                    records = [StoredKey(**{k: r[k] for k in ("id", "sha256", "label", "created_at") if k in r})
                               for r in data.get("keys", [])]
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise ValueError(f"{self.path}: not a kleinserve key file ({exc}); move it away to start "
                                     "afresh") from None
                self._cache = (stamp, records)
            return list(self._cache[1])

    def _write(self, records: builtins.list[StoredKey]) -> None:  # `list` is the method above
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        body = json.dumps({"keys": [asdict(r) for r in records]}, indent=2) + "\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, record: StoredKey) -> None:
        records = self.list()
        with self._lock:
            self._write([*records, record])

    def remove(self, key_id: str) -> bool:
        wanted = key_id.strip()
        if wanted.startswith(KEY_PREFIX + "_"):  # a whole key or its hint was pasted
            wanted = wanted.split("_")[1] if wanted.count("_") >= 1 else wanted
        records = self.list()
        matches = [r for r in records if wanted and r.id.startswith(wanted)]
        if len(matches) != 1:
            if len(matches) > 1:
                raise ValueError(f"{key_id!r} matches {len(matches)} keys: give more of the id")
            return False
        with self._lock:
            self._write([r for r in records if r is not matches[0]])
        return True


def first_start_key(store: KeyStore) -> Optional[str]:
    """On a first start (no stored key yet): create one and return it (shown once); else None."""
    if store.list():
        return None
    _, key = store.create(label="created by the first `kleinserve serve`")
    return key


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
    def __init__(self, keys: Iterable[str] = (), no_auth: bool = False, key_store: Optional[KeyStore] = None):
        self._digests = {hashlib.sha256(k.encode()).digest(): owner_id(k) for k in keys if k}
        self.no_auth = bool(no_auth)
        self.key_store = key_store
        if not self._digests and not self.no_auth and not (key_store is not None and key_store.list()):
            raise AuthConfigError(
                "No API key configured. Run `kleinserve serve` without key flags once to create one, "
                "`kleinserve keys create`, or pass --api-key KEY (repeatable) / KLEINSERVE_API_KEYS=k1,k2; "
                "to serve without authentication pass --no-auth (or KLEINSERVE_NO_AUTH=1).")
        if self.no_auth:
            if self._digests:
                log.warning("--no-auth given together with API keys: keys are ignored, anyone can use the API")
            else:
                log.warning("Authentication is OFF (--no-auth): anyone who can reach this port can use the API")

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator:
        """--api-key keys plus the keys stored in the data dir (none of them with --no-auth)."""
        no_auth = bool(getattr(settings, "no_auth", False))
        store = None if no_auth else FileKeyStore.in_data_dir(settings.data_dir)
        return cls(getattr(settings, "api_keys", []) or [], no_auth, key_store=store)

    @property
    def enabled(self) -> bool:
        return not self.no_auth

    def check_key(self, key: str) -> Optional[Principal]:
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Optional[str] = None
        for d, oid in self._digests.items():  # constant time per candidate
            if hmac.compare_digest(d, digest):
                found = oid
        if self.key_store is not None:
            for record in self.key_store.list():
                if hmac.compare_digest(bytes.fromhex(record.sha256), digest):
                    found = record.owner
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
