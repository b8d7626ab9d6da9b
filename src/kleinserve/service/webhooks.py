"""Webhooks: Ed25519 signing, the JWKS we publish, verification, and delivery with retries.

When a request submitted with `?fal_webhook=<url>` completes, the service POSTs to that URL

    success: {"request_id", "gateway_request_id", "status": "OK",    "payload": <the output>}
    failure: {"request_id", "gateway_request_id", "status": "ERROR", "error": "Invalid status code: 422",
              "payload": <the error body, as the result endpoint returns it>}

with the headers

    X-Fal-Webhook-Request-Id, X-Fal-Webhook-User-Id, X-Fal-Webhook-Timestamp (unix seconds),
    X-Fal-Webhook-Signature = hex(Ed25519 signature of
        "<request id>\\n<user id>\\n<timestamp>\\n<hex sha256 of the raw body>")

The public key is published as a JWKS at `/.well-known/jwks.json`; `verify_webhook` checks a
delivery against it (receivers also reject timestamps more than 300 s away from their clock).

Delivery is at-least-once: the job store keeps the webhook state, `WebhookDispatcher` polls
`store.due_webhooks(now, limit)` and records every attempt with `store.record_webhook_attempt`; a
failed attempt is retried with exponential backoff (by default 10 attempts spread over about 2 h,
like fal), and a crash between sending and recording only causes a duplicate, never a loss.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kleinserve.service import metrics
from kleinserve.service.jobs import Job, error_body, error_status
from kleinserve.service.lifecycle import Loop
from kleinserve.service.netguard import BlockedURL, NetPolicy, check_url, guarded_post, resolve_url

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "X-Fal-Webhook-Request-Id"
HEADER_USER_ID = "X-Fal-Webhook-User-Id"
HEADER_TIMESTAMP = "X-Fal-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Fal-Webhook-Signature"
MAX_TIMESTAMP_SKEW = 300
KEY_FILE_NAME = "webhook-ed25519.pem"
JWKS_MAX_AGE = 300  # seconds a receiver may cache /.well-known/jwks.json (its Cache-Control)

# Default retry schedule: attempt n (1-based) failed -> wait base * 2**(n-1), capped. With base 14 s
# and 10 attempts the nine waits add up to 14 * 511 s = 1 h 59 min: "10 tries within 2 h".
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_BASE = 14.0
DEFAULT_BACKOFF_MAX = 3600.0


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------------------------------
# keys, signing, JWKS


def load_or_create_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 key in `path` (PKCS#8 PEM, mode 0600), generated on first use. Two processes
    racing to create it both end up with the same key (O_EXCL; the loser reads the winner's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path.parent, 0o700)
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pem = b""
        for _ in range(100):
            pem = path.read_bytes()
            if b"END PRIVATE KEY" in pem:
                break
            time.sleep(0.01)
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key") from None
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    log.info("generated webhook signing key", extra={"path": str(path)})
    return key


def signing_message(request_id: str, user_id: str, timestamp: str | int, body: bytes) -> bytes:
    return "\n".join(
        [str(request_id), str(user_id), str(timestamp), hashlib.sha256(body).hexdigest()]
    ).encode("utf-8")


class WebhookSigner:
    """Signs webhooks with the current key. Around a rotation (`kleinserve secrets rotate webhook-key`)
    the JWKS also publishes the staged key (before it signs) and the previous one (after it stopped),
    so receivers that verify against every published key accept deliveries signed on either side."""

    def __init__(self, private_key: Ed25519PrivateKey, previous: Optional[Ed25519PrivateKey] = None,
                 staged: Optional[Ed25519PrivateKey] = None):
        self.set_keys(private_key, previous, staged)

    def set_keys(self, private_key: Ed25519PrivateKey, previous: Optional[Ed25519PrivateKey] = None,
                 staged: Optional[Ed25519PrivateKey] = None) -> None:
        """Signs with `private_key`; publishes it, then `staged` (signs from its time on), then `previous`."""
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.public_key_bytes = _raw_public(self.public_key)
        self.kid = _kid(self.public_key_bytes)
        self._published = [self.public_key_bytes] + [_raw_public(k.public_key()) for k in (staged, previous) if k]

    @classmethod
    def from_data_dir(cls, data_dir: Path | str) -> WebhookSigner:
        return cls(load_or_create_private_key(Path(data_dir) / "keys" / KEY_FILE_NAME))

    def sign(self, request_id: str, user_id: str, timestamp: str | int, body: bytes) -> str:
        return self._key.sign(signing_message(request_id, user_id, timestamp, body)).hex()

    def headers(
        self, request_id: str, user_id: str, body: bytes, timestamp: Optional[int] = None
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else int(timestamp))
        return {
            HEADER_REQUEST_ID: str(request_id),
            HEADER_USER_ID: str(user_id),
            HEADER_TIMESTAMP: ts,
            HEADER_SIGNATURE: self.sign(request_id, user_id, ts, body),
        }

    def jwk(self) -> dict[str, str]:
        return _jwk(self.public_key_bytes)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The current key, then a staged one and the previous one (around a rotation)."""
        return {"keys": [_jwk(raw) for raw in self._published]}


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kid(public_key_bytes: bytes) -> str:
    """A stable fingerprint of the public key (RFC 7638 thumbprint, base64url)."""
    thumb_input = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": _b64url(public_key_bytes)},
                             separators=(",", ":"), sort_keys=True).encode("ascii")
    return _b64url(hashlib.sha256(thumb_input).digest())


