"""The embedded JobStore: one SQLite database in WAL mode under the data directory.

- Durable: `synchronous=FULL`; `submit` returns only after its transaction committed, so an id handed
  to a client survives a SIGKILL (and a power cut) of the server. Log lines (one per denoising step,
  appended on the engine thread) commit without the fsync (`synchronous=NORMAL`): they survive a
  SIGKILL all the same, and the next durable commit (the job's completion) flushes them to disk.
- Thread-safe: one connection per thread (sqlite3 connections are not shared across threads).
- Multi-process safe: every mutation is `BEGIN IMMEDIATE` (takes the write lock up front, so two
  workers cannot claim the same job), then read -> `jobs.apply` (the one state machine) -> write ->
  COMMIT. Readers never block writers in WAL mode. `busy_timeout` absorbs short lock waits.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from . import jobs as J
from .jobs import Job
from .store import CancelOutcome, JobNotFound, JobStore

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    endpoint_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    input TEXT NOT NULL,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    prio INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    deadline REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    heartbeat_at REAL,
    result TEXT,
    error TEXT,
    mode TEXT NOT NULL DEFAULT 'queue',
    public_base TEXT,
    webhook_url TEXT,
    webhook_state TEXT NOT NULL DEFAULT 'none',
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL,
    webhook_last_error TEXT,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, prio, seq);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs(status, deadline);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(status, finished_at);
CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs(webhook_state, webhook_next_at);
CREATE TABLE IF NOT EXISTS job_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_logs_request ON job_logs(request_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Job fields stored as columns (seq is the primary key; logs live in job_logs).
_COLUMNS = [
    "request_id", "endpoint_id", "owner", "input", "status", "priority", "created_at", "started_at",
    "finished_at", "deadline", "attempts", "cancel_requested", "worker_id", "heartbeat_at", "result",
    "error", "mode", "public_base", "webhook_url", "webhook_state", "webhook_attempts",
    "webhook_next_at", "webhook_last_error", "extra",
]
_JSON_COLUMNS = {"input", "result", "error", "extra"}
_SELECT = "SELECT seq, " + ", ".join(_COLUMNS) + " FROM jobs"


def iso_timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(match: Callable[[Job], bool], job: Job) -> bool:
    try:
        return bool(match(job))
    except Exception:  # a predicate that cannot judge a job passes it over
        log.debug("claim predicate failed on %s", job.request_id, exc_info=True)
        return False


def _row_to_job(row: sqlite3.Row) -> Job:
    kw: dict[str, Any] = {}
    for name in _COLUMNS:
        value = row[name]
        if name in _JSON_COLUMNS and value is not None:
            value = json.loads(value)
        kw[name] = value
    kw["cancel_requested"] = bool(kw["cancel_requested"])
    kw["extra"] = kw.get("extra") or {}
    job = Job(**kw)
    job.seq = row["seq"]
    return job


def _insert_log(con: sqlite3.Connection, request_id: str, now: float, level: str, source: str,
                message: str) -> None:
    con.execute("INSERT INTO job_logs(request_id, timestamp, level, source, message) VALUES (?, ?, ?, ?, ?)",
                (request_id, now, level, source, message))


def _job_values(job: Job) -> list[Any]:
    out: list[Any] = []
    for name in _COLUMNS:
        value = getattr(job, name)
        if name in _JSON_COLUMNS:
            value = None if value is None else json.dumps(value, separators=(",", ":"))
        elif name == "cancel_requested":
            value = int(bool(value))
        out.append(value)
    return out


class SQLiteJobStore(JobStore):
    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        con = self._conn()
        con.execute("PRAGMA journal_mode=WAL")
        # executescript commits implicitly; run the schema outside an explicit transaction.
        con.executescript(_SCHEMA)
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer kleinserve (schema {row[0]} > {SCHEMA_VERSION})")

    @classmethod
    def in_data_dir(cls, data_dir: Path | str) -> "SQLiteJobStore":
        return cls(Path(data_dir) / "jobs.sqlite3")

    # ------------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            if self._closed:
                raise RuntimeError("job store is closed")
            con = sqlite3.connect(str(self.path), timeout=self._busy_timeout_s, isolation_level=None,
                                  check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            con.execute("PRAGMA synchronous=FULL")
            self._local.con = con
            with self._conns_lock:
                self._all_conns.append(con)
        return con

    @contextmanager
    def _tx(self, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. `fsync=False`: the commit is not synced to disk (WAL: it survives a
        crash of the process, not of the machine, until the next synced commit)."""
        con = self._conn()
        if not fsync:
            con.execute("PRAGMA synchronous=NORMAL")
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            else:
                con.execute("COMMIT")
        finally:
            if not fsync:
                con.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for con in conns:
            try:
                con.close()
            except Exception:
                pass
        self._local = threading.local()

    # ------------------------------------------------------------------ helpers
    def _load(self, con: sqlite3.Connection, request_id: str, owner: Optional[str] = None) -> Job:
        row = con.execute(_SELECT + " WHERE request_id=?", (request_id,)).fetchone()
        if row is None:
            raise JobNotFound(request_id)
        job = _row_to_job(row)
        if owner is not None and job.owner != owner:
            raise JobNotFound(request_id)
        return job

    def _save(self, con: sqlite3.Connection, job: Job) -> None:
        sets = ", ".join(f"{c}=?" for c in _COLUMNS[1:]) + ", prio=?"
        values = _job_values(job)[1:] + [job.priority_rank, job.request_id]
        con.execute(f"UPDATE jobs SET {sets} WHERE request_id=?", values)

    def _mutate(self, request_id: str, event: str, owner: Optional[str] = None, **kw: Any) -> Job:
        with self._tx() as con:
            job = J.apply(self._load(con, request_id, owner), event, **kw)
            self._save(con, job)
        self._notify(job, event)
        return job

    def _expire_due(self, con: sqlite3.Connection, now: float) -> list[Job]:
        rows = con.execute(
            _SELECT + " WHERE status=? AND deadline IS NOT NULL AND deadline <= ? ORDER BY seq",
            (J.IN_QUEUE, now)).fetchall()
        out = []
        for row in rows:
            job = J.apply(_row_to_job(row), "expire", now=now)
            self._save(con, job)
            out.append(job)
        return out

    # ------------------------------------------------------------------ submit / read
    def submit(self, job: Job) -> Job:
        if job.status != J.IN_QUEUE:
            raise ValueError("a new job must be IN_QUEUE")
        if job.priority not in J.PRIORITIES:
            raise ValueError(f"unknown priority {job.priority!r}")
        cols = ", ".join(_COLUMNS) + ", prio"
        marks = ", ".join("?" for _ in range(len(_COLUMNS) + 1))
        with self._tx() as con:
            cur = con.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})",
                              _job_values(job) + [job.priority_rank])
            job = job.copy()
            job.seq = int(cur.lastrowid)
        self._notify(job, "submit")
        return job

    def get(self, request_id: str, owner: Optional[str] = None, *, with_logs: bool = False) -> Job:
        con = self._conn()
        job = self._load(con, request_id, owner)
        if with_logs:
            job.logs = self.get_logs(request_id)
        return job

    def get_logs(self, request_id: str, since: int = 0) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT timestamp, level, source, message FROM job_logs WHERE request_id=? ORDER BY id "
            "LIMIT -1 OFFSET ?", (request_id, int(since))).fetchall()
        return [{"message": r["message"], "level": r["level"], "source": r["source"],
                 "timestamp": iso_timestamp(r["timestamp"])} for r in rows]

    def queue_position(self, request_id: str) -> Optional[int]:
        con = self._conn()
        row = con.execute("SELECT status, prio, seq FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        if row is None or row["status"] != J.IN_QUEUE:
            return None
        n = con.execute(
            "SELECT COUNT(*) FROM jobs WHERE status=? AND (prio < ? OR (prio = ? AND seq < ?))",
            (J.IN_QUEUE, row["prio"], row["prio"], row["seq"])).fetchone()[0]
        return int(n)

    def queue_depth(self) -> dict[str, int]:
        rows = self._conn().execute(
            "SELECT status, COUNT(*) AS n FROM jobs WHERE status IN (?, ?) GROUP BY status",
            (J.IN_QUEUE, J.IN_PROGRESS)).fetchall()
        out = {J.IN_QUEUE: 0, J.IN_PROGRESS: 0}
        for r in rows:
            out[r["status"]] = int(r["n"])
        return out

    def list_requests(self, owner: Optional[str], limit: int = 50) -> list[Job]:
        limit = max(1, min(int(limit), 1000))
        con = self._conn()
        if owner is None:
            rows = con.execute(_SELECT + " ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = con.execute(_SELECT + " WHERE owner=? ORDER BY seq DESC LIMIT ?", (owner, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    # ------------------------------------------------------------------ worker side
    def claim_next(self, worker_id: str, *, now: Optional[float] = None,
                   endpoint_ids: Optional[Iterable[str]] = None,
                   match: Optional[Callable[[Job], bool]] = None, lookahead: int = 32) -> Optional[Job]:
        now = time.time() if now is None else now
        endpoint_ids = list(endpoint_ids) if endpoint_ids is not None else None
        claimed: Optional[Job] = None
        with self._tx() as con:
            expired = self._expire_due(con, now)
            sql = _SELECT + " WHERE status=?"
            args: list[Any] = [J.IN_QUEUE]
            if endpoint_ids is not None:
                if not endpoint_ids:
                    return None
                sql += " AND endpoint_id IN (" + ", ".join("?" for _ in endpoint_ids) + ")"
                args += endpoint_ids
            limit = max(1, lookahead) if match is not None else 1
            for row in con.execute(sql + " ORDER BY prio, seq LIMIT ?", [*args, limit]).fetchall():
                job = _row_to_job(row)
                if match is None or _matches(match, job):
                    claimed = J.apply(job, "claim", now=now, worker_id=worker_id)
                    self._save(con, claimed)
                    break
        self._notify_all(expired, "expire")
        if claimed is not None:
            self._notify(claimed, "claim")
        return claimed

    def expire_due(self, *, now: Optional[float] = None) -> list[Job]:
        now = time.time() if now is None else now
        # Cheap read first: most of the time nothing is due and no write lock is needed.
        row = self._conn().execute(
            "SELECT 1 FROM jobs WHERE status=? AND deadline IS NOT NULL AND deadline <= ? LIMIT 1",
            (J.IN_QUEUE, now)).fetchone()
        if row is None:
            return []
        with self._tx() as con:
            expired = self._expire_due(con, now)
        self._notify_all(expired, "expire")
        return expired

    def append_log(self, request_id: str, message: str, *, level: str = "INFO",
                   source: str = "worker", heartbeat: bool = True) -> None:
        now = time.time()
        with self._tx(fsync=False) as con:  # every denoising step: no fsync on the engine thread
            _insert_log(con, request_id, now, level, source, str(message))
            if heartbeat:
                con.execute("UPDATE jobs SET heartbeat_at=? WHERE request_id=? AND status=?",
                            (now, request_id, J.IN_PROGRESS))
            row = con.execute(_SELECT + " WHERE request_id=?", (request_id,)).fetchone()
        if row is not None:
            self._notify(_row_to_job(row), "log")

    def heartbeat(self, request_id: str, worker_id: str) -> bool:
        with self._tx() as con:
            cur = con.execute("UPDATE jobs SET heartbeat_at=? WHERE request_id=? AND status=? AND worker_id=?",
                              (time.time(), request_id, J.IN_PROGRESS, worker_id))
            return cur.rowcount > 0

    def complete_ok(self, request_id: str, result: dict[str, Any]) -> Job:
        return self._mutate(request_id, "complete_ok", result=result)

    def complete_error(self, request_id: str, error: dict[str, Any]) -> Job:
        return self._mutate(request_id, "complete_error", error=error)

    def release(self, request_id: str) -> Job:
        return self._mutate(request_id, "release")

    # ------------------------------------------------------------------ cancel
    def request_cancel(self, request_id: str, owner: Optional[str] = None) -> CancelOutcome:
        with self._tx() as con:
            job = self._load(con, request_id, owner)
            if job.status == J.IN_QUEUE:
                job = J.apply(job, "cancel")
                outcome = "cancelled"
            elif job.status == J.IN_PROGRESS:
                outcome = "already_requested" if job.cancel_requested else "cancel_requested"
                job = J.apply(job, "request_cancel")
            else:
                return CancelOutcome("already_completed", job)
            self._save(con, job)
        self._notify(job, "cancel" if outcome == "cancelled" else "request_cancel")
        return CancelOutcome(outcome, job)

    def is_cancel_requested(self, request_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE request_id=?",
                                   (request_id,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ recovery / retention
    def recover(self, *, max_attempts: int, stale_after: float,
                is_worker_alive: Optional[Callable[[str], Optional[bool]]] = None,
                now: Optional[float] = None) -> list[Job]:
        now = time.time() if now is None else now
        changed: list[Job] = []
        events: list[str] = []
        with self._tx() as con:
            rows = con.execute(_SELECT + " WHERE status=? ORDER BY seq", (J.IN_PROGRESS,)).fetchall()
            for row in rows:
                job = _row_to_job(row)
                alive = is_worker_alive(job.worker_id) if (is_worker_alive and job.worker_id) else None
                stale = (job.heartbeat_at or job.started_at or 0.0) < now - stale_after
                if alive is True or (alive is None and not stale):
                    continue
                limit = job.attempt_limit(max_attempts)
                if job.attempts >= limit:
                    why = ("the request asked not to be retried (x-fal-no-retry)" if limit < max_attempts
                           else f"the limit is {limit}")
                    new = J.apply(job, "crash_fail", now=now, reason=(
                        f"The server stopped while this request was running, {job.attempts} time(s) "
                        f"({why}); giving up so it cannot crash the service again."))
                    event = "crash_fail"
                else:
                    new = J.apply(job, "requeue", now=now)
                    event = "requeue"
                self._save(con, new)
                changed.append(new)
                events.append(event)
                if new.status == J.IN_QUEUE:
                    _insert_log(con, new.request_id, now, "WARNING", "service",
                                f"The worker running this request stopped (attempt {job.attempts}); re-queued.")
        for j, event in zip(changed, events):
            self._notify(j, event)
        return changed

    def purge(self, older_than: float, *, now: Optional[float] = None) -> list[Job]:
        now = time.time() if now is None else now
        cutoff = now - older_than
        with self._tx() as con:
            rows = con.execute(
                _SELECT + " WHERE status=? AND finished_at IS NOT NULL AND finished_at < ? "
                "AND webhook_state != ?", (J.COMPLETED, cutoff, J.WEBHOOK_PENDING)).fetchall()
            purged = [_row_to_job(r) for r in rows]
            for j in purged:
                con.execute("DELETE FROM job_logs WHERE request_id=?", (j.request_id,))
                con.execute("DELETE FROM jobs WHERE request_id=?", (j.request_id,))
        return purged

    # ------------------------------------------------------------------ webhooks
    def due_webhooks(self, now: Optional[float] = None, limit: int = 20, *,
                     lease_seconds: float = 60.0) -> list[Job]:
        now = time.time() if now is None else now
        with self._tx() as con:
            rows = con.execute(
                _SELECT + " WHERE webhook_state=? AND status=? AND webhook_next_at IS NOT NULL "
                "AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT ?",
                (J.WEBHOOK_PENDING, J.COMPLETED, now, int(limit))).fetchall()
            out = [_row_to_job(r) for r in rows]
            for j in out:
                con.execute("UPDATE jobs SET webhook_next_at=? WHERE request_id=?",
                            (now + lease_seconds, j.request_id))
        return out

    def record_webhook_attempt(self, request_id: str, delivered: bool,
                               next_attempt_at: Optional[float], error: Optional[str]) -> Job:
        with self._tx() as con:
            job = J.apply_webhook_attempt(self._load(con, request_id), delivered=delivered,
                                          next_attempt_at=next_attempt_at, error=error)
            self._save(con, job)
        self._notify(job, "webhook")
        return job
