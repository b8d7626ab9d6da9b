"""The JobStore interface: where jobs live between the HTTP layer and the workers.

Backends: `sqlite_store.SQLiteJobStore` (embedded, one box, any number of processes) and
`pg_store.PostgresJobStore` (a fleet). `open_store(url)` picks one from `--store`.

Rules every backend keeps (the conformance suite in tests/test_store_conformance.py checks them on both):
- Every mutation is one atomic read-modify-write of one job through `jobs.apply`, the one state machine.
- `claim_next` is atomic across processes and hosts and takes a **lease** on the database's clock
  (`lease_expires_at = db_now + lease_seconds`) and counts an attempt. The claimed job's `lease`
  (request id, worker id, attempt) fences every later write the worker makes about it: `heartbeat`,
  `append_log(lease=...)`, `record_progress`, `complete_ok`, `complete_error`, `release`. When the job
  is no longer held by that lease (the sweeper re-queued it and another worker claimed it, it was
  completed, ...) the write changes nothing and raises `LeaseLost`.
- `recover` (the sweeper; any process may run it, the store serialises it) re-queues IN_PROGRESS jobs
  whose lease expired on the database clock or whose worker is known dead, or fails them as crashed
  once they used their attempts.
- Events: every committed change of a job appends a `JobEvent` to the store's event log in the same
  transaction (status changes; typed progress from `record_progress`). Any process reads them with
  `wait_events(after, timeout)` (SQLite: polls the table; PostgreSQL: LISTEN/NOTIFY wakes the reader,
  payloads are only the announcement). Previews are kept out of the log: `record_progress` stores the
  latest one per job, `get_preview` reads it.
- Watchers: an API process that streams a request to a client `watch`es it (a short TTL, refreshed);
  workers make previews only while `is_watched` is true, whichever replica the client is on.
- Shared secrets (`shared_secret`) and the live-worker registry (`register_worker`, `live_workers`)
  live in the store so that every replica agrees on them.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .jobs import Job

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 120.0  # --worker-stale-after: a worker silent this long loses its jobs
WATCH_TTL_SECONDS = 10.0  # a watcher not refreshed this long no longer counts


class StoreOutdated(RuntimeError):
    """The store's schema is older than this code's, and it was opened without migrating it."""


class SecretNotCreated(LookupError):
    """A shared secret no process of this store has created yet (rotate_secret)."""


@dataclass(frozen=True)
class SecretVersions:
    """A shared secret's versions (see JobStore.rotate_secret)."""

    current: Optional[bytes] = None
    previous: Optional[bytes] = None  # the one it replaced: still accepted
    next: Optional[bytes] = None  # staged: published (JWKS), current from `next_from` (epoch seconds)
    next_from: Optional[float] = None

    def due(self, now: float) -> bool:
        """Whether the staged version should be current at `now`."""
        return self.next is not None and (self.next_from or 0.0) <= now

    # In the `secrets` table: one row per version, named NAME, NAME:previous and NAME:next.
    @staticmethod
    def row_names(name: str) -> tuple[str, str, str]:
        return name, name + ":previous", name + ":next"

    @classmethod
    def from_rows(cls, name: str, rows: Iterable[tuple[str, bytes, Optional[float]]]) -> SecretVersions:
        by_name = {n: (bytes(value), active_from) for n, value, active_from in rows}
        current, previous, staged = (by_name.get(n) for n in cls.row_names(name))
        return cls(current=current[0] if current else None, previous=previous[0] if previous else None,
                   next=staged[0] if staged else None, next_from=staged[1] if staged else None)

    def rows(self, name: str) -> list[tuple[str, bytes, Optional[float]]]:
        names = self.row_names(name)
        versions = ((names[0], self.current, None), (names[1], self.previous, None),
                    (names[2], self.next, self.next_from))
        return [(n, value, active_from) for n, value, active_from in versions if value is not None]


class JobNotFound(KeyError):
    """No such request (or it belongs to another API key: both answer 404)."""


class LeaseLost(Exception):
    """A worker wrote about a job it no longer holds (its lease expired and the job was re-queued or
    re-claimed, or it was completed). The write changed nothing."""

    def __init__(self, lease: Lease, detail: str = ""):
        self.lease = lease
        super().__init__(f"request {lease.request_id}: attempt {lease.attempt} of worker {lease.worker_id} "
                         f"no longer holds it{': ' + detail if detail else ''}")


@dataclass(frozen=True)
class Lease:
    """One attempt of one job held by one worker: the fence on every write the worker makes about it."""

    request_id: str
    worker_id: str
    attempt: int

    @classmethod
    def of(cls, job: Job) -> Lease:
        """The lease of a job just returned by `claim_next`."""
        if job.worker_id is None:
            raise ValueError(f"request {job.request_id} is not held by a worker")
        return cls(job.request_id, job.worker_id, job.attempts)