def _jwk(public_key_bytes: bytes) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(public_key_bytes), "kid": _kid(public_key_bytes),
            "alg": "EdDSA", "use": "sig"}


def public_keys_from_jwks(jwks: Mapping[str, Any]) -> list[Ed25519PublicKey]:
    keys = []
    for k in (jwks or {}).get("keys", []) or []:
        if not isinstance(k, Mapping) or k.get("kty") != "OKP" or k.get("crv") != "Ed25519":
            continue
        try:
            raw = _b64url_decode(str(k["x"]))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (KeyError, ValueError, TypeError):
            continue
    return keys


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    jwks: Mapping[str, Any],
    *,
    max_skew: float = MAX_TIMESTAMP_SKEW,
    now: Optional[float] = None,
) -> bool:
    """True when `headers` carry a valid signature of `body` by one of the JWKS keys and a timestamp
    within `max_skew` seconds of `now`. Header names are matched case-insensitively."""
    h = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        request_id = h[HEADER_REQUEST_ID.lower()]
        user_id = h[HEADER_USER_ID.lower()]
        timestamp = h[HEADER_TIMESTAMP.lower()]
        signature = bytes.fromhex(h[HEADER_SIGNATURE.lower()])
        ts = int(timestamp)
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > max_skew:
        return False
    message = signing_message(request_id, user_id, timestamp, body)
    for key in public_keys_from_jwks(jwks):
        try:
            key.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False


# --------------------------------------------------------------------------------------------------
# target validation


# Every server-side request goes through service/netguard.py (the SSRF guard).
InvalidWebhookUrl = BlockedURL


def validate_webhook_url(url: str, policy: Optional[NetPolicy] = None) -> str:
    """Checks a webhook target at submit (no DNS): an absolute http(s) URL with a host, no credentials,
    at most 2048 characters, and — unless `policy` allows it — not an IP literal (any notation) or
    `localhost` that is loopback, private, link-local, ... (netguard.check_url). Returns the URL;
    raises InvalidWebhookUrl (netguard.BlockedURL) with a message fit for a 422. The default policy
    allows public addresses only."""
    return check_url(url, policy or NetPolicy())


# --------------------------------------------------------------------------------------------------
# payloads


def webhook_payload(job: Job) -> dict[str, Any]:
    """The JSON body POSTed to the webhook of a completed job (fal's shape); the ERROR payload is the
    body the result endpoint answers with (jobs.error_body), its HTTP status in `error`."""
    base = {"request_id": job.request_id, "gateway_request_id": job.request_id}
    if job.error is None:
        return {**base, "status": "OK", "payload": job.result}
    return {
        **base,
        "status": "ERROR",
        "error": f"Invalid status code: {error_status(job)}",
        "payload": error_body(job),
    }


# --------------------------------------------------------------------------------------------------
# delivery


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    status_code: Optional[int]
    error: Optional[str]
    permanent: bool = False  # retrying cannot help (the target is refused by the SSRF guard)
    target_failed: bool = False  # the target itself is down or overloaded: pause it (per-target backoff)


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = 0.1) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    delay = min(base * (2 ** max(attempt - 1, 0)), cap)
    if jitter:
        delay *= random.uniform(1 - jitter, 1 + jitter)
    return max(delay, 0.0)


