"""The job record and its one state machine.

Every store backend (SQLite, PostgreSQL) loads a `Job`, applies ONE of the transitions below and
writes the result back inside a single transaction, so the rules of the lifecycle live here and
nowhere else:

    IN_QUEUE --claim-------------> IN_PROGRESS
    IN_QUEUE --cancel------------> COMPLETED (error_type "cancelled")
    IN_QUEUE --expire------------> COMPLETED (error_type "timeout", 504: X-Fal-Request-Timeout passed)
    IN_PROGRESS --complete_ok----> COMPLETED (result)
    IN_PROGRESS --complete_error-> COMPLETED (error)
    IN_PROGRESS --request_cancel-> IN_PROGRESS (cancel_requested = True; the worker stops at the next step)
    IN_PROGRESS --requeue--------> IN_QUEUE (after a crash: the worker died; attempts already counted)
    IN_PROGRESS --release--------> IN_QUEUE (graceful shutdown: the attempt is given back)
    IN_PROGRESS --crash_fail-----> COMPLETED (error_type "crashed": too many attempts)
    COMPLETED: terminal. Only the webhook bookkeeping and the purge touch it.

The status values are fal's (`IN_QUEUE | IN_PROGRESS | COMPLETED`); a COMPLETED job carries either a
`result` (the endpoint's output JSON) or an `error` ({error, error_type, status_code}).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

# --------------------------------------------------------------------------------------- statuses

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

PRIORITY_NORMAL = "normal"
PRIORITY_LOW = "low"
PRIORITIES = {PRIORITY_NORMAL: 0, PRIORITY_LOW: 1}  # claim order: lower rank first, then FIFO

# error_type values (the `error_type` field of a failed request)
ERR_VALIDATION = "validation"
ERR_CANCELLED = "cancelled"
ERR_TIMEOUT = "timeout"
ERR_INTERNAL = "internal"
ERR_MODEL = "model"
ERR_CRASHED = "crashed"
ERROR_TYPES = (ERR_VALIDATION, ERR_CANCELLED, ERR_TIMEOUT, ERR_INTERNAL, ERR_MODEL, ERR_CRASHED)

# HTTP status of a cancelled request's result (a client error: the client asked for it; never
# 408/409/429, which fal clients retry).
CANCELLED_STATUS_CODE = 400

# webhook_state values
WEBHOOK_NONE = "none"
WEBHOOK_PENDING = "pending"
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"

# Where a job was submitted from (the sync run and the stream wait on it; the queue does not).
MODE_QUEUE = "queue"
MODE_RUN = "run"
MODE_STREAM = "stream"


class InvalidTransition(Exception):
    """The requested transition is not allowed from the job's current status."""

    def __init__(self, job: Job, event: str):
        self.job = job
        self.event = event
        super().__init__(f"cannot {event} request {job.request_id}: it is {job.status}")


def new_request_id() -> str:
    return str(uuid.uuid4())


def job_error(message: str, error_type: str, status_code: int, **extra: Any) -> dict[str, Any]:
    """The stored error of a failed job: {error, error_type, status_code, ...}."""
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error_type {error_type!r}")
    out: dict[str, Any] = {"error": message, "error_type": error_type, "status_code": int(status_code)}
    out.update(extra)
    return out


# -------------------------------------------------------------------------------------- the record

