"""What the SQL job stores share: the job row's columns, and the checks made inside a transaction
(the lease fence, the sweeper's decision). Plain functions, no database access."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Optional, Protocol

from . import jobs as J
from .jobs import Job
from .store import EV_STATUS, JobEvent, Lease, LeaseLost

log = logging.getLogger(__name__)

# Job fields stored as columns of `jobs` (seq is the primary key; logs live in job_logs), in order.
COLUMNS = [
    "request_id", "endpoint_id", "owner", "input", "status", "priority", "created_at", "started_at",
    "finished_at", "deadline", "attempts", "cancel_requested", "worker_id", "heartbeat_at",
    "lease_expires_at", "progress_step", "progress_total", "result", "error", "mode", "public_base",
    "webhook_url", "webhook_state", "webhook_attempts", "webhook_next_at", "webhook_last_error", "extra",
]
JSON_COLUMNS = frozenset({"input", "result", "error", "extra"})


def iso_timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_line(timestamp: float, level: str, source: str, message: str) -> dict[str, Any]:
    return {"message": message, "level": level, "source": source, "timestamp": iso_timestamp(timestamp)}


def log_text(value: object) -> str:
    """A log line as stored: text, NUL replaced by U+FFFD (PostgreSQL text cannot hold NUL; both
    stores keep the same)."""
    return str(value).replace("\x00", "\ufffd")


def matches(match: Callable[[Job], bool], job: Job) -> bool:
    """`match(job)`, where a predicate that cannot judge a job passes it over."""
    try:
        return bool(match(job))
    except Exception:
        log.debug("claim predicate failed on %s", job.request_id, exc_info=True)
        return False


class Row(Protocol):
    """A database row read by column name (a dict, a sqlite3.Row)."""

    def __getitem__(self, key: str, /) -> Any: ...


def row_to_job(row: Row) -> Job:
    """A `jobs` row (a mapping with `seq` and COLUMNS; the JSON columns as text) as a Job."""
    kw: dict[str, Any] = {}
    for name in COLUMNS:
        value = row[name]
        if name in JSON_COLUMNS and value is not None:
            value = json.loads(value)
        kw[name] = value
    kw["cancel_requested"] = bool(kw["cancel_requested"])
    kw["extra"] = kw.get("extra") or {}
    kw["progress_step"] = int(kw.get("progress_step") or 0)
    kw["progress_total"] = int(kw.get("progress_total") or 0)
    job = Job(**kw)
    job.seq = int(row["seq"])
    return job


def job_values(job: Job, *, bool_type: type = bool) -> list[Any]:
    """The job's COLUMNS values, in order: JSON columns as compact JSON text (both stores keep text:
    PostgreSQL's jsonb cannot hold "\u0000", which a prompt may contain)."""
    out: list[Any] = []
    for name in COLUMNS:
        value = getattr(job, name)
        if name in JSON_COLUMNS:
            value = None if value is None else json.dumps(value, separators=(",", ":"))
        elif name == "cancel_requested":
            value = bool_type(bool(value))
        out.append(value)
    return out


def check_new(job: Job) -> None:
    if job.status != J.IN_QUEUE:
        raise ValueError("a new job must be IN_QUEUE")
    if job.priority not in J.PRIORITIES:
        raise ValueError(f"unknown priority {job.priority!r}")


def check_lease(job: Optional[Job], lease: Lease) -> Job:
    """The job when `lease` still holds it (IN_PROGRESS, same worker, same attempt); else LeaseLost."""
    if job is None:
        raise LeaseLost(lease, "the request no longer exists")
    if job.status != J.IN_PROGRESS:
        raise LeaseLost(lease, f"it is {job.status}")
    if job.worker_id != lease.worker_id or job.attempts != lease.attempt:
        raise LeaseLost(lease, f"attempt {job.attempts} of worker {job.worker_id} holds it now")
    return job


def sweep_decision(job: Job, *, max_attempts: int, now: float,
                   is_worker_alive: Optional[Callable[[str], Optional[bool]]]) -> Optional[tuple[Job, str]]:
    """What the sweeper does with an IN_PROGRESS job: None (leave it), or (the new job, the event).
    Taken back when its lease expired (on the database clock `now`) or its worker is known dead."""
    expired = job.lease_expires_at is not None and job.lease_expires_at <= now
    dead = False
    if is_worker_alive is not None and job.worker_id:
        try:
            dead = is_worker_alive(job.worker_id) is False
        except Exception:
            log.warning("liveness check of worker %s failed", job.worker_id, exc_info=True)
    if not (expired or dead):
        return None
    limit = job.attempt_limit(max_attempts)
    if job.attempts >= limit:
        why = ("the request asked not to be retried (x-fal-no-retry)" if limit < max_attempts
               else f"the limit is {limit}")
        return J.apply(job, "crash_fail", now=now, reason=(
            f"The server stopped while this request was running, {job.attempts} time(s) "
            f"({why}); giving up so it cannot crash the service again.")), "crash_fail"
    return J.apply(job, "requeue", now=now), "requeue"


def requeue_note(old: Job) -> str:
    return f"The worker running this request stopped (attempt {old.attempts}); re-queued."


def status_event(job: Job, event: str, seq: int = 0) -> JobEvent:
    return JobEvent(seq=seq, request_id=job.request_id, kind=EV_STATUS, event=event, status=job.status)
