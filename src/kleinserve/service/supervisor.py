"""`kleinserve serve --devices ...`: one `kleinserve worker` process per device, kept running.

Each child is a plain `python -m kleinserve worker` configured through KLEINSERVE_* variables
(`Settings.to_env`) plus its device, name and thread count, so it is exactly the process a fleet
runs on another host. A child that dies is restarted with exponential backoff (1 s doubling to 30 s;
back to 1 s after a minute of uptime); the job it was running is taken back by the lease sweeper
(at once when the child is on this host: its pid is gone). On stop, children get SIGTERM (they stop
claiming, finish or release their job within --shutdown-grace) and SIGKILL if they outstay it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .lifecycle import Loop
from .settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_MIN = 1.0
RESTART_BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # seconds of uptime that reset the backoff


def expand_devices(devices: list[str]) -> list[str]:
    """`all` -> every CUDA device (cuda:0..N-1); otherwise the list as given."""
    if devices != ["all"]:
        return list(devices)
    from kleinserve.engine.models import cuda_device_count

    n = cuda_device_count()
    if n == 0:
        raise ValueError("--devices all: no CUDA device is visible (use --devices cpu,cpu to run CPU workers)")
    return [f"cuda:{i}" for i in range(n)]


def threads_for(device: str, devices: list[str], settings: Settings) -> int:
    """Torch threads of one worker: --threads, else the cores shared among this box's CPU workers
    (several torch processes on the same cores otherwise fight over them, and everyone is slower)."""
    if settings.threads:
        return settings.threads
    cpu_workers = sum(1 for d in devices if d == "cpu")
    if device == "cpu":
        return max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, len(devices))))


@dataclass
class _Child:
    name: str
    device: str
    threads: int
    metrics_port: int = 0  # where it serves its /metrics (0: none)
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    backoff: float = RESTART_BACKOFF_MIN  # the wait before its next restart
    restart_at: Optional[float] = None  # monotonic time of the next start, while waiting


class Supervisor:
    def __init__(self, settings: Settings, devices: list[str], *, python: str = sys.executable):
        self.settings = settings
        self.devices = expand_devices(devices)
        self.python = python
        self.children = [_Child(name=f"{d.replace(':', '')}-{i}", device=d,
                                threads=threads_for(d, self.devices, settings),
                                metrics_port=self._metrics_port(i))
                         for i, d in enumerate(self.devices)]
        self._loop = Loop("supervisor", self._pass, interval=0.2)

    def _metrics_port(self, i: int) -> int:
        """The Nth worker's --metrics-port: --metrics-port + N (0: none; never the server's own --port,
        which `--devices all` could only be checked against once the devices were counted)."""
        s = self.settings
        port = s.metrics_port + i if s.metrics_port else 0
        if port and (port == s.port or port > 65535):
            log.error("worker %d: its metrics port %d is not free for it (the server's --port is %d): it serves "
                      "no metrics; choose a --metrics-port range clear of --port", i, port, s.port)
            return 0
        return port

    def _env(self, child: _Child) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLEINSERVE_")}
        s = self.settings
        env.update(s.to_env("worker"))
        env["KLEINSERVE_DATA_DIR"] = str(s.data_dir.resolve())
        env["KLEINSERVE_STORE"] = s.store_url
        env["KLEINSERVE_DEVICE"] = child.device
        env["KLEINSERVE_THREADS"] = str(child.threads)
        env["OMP_NUM_THREADS"] = str(child.threads)
        env["KLEINSERVE_METRICS_PORT"] = str(child.metrics_port)
        return env

    def _spawn(self, child: _Child) -> None:
        cmd = [self.python, "-m", "kleinserve", "worker", "--name", child.name]
        child.proc = subprocess.Popen(cmd, env=self._env(child), stdin=subprocess.DEVNULL)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("worker %s started on %s (pid %d, %d thread(s)%s)", child.name, child.device, child.proc.pid,
                 child.threads, f", /metrics on port {child.metrics_port}" if child.metrics_port else "")

    def start(self) -> Supervisor:
        for child in self.children:
            self._spawn(child)
        self._loop.start()
        return self

    def _pass(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                up = now - child.started_at
                if up >= HEALTHY_AFTER:
                    child.backoff = RESTART_BACKOFF_MIN
                delay, child.backoff = child.backoff, min(RESTART_BACKOFF_MAX, child.backoff * 2)
                child.proc = None
                child.restart_at = now + delay
                log.error("worker %s on %s exited (code %s) after %.0fs; restarting in %.0fs",
                          child.name, child.device, code, up, delay)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at \
                    and not self._loop.stopping.is_set():
                self._spawn(child)

    def stop(self, grace: float = 60.0) -> None:
        self._loop.stop()
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 15.0  # the children's grace, plus their own stopping
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time: killing it", p.pid)
                p.kill()
                p.wait()
