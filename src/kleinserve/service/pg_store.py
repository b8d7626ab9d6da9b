"""The fleet JobStore: PostgreSQL, on psycopg 3 + psycopg-pool, in plain SQL.

Same semantics as the SQLite store (the conformance suite runs on both); what differs:

- Claims: `SELECT ... FOR UPDATE SKIP LOCKED` in claim order (priority rank, seq), so many workers on
  many hosts claim concurrently without waiting on each other or ever taking the same job.
- The clock is the database's (`clock_timestamp()`): leases, deadlines, watcher and worker expiry are
  compared with it, so hosts with skewed clocks agree. (`now=` parameters override it in tests.)
- Every change appends its events to `job_events` and `NOTIFY kleinserve_events` (payload: only the
  newest seq) in the same transaction. The event seq comes from a one-row counter updated last in the
  transaction: its row lock orders the transactions that write events, so seqs become visible in
  order and a reader that has seen seq N never misses a smaller one later.
- `wait_events` reads `seq > after`; while there is nothing, it sleeps until a background thread,
  LISTENing on its own connection, hears a NOTIFY (or at most a second, as a safety net). When the
  server restarts, that thread reconnects, LISTENs again and wakes every waiter to re-read; the pool
  checks a connection before handing it out, so the other calls reconnect by themselves.
- Durability: submits and state changes commit with `synchronous_commit=on` (the server default);
  log lines, progress, heartbeats and watchers with `SET LOCAL synchronous_commit = off`.
- Schema: versioned (`kleinserve_meta.schema_version`); created and migrated under
  `pg_advisory_xact_lock`, so any number of replicas and workers may start at once on an empty
  database. A schema newer than this code knows is refused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

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
    redact_url,
)
from .store_rows import (
    COLUMNS,
    check_lease,
    check_new,
    job_values,
    log_line,
    log_text,
    matches,
    requeue_note,
    row_to_job,
    sweep_decision,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CHANNEL = "kleinserve_events"
IDLE_IN_TX_TIMEOUT_MS = 10_000  # our transactions last milliseconds; a stopped client's are ended
_LOCK_MIGRATE = 0x6B6C6E01  # pg_advisory_xact_lock keys ("kln" + n)
_LOCK_RECOVER = 0x6B6C6E02
_SAFETY_POLL_S = 1.0  # wait_events re-reads at least this often even if a NOTIFY went missing

# MIGRATIONS[v] takes the schema from v to v + 1 (0: an empty database).
MIGRATIONS: dict[int, list[str]] = {
    0: [
        """CREATE TABLE jobs (
    seq bigserial PRIMARY KEY,
    request_id text NOT NULL UNIQUE,
    endpoint_id text NOT NULL,
    owner text NOT NULL,
    input text NOT NULL,
    status text NOT NULL,
    priority text NOT NULL,
    prio integer NOT NULL,
    created_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    deadline double precision,
    attempts integer NOT NULL DEFAULT 0,
    cancel_requested boolean NOT NULL DEFAULT false,
    worker_id text,
    heartbeat_at double precision,
    lease_expires_at double precision,
    progress_step integer NOT NULL DEFAULT 0,
    progress_total integer NOT NULL DEFAULT 0,
    result text,
    error text,
    mode text NOT NULL DEFAULT 'queue',
    public_base text,
    webhook_url text,
    webhook_state text NOT NULL DEFAULT 'none',
    webhook_attempts integer NOT NULL DEFAULT 0,
    webhook_next_at double precision,
    webhook_last_error text,
    extra text NOT NULL DEFAULT '{}'
)""",
        "CREATE INDEX jobs_queue ON jobs (prio, seq) WHERE status = 'IN_QUEUE'",
        "CREATE INDEX jobs_deadline ON jobs (deadline) WHERE status = 'IN_QUEUE' AND deadline IS NOT NULL",
        "CREATE INDEX jobs_running ON jobs (lease_expires_at) WHERE status = 'IN_PROGRESS'",
        "CREATE INDEX jobs_owner ON jobs (owner, seq)",
        "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE status = 'COMPLETED'",
        "CREATE INDEX jobs_webhook ON jobs (webhook_next_at) WHERE webhook_state = 'pending'",
        """CREATE TABLE job_logs (
    id bigserial PRIMARY KEY,
    request_id text NOT NULL,
    timestamp double precision NOT NULL,
    level text NOT NULL,
    source text NOT NULL,
    message text NOT NULL
)""",
        "CREATE INDEX job_logs_request ON job_logs (request_id, id)",
        """CREATE TABLE job_events (
    seq bigint PRIMARY KEY,
    request_id text NOT NULL,
    kind text NOT NULL,
    event text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT '',
    step integer NOT NULL DEFAULT 0,
    total integer NOT NULL DEFAULT 0,
    preview boolean NOT NULL DEFAULT false,
    created_at double precision NOT NULL
)""",
        "CREATE INDEX job_events_created ON job_events (created_at)",
        "CREATE TABLE job_event_counter (id boolean PRIMARY KEY DEFAULT true CHECK (id), last bigint NOT NULL)",
        "INSERT INTO job_event_counter (id, last) VALUES (true, 0)",
        """CREATE TABLE job_previews (
    request_id text PRIMARY KEY,
    step integer NOT NULL,
    data_uri text NOT NULL,
    updated_at double precision NOT NULL
)""",
        """CREATE TABLE job_watchers (
    request_id text NOT NULL,
    watcher_id text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (request_id, watcher_id)
)""",
        """CREATE TABLE workers (
    worker_id text PRIMARY KEY,
    endpoint_ids text[] NOT NULL,
    info text NOT NULL DEFAULT '{}',
    registered_at double precision NOT NULL,
    expires_at double precision NOT NULL
)""",
        "CREATE TABLE secrets (name text PRIMARY KEY, value bytea NOT NULL)",
    ],
    1: ["ALTER TABLE secrets ADD COLUMN active_from double precision"],  # a staged secret's time (rotate_secret)
}
assert max(MIGRATIONS) + 1 == SCHEMA_VERSION

_SELECT = "SELECT seq, " + ", ".join(COLUMNS) + " FROM jobs"
_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8 AS now"


def _job_values(job: Job) -> list[Any]:
    return job_values(job, bool_type=bool)


def _row_to_job(row: dict[str, Any]) -> Job:
    return row_to_job(row)


_Cursor = psycopg.Cursor[DictRow]  # every cursor here is made with row_factory=dict_row


def _one(cur: _Cursor) -> DictRow:
    """The row of a statement that always returns one (an aggregate, a RETURNING, a row just written)."""
    row = cur.fetchone()
    if row is None:
        raise psycopg.DataError("the statement returned no row")
    return row


@dataclass
class _Tx:
    """One transaction: its cursor, the database clock read once, and the events to append at its end."""

    cur: _Cursor
    fixed_now: Optional[float] = None
    events: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def now(self) -> float:
        if self.fixed_now is None:
            self.fixed_now = float(_one(self.cur.execute(_NOW))["now"])
        return self.fixed_now

    def event(self, request_id: str, kind: str, *, event: str = "", status: str = "", step: int = 0,
              total: int = 0, preview: bool = False) -> None:
        self.events.append((request_id, kind, event, status, int(step), int(total), bool(preview)))


def describe_conninfo(url: str) -> str:
    """postgresql://user@host:port/dbname, never the password."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return redact_url(url)
    user = f"{d['user']}@" if d.get("user") else ""
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{user}{d.get('host', '')}{port}/{d.get('dbname', '')}"


