"""A small kleinserve fleet on this machine for the scale-out tests: API replicas (`serve --role api`)
and worker processes (`kleinserve worker`), all real subprocesses on one store (PostgreSQL from
pg_server.py, or SQLite) on the tiny model, each worker with one torch thread.

Nothing here fakes a part: the processes are the ones a deployment runs, started with the same flags.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

from service_helpers import free_port, stop_process, wait_for_http

EP = "fal-ai/flux-2/klein/9b/base"
KEY = "fleet-key"
H = {"Authorization": f"Key {KEY}"}
# A job of a few seconds on one thread (so kills land while it runs), and a quick one.
SLOW = {"prompt": "a harbour at dawn", "image_size": {"width": 256, "height": 256}, "num_inference_steps": 24,
        "enable_safety_checker": False}
QUICK = {"prompt": "a red kite", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4,
         "enable_safety_checker": False}


@dataclass
class Proc:
    """One kleinserve process of the fleet (its log in `log_path`)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    port: Optional[int] = None
    proc: Optional[subprocess.Popen] = None
    generations: list[int] = field(default_factory=list)  # pids it ran as

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self.generations.append(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would not act on the SIGTERM
        return stop_process(self.proc, timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Fleet:
    def __init__(self, root: Path, store_url: str, *, storage_url: Optional[str] = None, lease: str = "4s",
                 extra_env: Optional[dict] = None):
        self.root = root
        self.store_url = store_url
        self.storage_url = storage_url  # None: the shared data dir's files/ (one box)
        self.data_dir = root / "data"  # shared: the file storage of every process (one box)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.lease = lease
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("KLEINSERVE_")}
        self.apis: list[Proc] = []
        self.workers: list[Proc] = []

    def _common(self) -> list[str]:
        storage = ["--storage", self.storage_url] if self.storage_url else []
        return ["--store", self.store_url, *storage, "--data-dir", str(self.data_dir),
                "--worker-stale-after", self.lease, "--preview-every", "4", "--log-level", "info",
                "--shutdown-grace", "0s", "--webhook-allow-private"]  # the tests' webhook receivers are on loopback

    def add_api(self, name: str) -> Proc:
        port = free_port()
        cmd = [sys.executable, "-m", "kleinserve", "serve", "--role", "api", "--host", "127.0.0.1",
               "--port", str(port), "--api-key", KEY, *self._common()]
        p = Proc(name, cmd, dict(self.env), self.root / f"{name}.log", port=port).start()
        self.apis.append(p)
        wait_for_http(p.base_url + "/health", timeout=120, proc=p.proc)
        return p

    def add_worker(self, name: str, *extra: str) -> Proc:
        cmd = [sys.executable, "-m", "kleinserve", "worker", "--name", name, "--model", "tiny", "--device", "cpu",
               "--threads", "1", *self._common(), *extra]
        p = Proc(name, cmd, dict(self.env), self.root / f"{name}.log").start()
        self.workers.append(p)
        return p

    def restart(self, p: Proc) -> Proc:
        p.start()
        if p.port is not None:
            wait_for_http(p.base_url + "/health", timeout=120, proc=p.proc)
        return p

    def wait_workers(self, n: int, timeout: float = 240.0) -> dict:
        """Until /ready of the first live API replica counts `n` live workers for the endpoint."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            api = next(a for a in self.apis if a.alive())
            try:
                body = httpx.get(api.base_url + "/ready", timeout=10).json()
            except httpx.HTTPError:
                body = {}
            if body.get("workers", {}).get(EP, 0) >= n:
                return body
            for w in self.workers:
                assert w.alive() or w.proc is None or True
            time.sleep(0.3)
        raise AssertionError(f"fewer than {n} live workers after {timeout:.0f}s: {body}\n" + self.logs())

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_text()[-tail:]}" for p in [*self.apis, *self.workers])

    def stop(self) -> None:
        for p in [*self.workers, *self.apis]:
            p.stop(60)


# ------------------------------------------------------------------------------ client side

def submit(base: str, body: dict, *, params: Optional[dict] = None, **headers: str) -> str:
    r = httpx.post(f"{base}/queue/{EP}", json=body, headers={**H, **headers}, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def status(base: str, rid: str, logs: bool = False) -> dict:
    r = httpx.get(f"{base}/queue/fal-ai/flux-2/requests/{rid}/status", params={"logs": int(logs)},
                  headers=H, timeout=30)
    assert r.status_code in (200, 202), r.text
    return r.json()


def wait_progress(base: str, rid: str, step: int = 1, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(base, rid)
        if (st.get("progress") or {}).get("step", 0) >= step:
            return st
        assert st["status"] != "COMPLETED", f"{rid} completed before step {step}: {st}"
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached step {step}")


def wait_done(bases: list[str], rids: list[str], timeout: float = 300.0) -> dict[str, dict]:
    """Polls (through whichever replica answers) until every id is COMPLETED."""
    deadline = time.monotonic() + timeout
    final: dict[str, dict] = {}
    while len(final) < len(rids) and time.monotonic() < deadline:
        for rid in rids:
            if rid in final:
                continue
            for base in bases:
                try:
                    st = status(base, rid)
                except (httpx.HTTPError, AssertionError):
                    continue
                if st["status"] == "COMPLETED":
                    final[rid] = st
                break
        time.sleep(0.1)
    missing = [r for r in rids if r not in final]
    assert not missing, f"not completed in {timeout:.0f}s: {missing}"
    return final


def result(base: str, rid: str) -> httpx.Response:
    return httpx.get(f"{base}/queue/fal-ai/flux-2/requests/{rid}", headers=H, timeout=30)


def check_exactly_once(store: Any, bases: list[str], rids: list[str]) -> None:
    """Every accepted id: exactly one terminal state in the store (COMPLETED, and its events say it
    completed once), a successful result, and its images download through every replica."""
    for rid in rids:
        job = store.get(rid)
        assert job.status == "COMPLETED", (rid, job.status)
        assert job.error is None, (rid, job.error)
        for base in bases:
            r = result(base, rid)
            assert r.status_code == 200, r.text
            for im in r.json()["images"]:
                path = im["url"].split("/files/", 1)[1]
                got = httpx.get(f"{base}/files/{path}", timeout=30)
                assert got.status_code == 200 and got.content[:4] == b"\x89PNG", (rid, base, got.status_code)


def pid_of_connection(local_port_of_peer: int, candidates: list[Proc]) -> Optional[Proc]:
    """The fleet process that owns the TCP socket whose local port is `local_port_of_peer` (what a
    loopback server sees as the client's port): /proc/net/tcp gives the socket's inode, each
    candidate's /proc/PID/fd the sockets it holds."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == local_port_of_peer:
                inode = parts[9]
    if inode is None:
        return None
    for p in candidates:
        if not p.alive():
            continue
        fd_dir = Path(f"/proc/{p.pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return p
                except OSError:
                    continue
        except OSError:
            continue
    return None