@dataclass(frozen=True)
class CancelOutcome:
    """What `request_cancel` did.

    outcome: "cancelled" (was queued: now COMPLETED as cancelled, it never runs),
             "cancel_requested" (running: the worker stops at its next step, and a result it commits
             after this point is replaced by the cancellation),
             "already_requested" (running, and a cancel was already asked for),
             "already_completed" (terminal: nothing to cancel; `job.error_type` tells whether it
             was cancelled before).
    """

    outcome: str
    job: Job


# Kinds of JobEvent
EV_STATUS = "status"  # the job's status or flags changed (submit, claim, cancel, complete, requeue, ...)
EV_PROGRESS = "progress"  # a denoising step finished: step/total (+ a preview is available)
EV_LOG = "log"  # a log line was appended (`get_logs(request_id, since)` reads it): wakes log followers


@dataclass(frozen=True)
class JobEvent:
    """One entry of the store's event log. Small and typed: it crosses processes and hosts."""

    seq: int  # the store's cursor: strictly increasing; pass the last one seen to `wait_events`
    request_id: str
    kind: str  # EV_STATUS | EV_PROGRESS | EV_LOG
    event: str = ""  # EV_STATUS: the transition ("submit", "claim", "complete_ok", "cancel", ...)
    status: str = ""  # EV_STATUS: the job's status after it
    step: int = 0  # EV_PROGRESS
    total: int = 0  # EV_PROGRESS
    preview: bool = False  # EV_PROGRESS: a preview of this step is stored (`get_preview`)


@dataclass(frozen=True)
class Preview:
    step: int
    data_uri: str  # a small image as a data: URI