@dataclass
class Job:
    request_id: str
    endpoint_id: str
    owner: str  # the API key's id (short sha256), never the raw key
    input: dict[str, Any]  # validated input JSON, with the seed drawn at submit time
    status: str = IN_QUEUE
    priority: str = PRIORITY_NORMAL
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    deadline: Optional[float] = None  # absolute time by which it must START (X-Fal-Request-Timeout)
    attempts: int = 0  # how many times a worker claimed it
    cancel_requested: bool = False
    worker_id: Optional[str] = None
    heartbeat_at: Optional[float] = None  # last sign of life of the worker running it
    lease_expires_at: Optional[float] = None  # database clock: past it, the sweeper takes the job back
    progress_step: int = 0  # the last finished denoising step of the running attempt (typed progress)
    progress_total: int = 0
    result: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None  # {error, error_type, status_code, ...}
    mode: str = MODE_QUEUE
    public_base: Optional[str] = None  # base URL for stored files' URLs (the submitting request's host)
    webhook_url: Optional[str] = None
    webhook_state: str = WEBHOOK_NONE
    webhook_attempts: int = 0
    webhook_next_at: Optional[float] = None
    webhook_last_error: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible bag (stored as JSON)
    # Not persisted with the row: filled by the store when asked (logs live in their own table).
    logs: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0  # store-assigned submission order (FIFO tiebreak)

    # ------------------------------------------------------------------ derived
    @property
    def is_terminal(self) -> bool:
        return self.status == COMPLETED

    def attempt_limit(self, max_attempts: int) -> int:
        """How many runs a crash may cost this job: 1 when its client sent `x-fal-no-retry`."""
        return 1 if self.extra.get("no_retry") else max_attempts

    @property
    def succeeded(self) -> bool:
        return self.status == COMPLETED and self.error is None

    @property
    def error_type(self) -> Optional[str]:
        return self.error.get("error_type") if self.error else None

    @property
    def priority_rank(self) -> int:
        return PRIORITIES.get(self.priority, 0)

    @property
    def inference_time(self) -> Optional[float]:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def queue_time(self) -> Optional[float]:
        if self.started_at is None:
            return None
        return max(0.0, self.started_at - self.created_at)

    def metrics(self) -> dict[str, Any]:
        """The `metrics` of a COMPLETED status (fal: {inference_time})."""
        out: dict[str, Any] = {}
        if self.inference_time is not None:
            out["inference_time"] = round(self.inference_time, 4)
        if self.queue_time is not None:
            out["queue_time"] = round(self.queue_time, 4)
        return out

    def copy(self) -> Job:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ a failed job's answer

