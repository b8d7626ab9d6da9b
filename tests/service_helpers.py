"""Reusable helpers for tests that talk to a running kleinserve HTTP server.

Stable API (other test modules import these; keep signatures backward compatible):

    make_self_signed_cert(directory, host="127.0.0.1") -> (cert_path, key_path)
    free_port(host="127.0.0.1") -> int
    wait_for_http(url, timeout=60.0, verify=True, ok_statuses=(200,)) -> httpx.Response
    serve_app(app, *, ssl_cert=None, ssl_key=None, host="127.0.0.1", port=None) -> ServerThread
        (context manager; also usable as `server = serve_app(app).start()` ... `server.stop()`)
    ServerThread: .base_url ("http(s)://127.0.0.1:PORT"), .port, .host, .start(), .stop()
    start_subprocess_server(args, *, data_dir, port=None, env=None, ssl_cert=None, ssl_key=None,
                            ready_path="/health", timeout=120.0, log_path=None) -> SubprocessServer
    SubprocessServer: .base_url, .port, .proc, .log_path, .kill() (SIGKILL), .stop() (SIGTERM, wait),
                      .log_text()
    fal_client_env(base_url_host_port, key, cert_path) -> dict of env vars for the real fal_client
    run_fal_client_script(code, env, timeout=120) -> subprocess.CompletedProcess (python -c in a
                      fresh interpreter, so fal_client reads FAL_RUN_HOST etc. at import)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import httpx

__all__ = [
    "make_self_signed_cert",
    "free_port",
    "wait_for_http",
    "serve_app",
    "ServerThread",
    "start_subprocess_server",
    "SubprocessServer",
    "fal_client_env",
    "run_fal_client_script",
]


# --------------------------------------------------------------------------------------------- TLS

def stop_process(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """SIGTERM and wait (a graceful shutdown); SIGKILL after `timeout`. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def make_self_signed_cert(directory: Path | str, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (and key) for localhost, 127.0.0.1, ::1 and `host` under `directory`,
    made by the product's own `serve --tls-self-signed` code; returns (cert.pem, key.pem). Trust the
    cert with SSL_CERT_FILE=<cert.pem> (httpx honours it) or `verify=str(cert_path)`."""
    from kleinserve.service.tls import ensure_self_signed

    cert = ensure_self_signed(Path(directory), host)
    return cert.cert_path, cert.key_path


# ------------------------------------------------------------------------------------------ ports

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_http(
    url: str,
    timeout: float = 60.0,
    verify: bool | str = True,
    ok_statuses: Sequence[int] = (200,),
    proc: Optional[subprocess.Popen] = None,
) -> httpx.Response:
    """Polls `url` until it answers with one of `ok_statuses`; raises TimeoutError with the last
    error otherwise (or RuntimeError at once when `proc` has exited)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, verify=verify, timeout=5.0)
            if r.status_code in ok_statuses:
                return r
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s (last: {last!r})")


# ---------------------------------------------------------------------- in-process uvicorn thread

class ServerThread:
    """Runs a uvicorn server for `app` in a background thread of this process."""

    def __init__(
        self,
        app,
        *,
        ssl_cert: Optional[Path | str] = None,
        ssl_key: Optional[Path | str] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        log_level: str = "warning",
    ):
        import uvicorn

        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.tls = ssl_cert is not None
        self.ssl_cert = Path(ssl_cert) if ssl_cert else None
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            ssl_certfile=str(ssl_cert) if ssl_cert else None,
            ssl_keyfile=str(ssl_key) if ssl_key else None,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def verify(self) -> bool | str:
        return str(self.ssl_cert) if self.ssl_cert else True

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn thread exited before the server started (see log)")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(5)
        self._thread = None

    def __enter__(self) -> ServerThread:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_app(app, **kwargs) -> ServerThread:
    """`with serve_app(app, ssl_cert=..., ssl_key=...) as server: httpx.get(server.base_url + ...)`"""
    return ServerThread(app, **kwargs)


# ---------------------------------------------------------------------------- subprocess server

class SubprocessServer:
    def __init__(self, proc: subprocess.Popen, base_url: str, port: int, log_path: Path, verify):
        self.proc = proc
        self.base_url = base_url
        self.port = port
        self.log_path = log_path
        self.verify = verify

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run (a crash)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (a graceful shutdown); SIGKILL after `timeout`."""
        stop_process(self.proc, timeout)

    def __enter__(self) -> SubprocessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve_command() -> list[str]:
    """`python -m kleinserve.cli serve` when the CLI exists, else the server module directly."""
    try:
        import importlib.util

        if importlib.util.find_spec("kleinserve.cli") is not None:
            return [sys.executable, "-m", "kleinserve.cli", "serve"]
    except Exception:
        pass
    return [sys.executable, "-m", "kleinserve.api.server"]


def start_subprocess_server(
    args: Sequence[str],
    *,
    data_dir: Path | str,
    port: Optional[int] = None,
    env: Optional[dict[str, str]] = None,
    ssl_cert: Optional[Path | str] = None,
    ssl_key: Optional[Path | str] = None,
    ready_path: str = "/health",
    timeout: float = 120.0,
    log_path: Optional[Path | str] = None,
) -> SubprocessServer:
    """Starts `kleinserve serve --host 127.0.0.1 --port PORT --data-dir DATA_DIR [TLS] *args` in a
    subprocess (stdout+stderr to `log_path`, default DATA_DIR/../server-PORT.log) and waits until
    `ready_path` answers 200. `args` carries the rest (e.g. ["--model", "tiny", "--api-key", "k"])."""
    port = port or free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else data_dir.parent / f"server-{port}.log"
    cmd = _serve_command() + ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    if ssl_cert:
        cmd += ["--ssl-certfile", str(ssl_cert), "--ssl-keyfile", str(ssl_key)]
    cmd += list(args)
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    log.close()
    scheme = "https" if ssl_cert else "http"
    base_url = f"{scheme}://127.0.0.1:{port}"
    verify: bool | str = str(ssl_cert) if ssl_cert else True
    server = SubprocessServer(proc, base_url, port, log_path, verify)
    try:
        wait_for_http(base_url + ready_path, timeout=timeout, verify=verify, proc=proc)
    except Exception as exc:
        server.stop(5)
        raise RuntimeError(f"{exc}\n--- server log ---\n{server.log_text()[-4000:]}") from exc
    return server


# ------------------------------------------------------------------------------ real fal_client

def fal_client_env(host_port: str, key: str, cert_path: Path | str) -> dict[str, str]:
    """Environment for a fresh interpreter running the unmodified `fal_client` against our TLS
    server at `host_port` ("127.0.0.1:PORT"): run API at the root, queue API under /queue."""
    env = dict(os.environ)
    env.update(
        {
            "FAL_RUN_HOST": host_port,
            "FAL_QUEUE_RUN_HOST": f"{host_port}/queue",
            "FAL_KEY": key,
            "SSL_CERT_FILE": str(cert_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("FAL_KEY_ID", None)
    env.pop("FAL_KEY_SECRET", None)
    return env


def run_fal_client_script(code: str, env: dict[str, str], timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Runs `code` with `python -c` in a fresh interpreter (so fal_client reads its env at import).
    Returns the CompletedProcess (text mode); the caller asserts on returncode/stdout."""
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