class JobStore(ABC):
    """Abstract store. Times are unix seconds (float). `owner=None` means "any owner" (internal use)."""

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:  # noqa: B027  # pragma: no cover - optional
        pass

    @abstractmethod
    def describe(self) -> str:
        """Where it is, for logs and /ready, without credentials: "sqlite:///data/jobs.sqlite3"."""

    @abstractmethod
    def ping(self) -> None:
        """Raises when the store cannot be reached (for /ready)."""

    # ------------------------------------------------------------------ submit / read
    @abstractmethod
    def submit(self, job: Job) -> Job:
        """Stores a new IN_QUEUE job durably (committed before returning). Returns it with `seq`."""

    @abstractmethod
    def get(self, request_id: str, owner: Optional[str] = None, *, with_logs: bool = False) -> Job:
        """The job; raises JobNotFound when missing or owned by another owner."""

    @abstractmethod
    def get_logs(self, request_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Log lines [{message, level, source, timestamp}] from index `since` on."""

    @abstractmethod
    def queue_position(self, request_id: str) -> Optional[int]:
        """0-based position among queued jobs in claim order (priority, then FIFO); None when the
        job is not queued."""

    def queue_positions(self, request_ids: Iterable[str]) -> dict[str, int]:
        """`queue_position` of many requests in one query: {request_id: position} for those of them
        that are queued (the others are left out). Backends answer it with one statement, so a page
        of the history costs the same whatever its size."""
        out: dict[str, int] = {}
        for rid in dict.fromkeys(request_ids):
            pos = self.queue_position(rid)
            if pos is not None:
                out[rid] = pos
        return out

    @abstractmethod
    def queue_depth(self) -> dict[str, int]:
        """Counts by status among non-terminal jobs: {"IN_QUEUE": n, "IN_PROGRESS": m}."""

    @abstractmethod
    def queued_count(self, owner: Optional[str] = None) -> int:
        """Queued jobs (IN_QUEUE), all of them or one owner's (backpressure limits)."""

    @abstractmethod
    def list_requests(self, owner: Optional[str], limit: int = 50) -> list[Job]:
        """The owner's most recent jobs, newest first (without logs)."""

    # ------------------------------------------------------------------ worker side (fenced)
    @abstractmethod
    def claim_next(self, worker_id: str, *, now: Optional[float] = None,
                   endpoint_ids: Optional[Iterable[str]] = None,
                   match: Optional[Callable[[Job], bool]] = None, lookahead: int = 32,
                   lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Optional[Job]:
        """Atomically claims the next queued job (normal before low priority, then FIFO), expiring
        on the way any whose time-to-start deadline has passed (COMPLETED, timeout 504). Returns the
        claimed IN_PROGRESS job (its `Lease.of(job)` fences the worker's later writes), or None.

        With `match`: the first of the next `lookahead` queued jobs for which `match(job)` is true
        (the worker filling a batch with requests that can share a forward); the jobs passed over
        keep their places. `match` runs inside the claim: keep it cheap and free of store calls."""

    @abstractmethod
    def heartbeat(self, lease: Lease, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        """Extends the lease to db_now + lease_seconds. Raises LeaseLost."""

    @abstractmethod
    def append_log(self, request_id: str, message: str, *, level: str = "INFO",
                   source: str = "worker", lease: Optional[Lease] = None) -> None:
        """Appends one log line. With `lease` (a worker's write) it is fenced: raises LeaseLost and
        writes nothing when the lease no longer holds the job."""

    @abstractmethod
    def record_progress(self, lease: Lease, step: int, total: int, preview: Optional[str] = None) -> None:
        """A finished denoising step: stores (step, total) on the job, the preview (a data URI) as the
        job's latest when given, and appends an EV_PROGRESS event. Fenced: raises LeaseLost."""

    @abstractmethod
    def _fenced_mutate(self, lease: Lease, event: str, **kw: Any) -> Job:
        """One `jobs.apply(event, **kw)` on the job `lease` holds, in one transaction; raises LeaseLost
        (and changes nothing) when the lease no longer holds it."""

    def complete_ok(self, lease: Lease, result: dict[str, Any]) -> Job:
        """IN_PROGRESS -> COMPLETED with `result`. Fenced: raises LeaseLost. When a cancel was recorded
        before this commit, the job completes as cancelled instead (jobs.apply decides)."""
        return self._fenced_mutate(lease, "complete_ok", result=result)

    def complete_error(self, lease: Lease, error: dict[str, Any]) -> Job:
        """IN_PROGRESS -> COMPLETED with `error` (see jobs.job_error). Fenced: raises LeaseLost."""
        return self._fenced_mutate(lease, "complete_error", error=error)

    def release(self, lease: Lease) -> Job:
        """IN_PROGRESS -> IN_QUEUE without counting the attempt (graceful shutdown). Fenced."""
        return self._fenced_mutate(lease, "release")

    @abstractmethod
    def expire_due(self, *, now: Optional[float] = None) -> list[Job]:
        """Completes as timeout (504) every queued job whose deadline has passed; returns them."""

    # ------------------------------------------------------------------ cancel
    @abstractmethod
    def request_cancel(self, request_id: str, owner: Optional[str] = None) -> CancelOutcome:
        """Queued -> COMPLETED cancelled at once; running -> flag; completed -> already_completed.
        Raises JobNotFound."""

    @abstractmethod
    def is_cancel_requested(self, request_id: str) -> bool:
        ...

    # ------------------------------------------------------------------ crash recovery, retention
    @abstractmethod
    def recover(self, *, max_attempts: int,
                is_worker_alive: Optional[Callable[[str], Optional[bool]]] = None,
                now: Optional[float] = None) -> list[Job]:
        """The sweeper. Finds IN_PROGRESS jobs whose lease expired (on the database clock; `now`
        overrides it in tests) or whose worker `is_worker_alive(worker_id)` says is dead, and
        re-queues them, or fails them as "crashed" when they already had their attempts
        (`job.attempt_limit(max_attempts)`). Returns the jobs changed."""

    @abstractmethod
    def purge(self, older_than: float, *, now: Optional[float] = None) -> list[Job]:
        """Deletes COMPLETED jobs finished more than `older_than` seconds ago (but never one whose
        webhook is still pending), with their logs and preview, and events older than that. Returns
        the deleted jobs (with their results, so their files can be removed too)."""

    # ------------------------------------------------------------------ events (cross-process)
    @abstractmethod
    def last_event_seq(self) -> int:
        """The cursor of the newest event (0 when none): start a feed from here."""

    @abstractmethod
    def wait_events(self, after: int, timeout: float) -> list[JobEvent]:
        """Events with seq > `after`, in order; blocks up to `timeout` seconds while there are none."""

    @abstractmethod
    def get_preview(self, request_id: str) -> Optional[Preview]:
        """The latest preview of a running job, if any."""

    @abstractmethod
    def watch(self, request_id: str, watcher_id: str, ttl: float = WATCH_TTL_SECONDS) -> None:
        """Says that `watcher_id` (an API process) follows the request, for `ttl` seconds."""

    @abstractmethod
    def unwatch(self, request_id: str, watcher_id: str) -> None:
        ...

    @abstractmethod
    def is_watched(self, request_id: str) -> bool:
        """Whether any unexpired watcher follows the request (workers make previews only then)."""

    # ------------------------------------------------------------------ fleet: secrets and workers
    @abstractmethod
    def shared_secret(self, name: str, create: Callable[[], bytes]) -> bytes:
        """The secret stored under `name`; the first caller's `create()` result wins (atomically),
        so every replica gets the same bytes."""

    @abstractmethod
    def secret_versions(self, name: str) -> SecretVersions:
        """The versions of the secret `name` (all None when it was never created)."""

    @abstractmethod
    def _update_secret(self, name: str, change: Callable[[SecretVersions], SecretVersions]) -> None:
        """Reads the versions of `name`, and writes `change(versions)` in the same transaction."""

    def rotate_secret(self, name: str, value: bytes, *, active_from: Optional[float] = None,
                      drop_previous: bool = False) -> None:
        """A new version of the existing secret `name` (SecretNotCreated when there is none), in one transaction.
        `active_from` None: it becomes current at once, the current one becomes the previous one (or
        none with `drop_previous`; the one before is dropped either way), a staged one is dropped.
        `active_from` (epoch seconds): it is staged as `next` until then (replacing a staged one);
        `promote_due_secret` makes it current."""
        def change(v: SecretVersions) -> SecretVersions:
            if v.current is None:
                raise SecretNotCreated(f"no secret {name!r} yet: the first kleinserve process of this store "
                                       "creates it")
            if active_from is None:
                return SecretVersions(current=value, previous=None if drop_previous else v.current)
            return SecretVersions(current=v.current, previous=None if drop_previous else v.previous, next=value,
                                  next_from=float(active_from))
        self._update_secret(name, change)

    def promote_due_secret(self, name: str, now: Optional[float] = None) -> bool:
        """When the staged version of `name` is due: it becomes current and the current one the previous
        one (one transaction; any process may call it, the first does it). True when it did."""
        now = time.time() if now is None else now
        if not self.secret_versions(name).due(now):
            return False  # the usual case: a read, no write
        promoted = False

        def change(v: SecretVersions) -> SecretVersions:
            nonlocal promoted
            if not v.due(now):
                return v  # another process did it meanwhile
            promoted = True
            return SecretVersions(current=v.next, previous=v.current)
        self._update_secret(name, change)
        return promoted

    @abstractmethod
    def register_worker(self, worker_id: str, endpoint_ids: Iterable[str], *, ttl: float,
                        info: Optional[dict[str, Any]] = None) -> None:
        """Announces (or refreshes) a live worker serving `endpoint_ids` for `ttl` seconds."""

    @abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        ...

    @abstractmethod
    def live_workers(self) -> dict[str, int]:
        """endpoint id -> number of workers with an unexpired registration."""

    # ------------------------------------------------------------------ webhooks
    @abstractmethod
    def due_webhooks(self, now: Optional[float] = None, limit: int = 20, *,
                     lease_seconds: float = 60.0) -> list[Job]:
        """COMPLETED jobs whose webhook is pending and due; each is leased (its next attempt
        pushed `lease_seconds` ahead) so another dispatcher does not send it at the same time."""

    @abstractmethod
    def record_webhook_attempt(self, request_id: str, delivered: bool,
                               next_attempt_at: Optional[float], error: Optional[str]) -> Job:
        """Counts one delivery attempt: delivered, or pending until `next_attempt_at`, or failed
        for good when `next_attempt_at` is None."""


def open_store(url: str, *, create: bool = True, migrate: bool = True, connect_timeout: float = 30.0) -> JobStore:
    """The store named by `--store`: `sqlite:///abs/path.sqlite3`, `sqlite:relative/path.sqlite3`
    or `postgresql://user@host:port/db` (also `postgres://`). Raises ValueError for anything else;
    FileNotFoundError for a SQLite file that does not exist unless `create`; StoreOutdated for an
    older schema unless `migrate` (a tool must not upgrade a store its servers cannot read then)."""
    text = str(url).strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        if rest.startswith("///"):
            path = rest[2:]  # sqlite:///abs/path -> /abs/path
        elif rest.startswith("//"):
            raise ValueError(f"--store {redact_url(text)!r}: a SQLite URL has no host; write "
                             "sqlite:///absolute/path/jobs.sqlite3 or sqlite:relative/path/jobs.sqlite3")
        else:
            path = rest
        if not path or path.endswith("/"):
            raise ValueError(f"--store {text!r}: name the database file, e.g. sqlite:///data/jobs.sqlite3")
        from .sqlite_store import SQLiteJobStore

        if not create and not Path(path).is_file():
            raise FileNotFoundError(f"no job store at {path}")
        return SQLiteJobStore(path, migrate=migrate)
    if sep and scheme in ("postgresql", "postgres") and rest.startswith("//"):
        from .pg_store import PostgresJobStore

        return PostgresJobStore(text, migrate=migrate, connect_timeout=connect_timeout)
    raise ValueError(f"--store {redact_url(text)!r}: not a store URL; use sqlite:///absolute/path/jobs.sqlite3, "
                     "sqlite:relative/path/jobs.sqlite3 or postgresql://user@host:port/database")


def redact_url(url: str) -> str:
    """`url` with any password replaced by "***" (for logs, errors and describe())."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    tail = re.sub(r"(?i)(password=)[^&]*", r"\1***", tail)
    return f"{scheme}{sep}{userinfo}{at}{hostport}{slash}{tail}"