def validation_detail(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic/FastAPI validation errors as the 422 `detail` list: [{"loc", "msg", "type"}], one clear
    message per problem (schema.tidy_validation_errors: union noise dropped, ranges spelled out, a
    non-JSON body told to send application/json)."""
    from kleinserve.schema import tidy_validation_errors

    return tidy_validation_errors(errors)


def error_status(job: Job) -> int:
    """The HTTP status a failed request's result answers with (500 when its error has none)."""
    try:
        return int((job.error or {}).get("status_code", 500))
    except (TypeError, ValueError):
        return 500


def error_body(job: Job) -> dict[str, Any]:
    """The body a failed request's result answers with (GET .../requests/{id}, the webhook ERROR
    payload): {"detail", "error_type", "request_id"}; a validation failure keeps the 422 list shape
    in `detail`."""
    err = job.error or {}
    detail: Any = err.get("error") or "Request failed."
    if err.get("error_type") == ERR_VALIDATION and isinstance(err.get("detail"), list):
        detail = err["detail"]
    return {"detail": detail, "error_type": err.get("error_type") or ERR_INTERNAL, "request_id": job.request_id}


# ------------------------------------------------------------------------------ the state machine

# (from status, event) -> to status
TRANSITIONS: dict[tuple[str, str], str] = {
    (IN_QUEUE, "claim"): IN_PROGRESS,
    (IN_QUEUE, "cancel"): COMPLETED,
    (IN_QUEUE, "expire"): COMPLETED,
    (IN_PROGRESS, "complete_ok"): COMPLETED,
    (IN_PROGRESS, "complete_error"): COMPLETED,
    (IN_PROGRESS, "request_cancel"): IN_PROGRESS,
    (IN_PROGRESS, "requeue"): IN_QUEUE,
    (IN_PROGRESS, "release"): IN_QUEUE,
    (IN_PROGRESS, "crash_fail"): COMPLETED,
}


def apply(job: Job, event: str, *, now: Optional[float] = None, **kw: Any) -> Job:
    """Returns a NEW job: `job` after `event`. Raises InvalidTransition when not allowed.

    Keyword arguments per event:
      claim: worker_id, lease_seconds (the lease runs to now + lease_seconds; `now` is the database clock)
      complete_ok: result
      complete_error: error (a job_error dict)
      cancel / expire / crash_fail / requeue / release / request_cancel: none needed
        (crash_fail accepts `reason`)
    """
    key = (job.status, event)
    if key not in TRANSITIONS:
        raise InvalidTransition(job, event)
    now = time.time() if now is None else now
    j = job.copy()
    j.status = TRANSITIONS[key]

    if event == "claim":
        j.attempts += 1
        j.worker_id = kw.get("worker_id")
        j.started_at = now
        j.heartbeat_at = now
        j.lease_expires_at = now + float(kw.get("lease_seconds", 120.0))
        j.progress_step = j.progress_total = 0
        j.cancel_requested = False
    elif event == "cancel":
        j.cancel_requested = True
        _finish(j, now, error=job_error("Request was cancelled before it started.", ERR_CANCELLED,
                                        CANCELLED_STATUS_CODE))
    elif event == "expire":
        waited = now - j.created_at
        _finish(j, now, error=job_error(
            f"Request timed out: it did not start within the X-Fal-Request-Timeout it was given "
            f"(waited {waited:.1f}s in the queue).", ERR_TIMEOUT, 504, timeout_type="user"))
    elif event == "complete_ok":
        result = kw.get("result")
        if not isinstance(result, dict):
            raise ValueError("complete_ok needs result=<dict>")
        if j.cancel_requested:
            # The cancel was recorded before this result was: the client was told it would stop.
            _finish(j, now, error=job_error("Request was cancelled while running; its result was discarded.",
                                            ERR_CANCELLED, CANCELLED_STATUS_CODE))
        else:
            _finish(j, now, result=result)
    elif event == "complete_error":
        error = kw.get("error")
        if not isinstance(error, dict) or "error_type" not in error:
            raise ValueError("complete_error needs error=job_error(...)")
        _finish(j, now, error=error)
    elif event == "request_cancel":
        j.cancel_requested = True
    elif event in ("requeue", "release"):
        if event == "release":
            j.attempts = max(0, j.attempts - 1)
        j.worker_id = None
        j.heartbeat_at = None
        j.lease_expires_at = None
        j.started_at = None
        j.deadline = None  # it already started once within its time-to-start deadline
        if j.cancel_requested:
            # It was asked to stop while running: do not run it again.
            _finish(j, now, error=job_error("Request was cancelled.", ERR_CANCELLED, CANCELLED_STATUS_CODE))
    elif event == "crash_fail":
        reason = kw.get("reason") or (
            f"The server stopped while this request was running ({j.attempts} attempt(s)); "
            "giving up so it cannot crash the service again.")
        _finish(j, now, error=job_error(reason, ERR_CRASHED, 500))
    return j


def _finish(j: Job, now: float, *, result: Optional[dict] = None, error: Optional[dict] = None) -> None:
    j.status = COMPLETED
    j.finished_at = now
    j.result = result
    j.error = error
    j.worker_id = None
    j.lease_expires_at = None
    if j.webhook_url:
        j.webhook_state = WEBHOOK_PENDING
        j.webhook_next_at = now
    else:
        j.webhook_state = WEBHOOK_NONE


# ------------------------------------------------------------------------------- webhook bookkeeping

def apply_webhook_attempt(job: Job, *, delivered: bool, next_attempt_at: Optional[float],
                          error: Optional[str]) -> Job:
    """Records one delivery attempt of a COMPLETED job's webhook."""
    if job.status != COMPLETED or not job.webhook_url:
        raise InvalidTransition(job, "record_webhook_attempt")
    j = job.copy()
    j.webhook_attempts += 1
    j.webhook_last_error = error
    if delivered:
        j.webhook_state = WEBHOOK_DELIVERED
        j.webhook_next_at = None
    elif next_attempt_at is None:
        j.webhook_state = WEBHOOK_FAILED
        j.webhook_next_at = None
    else:
        j.webhook_state = WEBHOOK_PENDING
        j.webhook_next_at = float(next_attempt_at)
    return j
