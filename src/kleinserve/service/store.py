"""The JobStore interface: where jobs live between the HTTP layer and the workers.

Nothing here may assume a single process: a Redis store and many worker processes come next. So
every mutation is one atomic read-modify-write of one job through the state machine in `jobs.py`,
`claim_next` is atomic across processes, and a worker's liveness is a heartbeat in the store (plus,
for workers on this host, a pid check), never an in-memory object.

Listeners (`add_listener`) are an in-process convenience: after a mutation commits, the store calls
`listener(job, event)` in the mutating thread, so the event fan-out can wake SSE streams and the
worker at once. Other processes see the same changes by polling.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .jobs import Job

log = logging.getLogger(__name__)

Listener = Callable[[Job, str], None]


class JobNotFound(KeyError):
    """No such request (or it belongs to another API key: both answer 404)."""


@dataclass(frozen=True)
class CancelOutcome:
    """What `request_cancel` did.

    outcome: "cancelled" (was queued: now COMPLETED as cancelled, it never runs),
             "cancel_requested" (running: the worker stops at its next step),
             "already_requested" (running, and a cancel was already asked for),
             "already_completed" (terminal: nothing to cancel; `job.error_type` tells whether it
             was cancelled before).
    """

    outcome: str
    job: Job


class JobStore(ABC):
    """Abstract store. Times are unix seconds (float). `owner=None` means "any owner" (internal use)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()

    # ------------------------------------------------------------------ listeners (in-process)
    def add_listener(self, fn: Listener) -> None:
        with self._listeners_lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._listeners_lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self, job: Job, event: str) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(job, event)
            except Exception:  # a listener must never break a store operation
                log.exception("job store listener failed")

    def _notify_all(self, jobs: Iterable[Job], event: str) -> None:
        for j in jobs:
            self._notify(j, event)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:  # pragma: no cover - optional
        pass

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

    @abstractmethod
    def queue_depth(self) -> dict[str, int]:
        """Counts by status among non-terminal jobs: {"IN_QUEUE": n, "IN_PROGRESS": m}."""

    @abstractmethod
    def list_requests(self, owner: Optional[str], limit: int = 50) -> list[Job]:
        """The owner's most recent jobs, newest first (without logs)."""

    # ------------------------------------------------------------------ worker side
    @abstractmethod
    def claim_next(self, worker_id: str, *, now: Optional[float] = None,
                   endpoint_ids: Optional[Iterable[str]] = None,
                   match: Optional[Callable[[Job], bool]] = None, lookahead: int = 32) -> Optional[Job]:
        """Atomically claims the next queued job (normal before low priority, then FIFO), expiring
        on the way any whose time-to-start deadline has passed (COMPLETED, timeout 504). Returns the
        claimed IN_PROGRESS job, or None when nothing is runnable.

        With `match`: the first of the next `lookahead` queued jobs for which `match(job)` is true
        (the worker filling a batch with requests that can share a forward); the jobs passed over
        keep their places. `match` runs inside the claim: keep it cheap and free of store calls."""

    @abstractmethod
    def expire_due(self, *, now: Optional[float] = None) -> list[Job]:
        """Completes as timeout (504) every queued job whose deadline has passed; returns them."""

    @abstractmethod
    def append_log(self, request_id: str, message: str, *, level: str = "INFO",
                   source: str = "worker", heartbeat: bool = True) -> None:
        """Appends one log line (and, by default, refreshes the running job's heartbeat)."""

    @abstractmethod
    def heartbeat(self, request_id: str, worker_id: str) -> bool:
        """Refreshes the heartbeat of a job this worker runs; False when it no longer does."""

    @abstractmethod
    def complete_ok(self, request_id: str, result: dict[str, Any]) -> Job:
        """IN_PROGRESS -> COMPLETED with `result`."""

    @abstractmethod
    def complete_error(self, request_id: str, error: dict[str, Any]) -> Job:
        """IN_PROGRESS -> COMPLETED with `error` (see jobs.job_error)."""

    @abstractmethod
    def release(self, request_id: str) -> Job:
        """IN_PROGRESS -> IN_QUEUE without counting the attempt (graceful shutdown)."""

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
    def recover(self, *, max_attempts: int, stale_after: float,
                is_worker_alive: Optional[Callable[[str], Optional[bool]]] = None,
                now: Optional[float] = None) -> list[Job]:
        """Finds IN_PROGRESS jobs whose worker is gone (heartbeat older than `stale_after` seconds,
        or `is_worker_alive(worker_id)` is False) and re-queues them, or fails them as "crashed"
        when they already had `max_attempts` attempts. Returns the jobs changed."""

    @abstractmethod
    def purge(self, older_than: float, *, now: Optional[float] = None) -> list[Job]:
        """Deletes COMPLETED jobs finished more than `older_than` seconds ago (but never one whose
        webhook is still pending). Returns the deleted jobs (with their results, so their files can
        be removed too)."""

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