def webhook_target(url: str) -> str:
    """The target a delivery counts against for fairness and backoff: `scheme://host:port` (no path,
    no query: those may carry the receiver's secrets, so this is also what logs show)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"
    except ValueError:
        return "invalid"


@dataclass
class _Target:
    """Per-target state of one dispatcher (in memory: another process keeps its own)."""

    inflight: int = 0
    waiting: deque = field(default_factory=deque)  # (job, monotonic time it was leased)
    failures: int = 0  # consecutive failed deliveries (connection, timeout, 429, 5xx)
    blocked_until: float = 0.0  # monotonic: no delivery starts before it

    def idle(self, now: float) -> bool:
        return not self.inflight and not self.waiting and self.blocked_until <= now


class WebhookDispatcher:
    """Background delivery of due webhooks, fair across targets.

    Fairness: a target (scheme://host:port) has at most `per_target` (4) deliveries in flight and, after a
    failure (connection error, timeout, 429, 5xx), a backoff of its own (0.5 s doubling to
    `target_backoff_max`, reset by a success) during which none of its webhooks is attempted (nor
    counted as an attempt); every attempt is bounded (`connect_timeout`, `timeout` for the whole
    exchange). Webhooks waiting for their target stay in memory while their lease has room, else go
    back to the store, so a slow or failing target holds at most `per_target` threads and never
    delays the others. The lease (how long a claimed webhook is hidden from other dispatchers) is
    one attempt plus a margin, so a delivery interrupted by a crash is retried that soon after the
    restart.

    The store interface it relies on (implemented by the job store):
        store.due_webhooks(now: float, limit: int, *, lease_seconds: float) -> list[Job]
            completed jobs whose webhook is pending and due, each leased for `lease_seconds`
        store.record_webhook_attempt(request_id, delivered: bool, next_attempt_at: float | None,
                                     error: str | None) -> None
            counts the attempt; next_attempt_at None with delivered False means "gave up"
    Job fields read (service/jobs.py): request_id, webhook_url, webhook_attempts (attempts so far),
    result, error ({error, error_type, status_code}), owner (the user id put in the signature).
    """

    def __init__(
        self,
        store: Any,
        signer: WebhookSigner,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        poll_interval: float = 1.0,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        concurrency: int = 16,
        per_target: int = 4,
        target_backoff_max: float = 60.0,
        batch_size: int = 32,
        policy: Optional[NetPolicy] = None,
        payload_builder: Callable[[Job], dict[str, Any]] = webhook_payload,
        user_id_default: str = "kleinserve",
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.store = store
        self.signer = signer
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.per_target = max(1, per_target)
        self.target_backoff_max = target_backoff_max
        self.timeout = timeout
        self.connect_timeout = min(timeout, connect_timeout)
        # One attempt plus a margin: a webhook claimed by a dispatcher that crashed is due again
        # this soon. A waiting webhook is only started while its lease still covers one attempt.
        self.lease_seconds = timeout + 10.0
        self.policy = policy or NetPolicy()  # public addresses only unless the operator allows more
        self.payload_builder = payload_builder
        self.user_id_default = user_id_default
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
        self._loop = Loop("webhook-dispatcher", self.poll_once, interval=poll_interval)
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._known: set[str] = set()  # request ids waiting or in flight here
        self._inflight_total = 0

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> WebhookDispatcher:
        self._loop.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def notify(self) -> None:
        """Wake the poller now (the worker calls this right after completing a job)."""
        self._loop.wake()

    def poll_once(self) -> int:
        """Takes due webhooks from the store (as many as there is room to hold) and starts every one
        whose target has a free slot and is not backing off; returns how many were started."""
        with self._lock:
            room = self.batch_size - sum(len(t.waiting) for t in self._targets.values())
        if room > 0:
            jobs = self.store.due_webhooks(time.time(), room, lease_seconds=self.lease_seconds)
            now = time.monotonic()
            with self._lock:
                for job in jobs:
                    if job.request_id in self._known:
                        continue
                    self._known.add(job.request_id)
                    target = self._targets.setdefault(webhook_target(job.webhook_url or ""), _Target())
                    target.waiting.append((job, now))
        return self._start_ready()

    def _start_ready(self) -> int:
        started = 0
        with self._lock:
            now = time.monotonic()
            for key, t in list(self._targets.items()):
                # A webhook whose lease no longer covers one attempt goes back to the store (another
                # dispatcher, or this one, takes it again when the lease runs out).
                while t.waiting and now - t.waiting[0][1] > self.lease_seconds - self.timeout - 1.0:
                    job, _ = t.waiting.popleft()
                    self._known.discard(job.request_id)
                while (t.waiting and t.inflight < self.per_target and t.blocked_until <= now
                       and self._inflight_total < self.concurrency):
                    job, _ = t.waiting.popleft()
                    try:
                        self._pool.submit(self._deliver_and_record, job, key)
                    except RuntimeError:  # pool shut down
                        self._known.discard(job.request_id)
                        return started
                    t.inflight += 1
                    self._inflight_total += 1
                    started += 1
                if t.idle(now) and not t.failures:
                    del self._targets[key]
        return started

    def _deliver_and_record(self, job: Job, target: str) -> None:
        rid = job.request_id
        result: Optional[DeliveryResult] = None
        try:
            result = self.deliver(job)
            attempts = job.webhook_attempts + 1
            next_at = None
            if not result.delivered and attempts < self.max_attempts and not result.permanent:
                next_at = time.time() + backoff_delay(attempts, self.backoff_base, self.backoff_max)
            if not result.delivered:
                when = ("none: given up" if next_at is None else
                        f"in {next_at - time.time():.0f}s")
                log.warning("webhook delivery to %s failed (attempt %d of %d): %s; next try: %s",
                            target, attempts, self.max_attempts, result.error, when,
                            extra={"request_id": rid, "target": target, "attempt": attempts,
                                   "error": result.error, "retry_at": next_at})
                metrics.record_error("webhook")
            self.store.record_webhook_attempt(rid, result.delivered, next_at, result.error)
        except Exception:
            log.exception("webhook delivery crashed", extra={"request_id": rid})
        finally:
            with self._lock:
                t = self._targets.setdefault(target, _Target())
                t.inflight -= 1
                self._inflight_total -= 1
                self._known.discard(rid)
                if result is not None and result.target_failed:
                    t.failures += 1
                    pause = min(0.5 * 2.0 ** (t.failures - 1), self.target_backoff_max)
                    t.blocked_until = max(t.blocked_until, time.monotonic() + pause)
                    if t.failures == 1 or t.failures % 10 == 0:
                        log.warning("webhook target %s failing (%d in a row): its deliveries pause %.0fs",
                                    target, t.failures, pause)
                elif result is not None and result.delivered:
                    t.failures = 0
                    t.blocked_until = 0.0
            self._loop.wake()  # a slot is free: start the next waiting one

    def deliver(self, job: Job) -> DeliveryResult:
        """One POST of the job's webhook; never raises."""
        url = job.webhook_url
        rid = job.request_id
        if not url:
            return DeliveryResult(False, None, "the request has no webhook URL", permanent=True)
        try:
            checked = resolve_url(url, self.policy)  # resolved once: the POST goes to this address
        except BlockedURL as exc:
            return DeliveryResult(False, None, f"refused: {exc}"[:500], permanent=True)
        try:
            body = json.dumps(self.payload_builder(job), separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            return DeliveryResult(False, None, f"{type(exc).__name__}: {exc}")
        user_id = job.owner or self.user_id_default
        headers = {"Content-Type": "application/json", "User-Agent": "kleinserve-webhooks/1",
                   **self.signer.headers(rid, user_id, body)}
        try:
            resp = guarded_post(checked, policy=self.policy, content=body, headers=headers,
                                connect_timeout=self.connect_timeout, total_timeout=self.timeout,
                                max_bytes=64 * 1024)
        except httpx.HTTPError as exc:
            return DeliveryResult(False, None, f"{type(exc).__name__}: {exc}"[:500], target_failed=True)
        if 200 <= resp.status_code < 300:
            return DeliveryResult(True, resp.status_code, None)
        return DeliveryResult(False, resp.status_code, f"receiver answered HTTP {resp.status_code}",
                              target_failed=resp.status_code == 429 or resp.status_code >= 500)
