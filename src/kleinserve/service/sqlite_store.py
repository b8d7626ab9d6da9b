"""The embedded JobStore: one SQLite database in WAL mode under the data directory.

- Durable: `synchronous=FULL`; `submit` returns only after its transaction committed, so an id handed
  to a client survives a SIGKILL (and a power cut) of the server. Submits that arrive together share
  one commit (group commit: one fsync for all of them). Log lines and progress (one per
  denoising step, written on the engine thread) commit without the fsync (`synchronous=NORMAL`): they
  survive a SIGKILL all the same, and the next durable commit (the job's completion) flushes them.
- Private: jobs.sqlite3 (and its -wal/-shm, which SQLite creates with the database's mode) is 0600.
- Thread-safe: one connection per thread (sqlite3 connections are not shared across threads; the
  connection of a thread that ended is closed). This process's write transactions take turns on a
  lock, not in SQLite's busy handler (which sleeps up to 100 ms a time).
- Multi-process safe (one box, several worker processes): every mutation is `BEGIN IMMEDIATE` (takes
  the write lock up front, so two workers cannot claim the same job), then read -> `jobs.apply` (the
  one state machine) -> write -> COMMIT. Readers never block writers in WAL mode.
- The clock is this machine's (`time.time()`): every process sharing the file is on this box.
- Events: the `job_events` table, written in the same transaction as the change. `wait_events` wakes
  at once on this process's commits (a Condition) and polls the table every ~20 ms for the others'.
- Schema: versioned (`meta.schema_version`); older databases are migrated in one transaction, a newer
  one is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from . import jobs as J
from .jobs import Job
from .store import (
    DEFAULT_LEASE_SECONDS,
    EV_LOG,
    EV_PROGRESS,
    EV_STATUS,
    WATCH_TTL_SECONDS,
    CancelOutcome,
    JobEvent,
    JobNotFound,
    JobStore,
    Lease,
    Preview,
    SecretVersions,
    StoreOutdated,
)
from .store_rows import (
    COLUMNS,
    check_lease,
    check_new,
    iso_timestamp,
    job_values,
    log_line,
    log_text,
    matches,
    requeue_note,
    row_to_job,
    sweep_decision,
)

__all__ = ["SQLiteJobStore", "SCHEMA_VERSION", "iso_timestamp"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
POLL_SECONDS = 0.02  # how often wait_events looks for other processes' events

# Schema 1 (kleinserve before the fleet work): created as it was, then migrated.
_SCHEMA_1 = [
    """CREATE TABLE IF NOT EXISTS jobs (
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
)""",
    "CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, prio, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs(status, deadline)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(status, finished_at)",
    "CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs(webhook_state, webhook_next_at)",
    """CREATE TABLE IF NOT EXISTS job_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS job_logs_request ON job_logs(request_id, id)",
]

# MIGRATIONS[v] takes the schema from v to v + 1.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "ALTER TABLE jobs ADD COLUMN lease_expires_at REAL",
        "ALTER TABLE jobs ADD COLUMN progress_step INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN progress_total INTEGER NOT NULL DEFAULT 0",
        # a job running under schema 1 had no lease: it gets the default one from its last heartbeat
        f"UPDATE jobs SET lease_expires_at = COALESCE(heartbeat_at, started_at, created_at) + "
        f"{DEFAULT_LEASE_SECONDS} WHERE status = 'IN_PROGRESS'",
        "CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(status, lease_expires_at)",
        """CREATE TABLE job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    preview INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
)""",
        "CREATE INDEX job_events_created ON job_events(created_at)",
        """CREATE TABLE job_previews (
    request_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL,
    data_uri TEXT NOT NULL,
    updated_at REAL NOT NULL
)""",
        """CREATE TABLE job_watchers (
    request_id TEXT NOT NULL,
    watcher_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (request_id, watcher_id)
)""",
        """CREATE TABLE workers (
    worker_id TEXT PRIMARY KEY,
    endpoint_ids TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    registered_at REAL NOT NULL,
    expires_at REAL NOT NULL
)""",
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ],
    2: ["ALTER TABLE secrets ADD COLUMN active_from REAL"],  # a staged secret's time (rotate_secret)
}
assert max(MIGRATIONS) + 1 == SCHEMA_VERSION

