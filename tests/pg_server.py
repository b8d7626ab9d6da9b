"""A throwaway PostgreSQL 15 cluster for the tests, from Debian's binaries (/usr/lib/postgresql/15/bin).

- `initdb` refuses to run as root: as root, initdb and the server run as the `postgres` user (in a temp
  dir that user owns); otherwise as the current user.
- The server is a direct child of the test process (subprocess with `user=`), and `stop`/`kill_all`
  `wait()` on it: a zombie would keep its postmaster.pid "alive" and block a restart.
- It listens on 127.0.0.1 on a free port (trust auth: loopback only), its unix socket in the temp dir.
- `kill_all()` SIGKILLs every process of the cluster (the postmaster and all its children) and `start()`
  brings it back on the same port and data: what the kill matrix uses.

Fixtures (registered by conftest.py): `pg_cluster` (one per test session), `pg_url` (a fresh database per
test). Without the binaries the tests that need them are skipped with the reason, or fail when the
environment variable CI is set (a CI machine must have them: .ci/run installs postgresql-15).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

PG_BIN = Path(os.environ.get("KLEINSERVE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        by_parent.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class PgCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kleinserve-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._as: dict = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")  # Debian's postgresql package creates it
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True,
                       cwd=self.root, **self._as)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.root), "-c", "max_connections=300", "-c", "fsync=on", "-c", "synchronous_commit=on",
             "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root, **self._as)
        log.close()
        deadline = time.monotonic() + timeout
        import psycopg

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections in {timeout}s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """A fast clean shutdown (SIGINT), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_all()

    def kill_all(self) -> list[int]:
        """SIGKILLs every process of the cluster at once (postmaster, backends, checkpointer, walwriter,
        ...), as a crash of the machine's database would. Returns the pids killed."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        # the children are reparented to init (or a subreaper); wait until they are gone
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and not _is_zombie(p) for p in pids[1:]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return pids

    def restart_after_kill(self) -> None:
        self.kill_all()
        self.start()

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        try:
            with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def missing_reason() -> Optional[str]:
    for name in ("initdb", "postgres"):
        if not (PG_BIN / name).exists():
            return f"PostgreSQL 15 is not installed ({PG_BIN / name} is missing; apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run initdb as"
    return None


def require_postgres() -> None:
    """Skips (locally) or fails (CI set) when the binaries are missing."""
    reason = missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    require_postgres()
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database of the session's cluster, dropped after the test."""
    if pg_cluster.proc is None or pg_cluster.proc.poll() is not None:
        pg_cluster.start()  # a previous test killed it
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)