class PostgresJobStore(JobStore):
    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, connect_timeout: float = 30.0,
                 migrate: bool = True):
        super().__init__()
        self._url = url
        self._may_migrate = migrate
        self._closed = False
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise ValueError(f"--store {redact_url(url)!r}: not a valid PostgreSQL URL ({e})") from None
        self._connect_timeout = connect_timeout
        # A process that stops inside a transaction (paused, swapped out, hung) must not hold row or
        # sweeper locks for the fleet: the server ends such a session after IDLE_IN_TX_TIMEOUT_MS.
        self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size,
                                    kwargs={"autocommit": True,
                                            "options": "-c idle_in_transaction_session_timeout="
                                                       f"{IDLE_IN_TX_TIMEOUT_MS}"},
                                    check=ConnectionPool.check_connection, open=False,
                                    name=f"kleinserve-store-{id(self):x}", timeout=connect_timeout)
        self._pool.open(wait=False)
        self._cond = threading.Condition()
        self._wakeups = 0  # bumped on every NOTIFY heard, local commit, and listener (re)connect
        self._listener: Optional[threading.Thread] = None
        self._listener_lock = threading.Lock()
        self._listen_conn: Optional[psycopg.Connection] = None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def describe(self) -> str:
        return describe_conninfo(self._url)

    def ping(self) -> None:
        with self._pool.connection(timeout=5.0) as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._closed = True
        self._wake()
        conn = self._listen_conn
        t = self._listener
        if t is not None:
            t.join(5)
        if conn is not None and not conn.closed:
            try:
                conn.close()
            except Exception:
                pass
        self._pool.close()

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        try:  # a direct connection first: its error says what is wrong (no server, auth, no database)
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.OperationalError as e:
            detail = " ".join(str(e).split())
            raise ConnectionError(f"cannot connect to the job store {self.describe()}: {detail}") from None
        with conn, conn.transaction():
            # Many replicas and workers may start at once on an empty database: one migrates, the
            # others wait here, then find the schema current.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_MIGRATE,))
            conn.execute("CREATE TABLE IF NOT EXISTS kleinserve_meta (key text PRIMARY KEY, value text NOT NULL)")
            row = conn.execute("SELECT value FROM kleinserve_meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.describe()} holds a kleinserve schema newer than this code knows (schema {version}; "
                    f"this kleinserve knows up to {SCHEMA_VERSION}): upgrade kleinserve, or use another database")
            if version < SCHEMA_VERSION and not self._may_migrate:
                raise StoreOutdated(f"{self.describe()} has schema {version}, older than this kleinserve's "
                                    f"({SCHEMA_VERSION}): upgrade the servers first (they migrate it as they start)")
            start = version
            while version < SCHEMA_VERSION:
                for sql in MIGRATIONS[version]:
                    conn.execute(sql)
                version += 1
            if version != start:
                conn.execute("INSERT INTO kleinserve_meta (key, value) VALUES ('schema_version', %s) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))
                log.info("%s: job store schema %d -> %d", self.describe(), start, version)

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _tx(self, *, durable: bool = True, now: Optional[float] = None) -> Iterator[_Tx]:
        tx: Optional[_Tx] = None
        with self._pool.connection() as conn:
            with conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                if not durable:
                    cur.execute("SET LOCAL synchronous_commit = off")
                tx = _Tx(cur, fixed_now=now)
                yield tx
                self._flush_events(tx)
        if tx is not None and tx.events:
            self._wake()

    def _flush_events(self, tx: _Tx) -> None:
        if not tx.events:
            return
        n = len(tx.events)
        created = tx.now  # read before the lock is taken: it is held until the commit
        # Last in the transaction: the counter's row lock orders event writers until they commit.
        last = int(_one(tx.cur.execute("UPDATE job_event_counter SET last = last + %s RETURNING last",
                                       (n,)))["last"])
        rows = [(last - n + 1 + i, *ev, created) for i, ev in enumerate(tx.events)]
        if n == 1:
            tx.cur.execute("INSERT INTO job_events (seq, request_id, kind, event, status, step, total, preview, "
                           "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows[0])
        else:
            tx.cur.executemany("INSERT INTO job_events (seq, request_id, kind, event, status, step, total, "
                               "preview, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        tx.cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(last)))

    @contextmanager
    def _cursor(self, timeout: Optional[float] = None) -> Iterator[_Cursor]:
        """A cursor for reads (autocommit: each statement sees the latest commits)."""
        with self._pool.connection(timeout=timeout) as conn:
            yield conn.cursor(row_factory=dict_row)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _find(cur: _Cursor, request_id: str, *, lock: bool = True) -> Optional[Job]:
        row = cur.execute(_SELECT + " WHERE request_id = %s" + (" FOR UPDATE" if lock else ""),
                          (request_id,)).fetchone()
        return None if row is None else _row_to_job(row)

    def _load(self, cur: _Cursor, request_id: str, owner: Optional[str] = None, *,
              lock: bool = True) -> Job:
        job = self._find(cur, request_id, lock=lock)
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(request_id)
        return job

    @staticmethod
    def _save(tx: _Tx, job: Job, event: str) -> None:
        sets = ", ".join(f"{c} = %s" for c in COLUMNS[1:]) + ", prio = %s"
        tx.cur.execute(f"UPDATE jobs SET {sets} WHERE request_id = %s",
                       _job_values(job)[1:] + [job.priority_rank, job.request_id])
        if job.status != J.IN_PROGRESS or event == "claim":  # a preview belongs to one running attempt
            tx.cur.execute("DELETE FROM job_previews WHERE request_id = %s", (job.request_id,))
        tx.event(job.request_id, EV_STATUS, event=event, status=job.status)

    def _fenced(self, tx: _Tx, lease: Lease) -> Job:
        return check_lease(self._find(tx.cur, lease.request_id), lease)

    def _expire_due(self, tx: _Tx) -> list[Job]:
        rows = tx.cur.execute(
            _SELECT + " WHERE status = 'IN_QUEUE' AND deadline IS NOT NULL AND deadline <= %s "
            "ORDER BY seq FOR UPDATE SKIP LOCKED", (tx.now,)).fetchall()
        out = []
        for row in rows:
            job = J.apply(_row_to_job(row), "expire", now=tx.now)
            self._save(tx, job, "expire")
            out.append(job)
        return out

    # ------------------------------------------------------------------ submit / read
    def submit(self, job: Job) -> Job:
        check_new(job)
        cols = ", ".join(COLUMNS) + ", prio"
        marks = ", ".join("%s" for _ in range(len(COLUMNS) + 1))
        with self._tx() as tx:
            row = _one(tx.cur.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks}) RETURNING seq",
                                      _job_values(job) + [job.priority_rank]))
            job = job.copy()
            job.seq = int(row["seq"])
            tx.event(job.request_id, EV_STATUS, event="submit", status=job.status)
        return job

    def get(self, request_id: str, owner: Optional[str] = None, *, with_logs: bool = False) -> Job:
        with self._cursor() as cur:
            job = self._load(cur, request_id, owner, lock=False)
        if with_logs:
            job.logs = self.get_logs(request_id)
        return job

    def get_logs(self, request_id: str, since: int = 0) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            rows = cur.execute("SELECT timestamp, level, source, message FROM job_logs WHERE request_id = %s "
                               "ORDER BY id OFFSET %s", (request_id, max(0, int(since)))).fetchall()
        return [log_line(r["timestamp"], r["level"], r["source"], r["message"]) for r in rows]

    def queue_position(self, request_id: str) -> Optional[int]:
        with self._cursor() as cur:
            row = cur.execute(
                "SELECT (SELECT count(*) FROM jobs o WHERE o.status = 'IN_QUEUE' "
                "AND (o.prio, o.seq) < (j.prio, j.seq)) AS n FROM jobs j "
                "WHERE j.request_id = %s AND j.status = 'IN_QUEUE'", (request_id,)).fetchone()
        return None if row is None else int(row["n"])

    def queue_positions(self, request_ids: Iterable[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return {}
        with self._cursor() as cur:  # one pass over the queue in claim order, whatever the number of ids
            rows = cur.execute(
                "SELECT request_id, pos FROM (SELECT request_id, row_number() OVER (ORDER BY prio, seq) - 1 AS pos "
                "FROM jobs WHERE status = 'IN_QUEUE') q WHERE request_id = ANY(%s)", (ids,)).fetchall()
        return {r["request_id"]: int(r["pos"]) for r in rows}

    def queue_depth(self) -> dict[str, int]:
        with self._cursor() as cur:
            rows = cur.execute("SELECT status, count(*) AS n FROM jobs WHERE status IN ('IN_QUEUE', 'IN_PROGRESS') "
                               "GROUP BY status").fetchall()
        out = {J.IN_QUEUE: 0, J.IN_PROGRESS: 0}
        for r in rows:
            out[r["status"]] = int(r["n"])
        return out

    def queued_count(self, owner: Optional[str] = None) -> int:
        with self._cursor() as cur:
            if owner is None:
                row = _one(cur.execute("SELECT count(*) AS n FROM jobs WHERE status = 'IN_QUEUE'"))
            else:
                row = _one(cur.execute("SELECT count(*) AS n FROM jobs WHERE status = 'IN_QUEUE' AND owner = %s",
                                       (owner,)))
        return int(row["n"])

    def list_requests(self, owner: Optional[str], limit: int = 50) -> list[Job]:
        limit = max(1, min(int(limit), 1000))
        with self._cursor() as cur:
            if owner is None:
                rows = cur.execute(_SELECT + " ORDER BY seq DESC LIMIT %s", (limit,)).fetchall()
            else:
                rows = cur.execute(_SELECT + " WHERE owner = %s ORDER BY seq DESC LIMIT %s", (owner, limit)).fetchall()
        return [_row_to_job(r) for r in rows]

    # ------------------------------------------------------------------ worker side (fenced)
    def claim_next(self, worker_id: str, *, now: Optional[float] = None,
                   endpoint_ids: Optional[Iterable[str]] = None,
                   match: Optional[Callable[[Job], bool]] = None, lookahead: int = 32,
                   lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Optional[Job]:
        endpoint_ids = list(endpoint_ids) if endpoint_ids is not None else None
        if endpoint_ids is not None and not endpoint_ids:
            return None
        with self._tx(now=now) as tx:
            self._expire_due(tx)
            sql = _SELECT + " WHERE status = 'IN_QUEUE'"
            args: list[Any] = []
            if endpoint_ids is not None:
                sql += " AND endpoint_id = ANY(%s)"
                args.append(endpoint_ids)
            limit = max(1, lookahead) if match is not None else 1
            rows = tx.cur.execute(sql + " ORDER BY prio, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                                  [*args, limit]).fetchall()
            for row in rows:
                job = _row_to_job(row)
                if match is None or matches(match, job):
                    claimed = J.apply(job, "claim", now=tx.now, worker_id=worker_id, lease_seconds=lease_seconds)
                    self._save(tx, claimed, "claim")
                    return claimed
        return None

    def heartbeat(self, lease: Lease, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        with self._tx(durable=False) as tx:
            self._fenced(tx, lease)
            tx.cur.execute("UPDATE jobs SET heartbeat_at = %s, lease_expires_at = %s WHERE request_id = %s",
                           (tx.now, tx.now + lease_seconds, lease.request_id))

    def append_log(self, request_id: str, message: str, *, level: str = "INFO",
                   source: str = "worker", lease: Optional[Lease] = None) -> None:
        with self._tx(durable=False) as tx:
            if lease is not None:
                if lease.request_id != request_id:
                    raise ValueError(f"the lease is for request {lease.request_id}, not {request_id}")
                self._fenced(tx, lease)
            tx.cur.execute("INSERT INTO job_logs (request_id, timestamp, level, source, message) "
                           "VALUES (%s, %s, %s, %s, %s)",
                           (request_id, tx.now, log_text(level), log_text(source), log_text(message)))
            tx.event(request_id, EV_LOG)

    def record_progress(self, lease: Lease, step: int, total: int, preview: Optional[str] = None) -> None:
        with self._tx(durable=False) as tx:
            self._fenced(tx, lease)
            tx.cur.execute("UPDATE jobs SET progress_step = %s, progress_total = %s WHERE request_id = %s",
                           (int(step), int(total), lease.request_id))
            if preview is not None:
                tx.cur.execute("INSERT INTO job_previews (request_id, step, data_uri, updated_at) "
                               "VALUES (%s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE SET "
                               "step = excluded.step, data_uri = excluded.data_uri, updated_at = excluded.updated_at",
                               (lease.request_id, int(step), preview, tx.now))
            tx.event(lease.request_id, EV_PROGRESS, step=step, total=total, preview=preview is not None)

    def _fenced_mutate(self, lease: Lease, event: str, **kw: Any) -> Job:
        with self._tx() as tx:
            job = J.apply(self._fenced(tx, lease), event, now=tx.now, **kw)
            self._save(tx, job, event)
        return job

    def expire_due(self, *, now: Optional[float] = None) -> list[Job]:
        with self._tx(now=now) as tx:
            return self._expire_due(tx)

    # ------------------------------------------------------------------ cancel
    def request_cancel(self, request_id: str, owner: Optional[str] = None) -> CancelOutcome:
        with self._tx() as tx:
            job = self._load(tx.cur, request_id, owner)
            if job.status == J.IN_QUEUE:
                job, outcome, event = J.apply(job, "cancel", now=tx.now), "cancelled", "cancel"
            elif job.status == J.IN_PROGRESS:
                outcome = "already_requested" if job.cancel_requested else "cancel_requested"
                job, event = J.apply(job, "request_cancel", now=tx.now), "request_cancel"
            else:
                return CancelOutcome("already_completed", job)
            if outcome != "already_requested":
                self._save(tx, job, event)
        return CancelOutcome(outcome, job)

    def is_cancel_requested(self, request_id: str) -> bool:
        with self._cursor() as cur:
            row = cur.execute("SELECT cancel_requested FROM jobs WHERE request_id = %s", (request_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    # ------------------------------------------------------------------ crash recovery, retention
    def recover(self, *, max_attempts: int,
                is_worker_alive: Optional[Callable[[str], Optional[bool]]] = None,
                now: Optional[float] = None) -> list[Job]:
        changed: list[Job] = []
        with self._tx(now=now) as tx:
            # One sweeper at a time across the fleet; the others find it busy and skip this round.
            if not _one(tx.cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (_LOCK_RECOVER,)))["ok"]:
                return []
            sql = _SELECT + " WHERE status = 'IN_PROGRESS'"
            args: list[Any] = []
            if is_worker_alive is None:  # only the lease can tell: look at expired ones only
                sql += " AND lease_expires_at <= %s"
                args.append(tx.now)
            rows = tx.cur.execute(sql + " ORDER BY seq FOR UPDATE SKIP LOCKED", args).fetchall()
            for row in rows:
                old = _row_to_job(row)
                decision = sweep_decision(old, max_attempts=max_attempts, now=tx.now, is_worker_alive=is_worker_alive)
                if decision is None:
                    continue
                new, event = decision
                self._save(tx, new, event)
                if new.status == J.IN_QUEUE:
                    tx.cur.execute("INSERT INTO job_logs (request_id, timestamp, level, source, message) "
                                   "VALUES (%s, %s, 'WARNING', 'service', %s)",
                                   (new.request_id, tx.now, requeue_note(old)))
                changed.append(new)
        return changed

    def purge(self, older_than: float, *, now: Optional[float] = None) -> list[Job]:
        with self._tx(now=now) as tx:
            cutoff = tx.now - older_than
            rows = tx.cur.execute(
                "DELETE FROM jobs WHERE status = 'COMPLETED' AND finished_at IS NOT NULL AND finished_at < %s "
                "AND webhook_state <> 'pending' RETURNING seq, " + ", ".join(COLUMNS), (cutoff,)).fetchall()
            purged = sorted((_row_to_job(r) for r in rows), key=lambda j: j.seq)
            ids = [j.request_id for j in purged]
            if ids:
                for table in ("job_logs", "job_previews", "job_watchers"):
                    tx.cur.execute(f"DELETE FROM {table} WHERE request_id = ANY(%s)", (ids,))
            tx.cur.execute("DELETE FROM job_events WHERE created_at < %s", (cutoff,))
            tx.cur.execute("DELETE FROM job_watchers WHERE expires_at < %s", (tx.now,))
            tx.cur.execute("DELETE FROM workers WHERE expires_at < %s", (cutoff,))
        return purged

    # ------------------------------------------------------------------ events
    def last_event_seq(self) -> int:
        with self._cursor() as cur:
            return int(_one(cur.execute("SELECT last FROM job_event_counter"))["last"])

    def _events_after(self, after: int, timeout: Optional[float] = None) -> list[JobEvent]:
        with self._cursor(timeout) as cur:
            rows = cur.execute("SELECT seq, request_id, kind, event, status, step, total, preview FROM job_events "
                               "WHERE seq > %s ORDER BY seq LIMIT 1000", (int(after),)).fetchall()
        return [JobEvent(seq=int(r["seq"]), request_id=r["request_id"], kind=r["kind"], event=r["event"],
                         status=r["status"], step=r["step"], total=r["total"], preview=bool(r["preview"]))
                for r in rows]

    def _wake(self) -> None:
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def _ensure_listener(self) -> None:
        if self._listener is not None or self._closed:
            return
        with self._listener_lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen_loop, name="kleinserve-pg-listen",
                                                  daemon=True)
                self._listener.start()

    def _listen_loop(self) -> None:
        backoff = 0.1
        down_since: Optional[float] = None  # while the server cannot be reached: one warning, then quiet
        while not self._closed:
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                    self._listen_conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.1
                    if down_since is not None:
                        log.warning("job store %s: event listener reconnected after %.1fs", self.describe(),
                                    time.monotonic() - down_since)
                        down_since = None
                    self._wake()  # (re)connected: whatever was missed meanwhile gets re-read
                    while not self._closed:
                        for _ in conn.notifies(timeout=0.5):
                            self._wake()
            except psycopg.Error as e:
                if self._closed:
                    break
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("job store %s: event listener lost its connection (%s); reconnecting",
                                self.describe(), e)
                self._wake()
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.5)  # a restarted server is heard again within ~0.5 s
            finally:
                self._listen_conn = None

    def wait_events(self, after: int, timeout: float) -> list[JobEvent]:
        self._ensure_listener()
        deadline = time.monotonic() + max(0.0, timeout)
        failure: Optional[Exception] = None
        while True:
            with self._cond:
                seen = self._wakeups
            try:
                events = self._events_after(after, timeout=max(0.5, deadline - time.monotonic()))
                failure = None
            except (psycopg.OperationalError, PoolTimeout) as e:  # the server restarts: retry until the timeout
                events, failure = [], e
            remaining = deadline - time.monotonic()
            if events or self._closed:
                return events
            if remaining <= 0:
                if failure is not None:
                    raise failure
                return events
            with self._cond:
                self._cond.wait_for(lambda: self._wakeups != seen,  # noqa: B023 - waited on here
                                    timeout=min(remaining, _SAFETY_POLL_S if failure is None else 0.2))

    def get_preview(self, request_id: str) -> Optional[Preview]:
        with self._cursor() as cur:
            row = cur.execute("SELECT step, data_uri FROM job_previews WHERE request_id = %s",
                              (request_id,)).fetchone()
        return None if row is None else Preview(step=int(row["step"]), data_uri=row["data_uri"])

    def watch(self, request_id: str, watcher_id: str, ttl: float = WATCH_TTL_SECONDS) -> None:
        with self._tx(durable=False) as tx:
            tx.cur.execute("INSERT INTO job_watchers (request_id, watcher_id, expires_at) "
                           "VALUES (%s, %s, extract(epoch FROM clock_timestamp()) + %s) "
                           "ON CONFLICT (request_id, watcher_id) DO UPDATE SET expires_at = excluded.expires_at",
                           (request_id, watcher_id, float(ttl)))

    def unwatch(self, request_id: str, watcher_id: str) -> None:
        with self._cursor() as cur:
            cur.execute("DELETE FROM job_watchers WHERE request_id = %s AND watcher_id = %s",
                        (request_id, watcher_id))

    def is_watched(self, request_id: str) -> bool:
        with self._cursor() as cur:
            row = cur.execute("SELECT 1 FROM job_watchers WHERE request_id = %s "
                              "AND expires_at > extract(epoch FROM clock_timestamp()) LIMIT 1",
                              (request_id,)).fetchone()
        return row is not None

    # ------------------------------------------------------------------ fleet: secrets and workers
    def shared_secret(self, name: str, create: Callable[[], bytes]) -> bytes:
        with self._cursor() as cur:
            row = cur.execute("SELECT value FROM secrets WHERE name = %s", (name,)).fetchone()
            if row is not None:
                return bytes(row["value"])
            cur.execute("INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                        (name, bytes(create())))
            return bytes(_one(cur.execute("SELECT value FROM secrets WHERE name = %s", (name,)))["value"])

    _SECRET_ROWS = "SELECT name, value, active_from FROM secrets WHERE name IN (%s, %s, %s)"

    def secret_versions(self, name: str) -> SecretVersions:
        with self._cursor() as cur:
            rows = cur.execute(self._SECRET_ROWS, SecretVersions.row_names(name)).fetchall()
        return SecretVersions.from_rows(name, ((r["name"], r["value"], r["active_from"]) for r in rows))

    def _update_secret(self, name: str, change: Callable[[SecretVersions], SecretVersions]) -> None:
        names = SecretVersions.row_names(name)
        with self._tx() as tx:
            # One writer per secret; `shared_secret`'s first INSERT only ever creates the current row.
            tx.cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("kleinserve-secret:" + name,))
            rows = tx.cur.execute(self._SECRET_ROWS, names).fetchall()
            before = SecretVersions.from_rows(name, ((r["name"], r["value"], r["active_from"]) for r in rows))
            after = change(before)
            if after != before:
                tx.cur.execute("DELETE FROM secrets WHERE name IN (%s, %s, %s)", names)
                tx.cur.executemany("INSERT INTO secrets (name, value, active_from) VALUES (%s, %s, %s)",
                                   after.rows(name))

    def register_worker(self, worker_id: str, endpoint_ids: Iterable[str], *, ttl: float,
                        info: Optional[dict[str, Any]] = None) -> None:
        with self._tx(durable=False) as tx:
            tx.cur.execute("INSERT INTO workers (worker_id, endpoint_ids, info, registered_at, expires_at) "
                           "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET "
                           "endpoint_ids = excluded.endpoint_ids, info = excluded.info, "
                           "expires_at = excluded.expires_at",
                           (worker_id, sorted(set(endpoint_ids)), json.dumps(info or {}), tx.now, tx.now + float(ttl)))

    def deregister_worker(self, worker_id: str) -> None:
        with self._cursor() as cur:
            cur.execute("DELETE FROM workers WHERE worker_id = %s", (worker_id,))

    def live_workers(self) -> dict[str, int]:
        with self._cursor() as cur:
            rows = cur.execute("SELECT ep, count(*) AS n FROM workers, unnest(endpoint_ids) AS ep "
                               "WHERE expires_at > extract(epoch FROM clock_timestamp()) GROUP BY ep").fetchall()
        return {r["ep"]: int(r["n"]) for r in rows}

    # ------------------------------------------------------------------ webhooks
    def due_webhooks(self, now: Optional[float] = None, limit: int = 20, *,
                     lease_seconds: float = 60.0) -> list[Job]:
        with self._tx(now=now) as tx:
            rows = tx.cur.execute(
                _SELECT + " WHERE webhook_state = 'pending' AND status = 'COMPLETED' AND webhook_next_at IS NOT NULL "
                "AND webhook_next_at <= %s ORDER BY webhook_next_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (tx.now, int(limit))).fetchall()
            out = [_row_to_job(r) for r in rows]
            if out:
                tx.cur.execute("UPDATE jobs SET webhook_next_at = %s WHERE request_id = ANY(%s)",
                               (tx.now + lease_seconds, [j.request_id for j in out]))
        return out

    def record_webhook_attempt(self, request_id: str, delivered: bool,
                               next_attempt_at: Optional[float], error: Optional[str]) -> Job:
        with self._tx() as tx:
            job = J.apply_webhook_attempt(self._load(tx.cur, request_id), delivered=delivered,
                                          next_attempt_at=next_attempt_at, error=error)
            self._save(tx, job, "webhook")
        return job