_SELECT = "SELECT seq, " + ", ".join(COLUMNS) + " FROM jobs"


def _row_to_job(row: sqlite3.Row) -> Job:
    return row_to_job(row)


def _job_values(job: Job) -> list[Any]:
    return job_values(job, bool_type=int)


def _create_private(path: Path) -> None:
    """Creates the database file 0600 (SQLite gives its -wal/-shm the same mode); tightens an old one."""
    try:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
    except OSError:
        return  # sqlite3.connect reports what is wrong with the path
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        try:
            if p.exists() and p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except OSError:  # another user's file: SQLite will say so if it matters
            pass


class _PendingSubmit:
    """A submit waiting for the group commit that stores it (see SQLiteJobStore.submit)."""

    __slots__ = ("job", "done", "result", "error")

    def __init__(self, job: Job):
        self.job = job
        self.done = False
        self.result: Optional[Job] = None
        self.error: Optional[BaseException] = None


class SQLiteJobStore(JobStore):
    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0, migrate: bool = True):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(self.path)
        self._busy_timeout_s = busy_timeout_s
        self._may_migrate = migrate
        self._local = threading.local()
        self._all_conns: list[tuple[threading.Thread, sqlite3.Connection]] = []  # (owner thread, its conn)
        self._conns_lock = threading.Lock()
        self._closed = False
        self._write_lock = threading.Lock()  # one write transaction at a time in this process (see _tx)
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingSubmit] = []  # submits waiting for their group commit
        self._events_cond = threading.Condition()
        self._local_commits = 0  # bumped (under _events_cond) after each commit that wrote an event
        con = self._conn()
        con.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    @classmethod
    def in_data_dir(cls, data_dir: Path | str) -> SQLiteJobStore:
        return cls(Path(data_dir) / "jobs.sqlite3")

    def describe(self) -> str:
        return f"sqlite://{self.path.resolve()}" if self.path.is_absolute() else f"sqlite:{self.path}"

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self._tx() as con:  # BEGIN IMMEDIATE: one process migrates, the others then see it done
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                for sql in _SCHEMA_1:
                    con.execute(sql)
                version = 1
                con.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
            else:
                version = int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer kleinserve (schema {version}; this one knows "
                    f"up to {SCHEMA_VERSION}): upgrade kleinserve, or point --store at another database")
            if version < SCHEMA_VERSION and not self._may_migrate:
                raise StoreOutdated(f"{self.path} has schema {version}, older than this kleinserve's "
                                    f"({SCHEMA_VERSION}): upgrade the servers first (they migrate it as they start)")
            while version < SCHEMA_VERSION:
                for sql in MIGRATIONS[version]:
                    con.execute(sql)
                version += 1
                log.info("%s: migrated the job store to schema %d", self.path, version)
            con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))

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
            me = threading.current_thread()
            with self._conns_lock:
                # Threads come and go (the API's thread pool retires a thread idle for 10 s): close
                # the connections of those that ended, or each burst of traffic after a quiet spell
                # would leave its connections (file descriptors, page caches) behind for good.
                dead = [c for t, c in self._all_conns if not t.is_alive()]
                self._all_conns = [(t, c) for t, c in self._all_conns if t.is_alive()]
                self._all_conns.append((me, con))
            for c in dead:
                try:
                    c.close()
                except Exception:  # pragma: no cover - closing is best effort
                    pass
        return con

    @contextmanager
    def _tx(self, *, fsync: bool = True, locked: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. `fsync=False`: the commit is not synced to disk (WAL: it survives a
        crash of the process, not of the machine, until the next synced commit). `locked`: the caller
        already holds `_write_lock` (and keeps it)."""
        con = self._conn()
        # This process's writers queue on a lock that wakes the next one as soon as the commit is
        # done; left to SQLite, a writer that finds the database locked sleeps in its busy handler
        # (up to 100 ms a time, not woken by the commit). Other processes still meet at BEGIN
        # IMMEDIATE (busy_timeout).
        if not locked:
            self._write_lock.acquire()
        if not fsync:
            con.execute("PRAGMA synchronous=NORMAL")
        try:
            con.execute("BEGIN IMMEDIATE")
            changes_before = con.total_changes
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            else:
                con.execute("COMMIT")
                if con.total_changes != changes_before:
                    self._wake()
        finally:
            try:
                if not fsync:
                    con.execute("PRAGMA synchronous=FULL")
            finally:
                if not locked:
                    self._write_lock.release()

    def _wake(self) -> None:
        with self._events_cond:
            self._local_commits += 1
            self._events_cond.notify_all()

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for _, con in conns:
            try:
                con.close()
            except Exception:
                pass
        self._local = threading.local()
        self._wake()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _find(con: sqlite3.Connection, request_id: str) -> Optional[Job]:
        row = con.execute(_SELECT + " WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else _row_to_job(row)

    def _load(self, con: sqlite3.Connection, request_id: str, owner: Optional[str] = None) -> Job:
        job = self._find(con, request_id)
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(request_id)
        return job

    @staticmethod
    def _event(con: sqlite3.Connection, request_id: str, kind: str, now: float, *, event: str = "",
               status: str = "", step: int = 0, total: int = 0, preview: bool = False) -> None:
        con.execute("INSERT INTO job_events(request_id, kind, event, status, step, total, preview, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (request_id, kind, event, status, int(step), int(total), int(bool(preview)), now))

    def _save(self, con: sqlite3.Connection, job: Job, event: str, now: float) -> None:
        """Writes the job back and logs its status event (same transaction)."""
        sets = ", ".join(f"{c}=?" for c in COLUMNS[1:]) + ", prio=?"
        values = _job_values(job)[1:] + [job.priority_rank, job.request_id]
        con.execute(f"UPDATE jobs SET {sets} WHERE request_id=?", values)
        if job.status != J.IN_PROGRESS or event == "claim":  # a preview belongs to one running attempt
            con.execute("DELETE FROM job_previews WHERE request_id=?", (job.request_id,))
        self._event(con, job.request_id, EV_STATUS, now, event=event, status=job.status)

    def _fenced(self, con: sqlite3.Connection, lease: Lease) -> Job:
        return check_lease(self._find(con, lease.request_id), lease)

    def _expire_due(self, con: sqlite3.Connection, now: float) -> list[Job]:
        rows = con.execute(
            _SELECT + " WHERE status=? AND deadline IS NOT NULL AND deadline <= ? ORDER BY seq",
            (J.IN_QUEUE, now)).fetchall()
        out = []
        for row in rows:
            job = J.apply(_row_to_job(row), "expire", now=now)
            self._save(con, job, "expire", now)
            out.append(job)
        return out

    # ------------------------------------------------------------------ submit / read
    def submit(self, job: Job) -> Job:
        """Group commit: submits that arrive while another write holds the lock wait for it, then the
        first of them to get the lock commits all of them in one transaction (one fsync). Each still
        returns only after the commit that holds its job; one that fails (e.g. a duplicate request
        id) fails alone (a savepoint each)."""
        check_new(job)
        item = _PendingSubmit(job)
        with self._pending_lock:
            self._pending.append(item)
        with self._write_lock:
            if not item.done:  # else the holder before us committed it
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    with self._tx(locked=True) as con:
                        now = time.time()
                        for it in batch:
                            self._insert_new(con, it, now)
                except BaseException as exc:  # the commit failed: none of the batch is stored
                    for it in batch:
                        it.result, it.error = None, exc
                    raise
                finally:
                    for it in batch:
                        it.done = True
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _insert_new(self, con: sqlite3.Connection, item: _PendingSubmit, now: float) -> None:
        cols = ", ".join(COLUMNS) + ", prio"
        marks = ", ".join("?" for _ in range(len(COLUMNS) + 1))
        con.execute("SAVEPOINT submit")
        try:
            cur = con.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})",
                              _job_values(item.job) + [item.job.priority_rank])
            self._event(con, item.job.request_id, EV_STATUS, now, event="submit", status=item.job.status)
        except sqlite3.DatabaseError as exc:  # this job only (a duplicate id, ...): the others go on
            con.execute("ROLLBACK TO submit")
            con.execute("RELEASE submit")
            item.error = exc
            return
        con.execute("RELEASE submit")
        job = item.job.copy()
        assert cur.lastrowid is not None  # set by the INSERT
        job.seq = int(cur.lastrowid)
        item.result = job

    def get(self, request_id: str, owner: Optional[str] = None, *, with_logs: bool = False) -> Job:
        job = self._load(self._conn(), request_id, owner)
        if with_logs:
            job.logs = self.get_logs(request_id)
        return job

    def get_logs(self, request_id: str, since: int = 0) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT timestamp, level, source, message FROM job_logs WHERE request_id=? ORDER BY id "
            "LIMIT -1 OFFSET ?", (request_id, max(0, int(since)))).fetchall()
        return [log_line(r["timestamp"], r["level"], r["source"], r["message"]) for r in rows]

    def queue_position(self, request_id: str) -> Optional[int]:
        con = self._conn()
        row = con.execute("SELECT status, prio, seq FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        if row is None or row["status"] != J.IN_QUEUE:
            return None
        n = con.execute(
            "SELECT COUNT(*) FROM jobs WHERE status=? AND (prio < ? OR (prio = ? AND seq < ?))",
            (J.IN_QUEUE, row["prio"], row["prio"], row["seq"])).fetchone()[0]
        return int(n)

    def queue_positions(self, request_ids: Iterable[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return {}
        # One pass over the queue in claim order (the jobs_queue index), whatever the number of ids;
        # json_each keeps it one statement (no limit on the number of bound variables).
        rows = self._conn().execute(
            "SELECT request_id, pos FROM (SELECT request_id, ROW_NUMBER() OVER (ORDER BY prio, seq) - 1 AS pos "
            "FROM jobs WHERE status=?) WHERE request_id IN (SELECT value FROM json_each(?))",
            (J.IN_QUEUE, json.dumps(ids))).fetchall()
        return {r["request_id"]: int(r["pos"]) for r in rows}

    def queue_depth(self) -> dict[str, int]:
        rows = self._conn().execute(
            "SELECT status, COUNT(*) AS n FROM jobs WHERE status IN (?, ?) GROUP BY status",
            (J.IN_QUEUE, J.IN_PROGRESS)).fetchall()
        out = {J.IN_QUEUE: 0, J.IN_PROGRESS: 0}
        for r in rows:
            out[r["status"]] = int(r["n"])
        return out

    def queued_count(self, owner: Optional[str] = None) -> int:
        if owner is None:
            row = self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status=?", (J.IN_QUEUE,)).fetchone()
        else:
            row = self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status=? AND owner=?",
                                       (J.IN_QUEUE, owner)).fetchone()
        return int(row[0])

    def list_requests(self, owner: Optional[str], limit: int = 50) -> list[Job]:
        limit = max(1, min(int(limit), 1000))
        con = self._conn()
        if owner is None:
            rows = con.execute(_SELECT + " ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = con.execute(_SELECT + " WHERE owner=? ORDER BY seq DESC LIMIT ?", (owner, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    # ------------------------------------------------------------------ worker side (fenced)
    def claim_next(self, worker_id: str, *, now: Optional[float] = None,
                   endpoint_ids: Optional[Iterable[str]] = None,
                   match: Optional[Callable[[Job], bool]] = None, lookahead: int = 32,
                   lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Optional[Job]:
        now = time.time() if now is None else now
        endpoint_ids = list(endpoint_ids) if endpoint_ids is not None else None
        claimed: Optional[Job] = None
        with self._tx() as con:
            self._expire_due(con, now)
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
                if match is None or matches(match, job):
                    claimed = J.apply(job, "claim", now=now, worker_id=worker_id, lease_seconds=lease_seconds)
                    self._save(con, claimed, "claim", now)
                    break
        return claimed

    def heartbeat(self, lease: Lease, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        now = time.time()
        with self._tx(fsync=False) as con:
            self._fenced(con, lease)
            con.execute("UPDATE jobs SET heartbeat_at=?, lease_expires_at=? WHERE request_id=?",
                        (now, now + lease_seconds, lease.request_id))

    def append_log(self, request_id: str, message: str, *, level: str = "INFO",
                   source: str = "worker", lease: Optional[Lease] = None) -> None:
        now = time.time()
        with self._tx(fsync=False) as con:  # every denoising step: no fsync on the engine thread
            if lease is not None:
                if lease.request_id != request_id:
                    raise ValueError(f"the lease is for request {lease.request_id}, not {request_id}")
                self._fenced(con, lease)
            con.execute("INSERT INTO job_logs(request_id, timestamp, level, source, message) VALUES (?, ?, ?, ?, ?)",
                        (request_id, now, log_text(level), log_text(source), log_text(message)))
            self._event(con, request_id, EV_LOG, now)

    def record_progress(self, lease: Lease, step: int, total: int, preview: Optional[str] = None) -> None:
        now = time.time()
        with self._tx(fsync=False) as con:
            self._fenced(con, lease)
            con.execute("UPDATE jobs SET progress_step=?, progress_total=? WHERE request_id=?",
                        (int(step), int(total), lease.request_id))
            if preview is not None:
                con.execute("INSERT INTO job_previews(request_id, step, data_uri, updated_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT(request_id) DO UPDATE SET step=excluded.step, "
                            "data_uri=excluded.data_uri, updated_at=excluded.updated_at",
                            (lease.request_id, int(step), preview, now))
            self._event(con, lease.request_id, EV_PROGRESS, now, step=step, total=total,
                        preview=preview is not None)

    def _fenced_mutate(self, lease: Lease, event: str, **kw: Any) -> Job:
        now = time.time()
        with self._tx() as con:
            job = J.apply(self._fenced(con, lease), event, now=now, **kw)
            self._save(con, job, event, now)
        return job

    def expire_due(self, *, now: Optional[float] = None) -> list[Job]:
        now = time.time() if now is None else now
        # Cheap read first: most of the time nothing is due and no write lock is needed.
        row = self._conn().execute(
            "SELECT 1 FROM jobs WHERE status=? AND deadline IS NOT NULL AND deadline <= ? LIMIT 1",
            (J.IN_QUEUE, now)).fetchone()
        if row is None:
            return []
        with self._tx() as con:
            return self._expire_due(con, now)

    # ------------------------------------------------------------------ cancel
    def request_cancel(self, request_id: str, owner: Optional[str] = None) -> CancelOutcome:
        now = time.time()
        with self._tx() as con:
            job = self._load(con, request_id, owner)
            if job.status == J.IN_QUEUE:
                job, outcome, event = J.apply(job, "cancel", now=now), "cancelled", "cancel"
            elif job.status == J.IN_PROGRESS:
                outcome = "already_requested" if job.cancel_requested else "cancel_requested"
                job, event = J.apply(job, "request_cancel", now=now), "request_cancel"
            else:
                return CancelOutcome("already_completed", job)
            if outcome != "already_requested":
                self._save(con, job, event, now)
        return CancelOutcome(outcome, job)

    def is_cancel_requested(self, request_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE request_id=?",
                                   (request_id,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ crash recovery, retention
    def recover(self, *, max_attempts: int,
                is_worker_alive: Optional[Callable[[str], Optional[bool]]] = None,
                now: Optional[float] = None) -> list[Job]:
        now = time.time() if now is None else now
        changed: list[Job] = []
        with self._tx() as con:
            for row in con.execute(_SELECT + " WHERE status=? ORDER BY seq", (J.IN_PROGRESS,)).fetchall():
                old = _row_to_job(row)
                decision = sweep_decision(old, max_attempts=max_attempts, now=now, is_worker_alive=is_worker_alive)
                if decision is None:
                    continue
                new, event = decision
                self._save(con, new, event, now)
                if new.status == J.IN_QUEUE:
                    con.execute("INSERT INTO job_logs(request_id, timestamp, level, source, message) "
                                "VALUES (?, ?, 'WARNING', 'service', ?)", (new.request_id, now, requeue_note(old)))
                changed.append(new)
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
                for table in ("job_logs", "job_previews", "job_watchers", "jobs"):
                    con.execute(f"DELETE FROM {table} WHERE request_id=?", (j.request_id,))
            con.execute("DELETE FROM job_events WHERE created_at < ?", (cutoff,))
            con.execute("DELETE FROM job_watchers WHERE expires_at < ?", (now,))
            con.execute("DELETE FROM workers WHERE expires_at < ?", (cutoff,))
        return purged

    # ------------------------------------------------------------------ events
    def last_event_seq(self) -> int:
        row = self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM job_events").fetchone()
        return int(row[0])

    def _events_after(self, after: int) -> list[JobEvent]:
        rows = self._conn().execute(
            "SELECT seq, request_id, kind, event, status, step, total, preview FROM job_events "
            "WHERE seq > ? ORDER BY seq LIMIT 1000", (int(after),)).fetchall()
        return [JobEvent(seq=r["seq"], request_id=r["request_id"], kind=r["kind"], event=r["event"],
                         status=r["status"], step=r["step"], total=r["total"], preview=bool(r["preview"]))
                for r in rows]

    def wait_events(self, after: int, timeout: float) -> list[JobEvent]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._events_cond:
                seen = self._local_commits
            events = self._events_after(after)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0 or self._closed:
                return events
            with self._events_cond:  # this process's commits wake at once; the others' on the next poll
                self._events_cond.wait_for(lambda: self._local_commits != seen,  # noqa: B023 - waited on here
                                           timeout=min(POLL_SECONDS, remaining))

    def get_preview(self, request_id: str) -> Optional[Preview]:
        row = self._conn().execute("SELECT step, data_uri FROM job_previews WHERE request_id=?",
                                   (request_id,)).fetchone()
        return None if row is None else Preview(step=int(row["step"]), data_uri=row["data_uri"])

    def watch(self, request_id: str, watcher_id: str, ttl: float = WATCH_TTL_SECONDS) -> None:
        with self._tx(fsync=False) as con:
            con.execute("INSERT INTO job_watchers(request_id, watcher_id, expires_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(request_id, watcher_id) DO UPDATE SET expires_at=excluded.expires_at",
                        (request_id, watcher_id, time.time() + ttl))

    def unwatch(self, request_id: str, watcher_id: str) -> None:
        with self._tx(fsync=False) as con:
            con.execute("DELETE FROM job_watchers WHERE request_id=? AND watcher_id=?", (request_id, watcher_id))

    def is_watched(self, request_id: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM job_watchers WHERE request_id=? AND expires_at > ? LIMIT 1",
                                   (request_id, time.time())).fetchone()
        return row is not None

    # ------------------------------------------------------------------ fleet: secrets and workers
    def shared_secret(self, name: str, create: Callable[[], bytes]) -> bytes:
        row = self._conn().execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        if row is not None:
            return bytes(row[0])
        candidate = bytes(create())
        with self._tx() as con:
            con.execute("INSERT INTO secrets(name, value) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                        (name, candidate))
            row = con.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        return bytes(row[0])

    _SECRET_ROWS = "SELECT name, value, active_from FROM secrets WHERE name IN (?, ?, ?)"

    def secret_versions(self, name: str) -> SecretVersions:
        return SecretVersions.from_rows(name, self._conn().execute(self._SECRET_ROWS, SecretVersions.row_names(name)))

    def _update_secret(self, name: str, change: Callable[[SecretVersions], SecretVersions]) -> None:
        names = SecretVersions.row_names(name)
        with self._tx() as con:
            before = SecretVersions.from_rows(name, con.execute(self._SECRET_ROWS, names))
            after = change(before)
            if after != before:
                con.execute("DELETE FROM secrets WHERE name IN (?, ?, ?)", names)
                con.executemany("INSERT INTO secrets(name, value, active_from) VALUES (?, ?, ?)", after.rows(name))

    def register_worker(self, worker_id: str, endpoint_ids: Iterable[str], *, ttl: float,
                        info: Optional[dict[str, Any]] = None) -> None:
        now = time.time()
        with self._tx(fsync=False) as con:
            con.execute("INSERT INTO workers(worker_id, endpoint_ids, info, registered_at, expires_at) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(worker_id) DO UPDATE SET "
                        "endpoint_ids=excluded.endpoint_ids, info=excluded.info, expires_at=excluded.expires_at",
                        (worker_id, json.dumps(sorted(set(endpoint_ids))), json.dumps(info or {}), now, now + ttl))

    def deregister_worker(self, worker_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM workers WHERE worker_id=?", (worker_id,))

    def live_workers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._conn().execute("SELECT endpoint_ids FROM workers WHERE expires_at > ?", (time.time(),)):
            for ep in json.loads(r[0]):
                out[ep] = out.get(ep, 0) + 1
        return out

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
        now = time.time()
        with self._tx() as con:
            job = J.apply_webhook_attempt(self._load(con, request_id), delivered=delivered,
                                          next_attempt_at=next_attempt_at, error=error)
            self._save(con, job, "webhook", now)
        return job
