"""A real S3 server for the tests: a throwaway single-node Ceph (1 monitor, 1 memstore OSD) and the
RADOS Gateway on loopback, started by `ceph_rgw_up.sh` (vendored from ../shared/s3; Debian packages
`radosgw ceph-mon ceph-osd`, which .ci/run installs).

- One per test session (cold start ~13 s), in a temp dir, on free ports; every test gets its own key
  prefix in one bucket (`s3_url`).
- The daemons fork into the background: they are stopped by the pids in DIR/run/*.pid, never by name.
- `kill_rgw()` SIGKILLs radosgw (the objects live on in the OSD), `start_rgw()` brings it back on the
  same port: what the outage tests use.
- The S3 client configuration reaches boto3 the standard way, through AWS_* environment variables
  set for the session (`env`), exactly as an operator would.

Fixtures (registered by conftest.py): `s3_server` (session), `s3_url` (a fresh `s3://bucket/prefix`
per test). Without the binaries the tests that need them are skipped with the reason, or fail when
the environment variable CI is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

SCRIPT = Path(__file__).resolve().parent / "ceph_rgw_up.sh"
BINARIES = ("radosgw", "ceph-mon", "ceph-osd", "monmaptool", "radosgw-admin", "ceph")
ACCESS_KEY, SECRET_KEY = "KSACCESSKEY", "KSSECRETKEY0123456789"
BUCKET = "kleinserve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running (a zombie, which nobody may reap in a container, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class RgwServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kleinserve-rgw-"))
        self.dir = self.root / "ceph"
        self.mon_port = _free_port()
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    # lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        proc = subprocess.run(["bash", str(SCRIPT), str(self.dir), str(self.mon_port), str(self.port)],
                              capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ceph_rgw_up.sh failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def _pid(self, name: str) -> Optional[int]:
        try:
            return int((self.dir / "run" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_rgw(self) -> None:
        """SIGKILL radosgw and wait until its port is closed."""
        pid = self._pid("client.rgw.a")
        assert pid is not None and _alive(pid), "radosgw is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.dir / "run" / "client.rgw.a.pid").unlink(missing_ok=True)

    def start_rgw(self) -> None:
        subprocess.run(["timeout", "60", "radosgw", "-c", str(self.dir / "ceph.conf"), "-n", "client.rgw.a",
                        "--auth-client-required=none"], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.rgw_answers():
                return
            time.sleep(0.1)
        raise RuntimeError("radosgw did not come back within 30 s")

    def rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        pids = []
        for name in ("client.rgw.a", "osd.0", "mon.a"):
            pid = self._pid(name)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
        deadline = time.monotonic() + 10
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # S3 ---------------------------------------------------------------------------------
    def client(self):
        """A plain boto3 client on this server (for the tests' own checks)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(signature_version="s3v4", retries={"total_max_attempts": 1}))


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[RgwServer]:
    missing = _missing()
    if missing:
        why = (f"Ceph RGW is not installed (missing {', '.join(missing)}): "
               "apt-get install -y radosgw ceph-mon ceph-osd")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    pytest.importorskip("boto3")
    server = RgwServer()
    saved = {k: os.environ.get(k) for k in server.env}
    try:
        server.start()
        os.environ.update(server.env)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture()
def s3_url(s3_server: RgwServer) -> str:
    """A fresh `s3://bucket/prefix` (its own key prefix in the session's bucket); radosgw is
    running when the test starts."""
    if not s3_server.rgw_answers():
        s3_server.start_rgw()
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"
