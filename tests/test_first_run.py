"""A new user's first minutes: `kleinserve serve` with no key flags makes a key and prints it with how
to use it; `kleinserve keys` manages keys (kept hashed, mode 0600). The servers are real
`kleinserve serve` processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from kleinserve import cli
from kleinserve.service.auth import AuthConfigError, Authenticator, AuthError, FileKeyStore, owner_id
from service_helpers import free_port, run_fal_client_script, wait_for_http

ENDPOINT = "fal-ai/flux-2/klein/9b/base"
KEY_RE = re.compile(r"\bks_[0-9a-f]{8}_[0-9a-f]{32}\b")


# ----------------------------------------------------------------------------------- key store


def test_key_store_keeps_only_hashes_in_a_private_file(tmp_path):
    store = FileKeyStore.in_data_dir(tmp_path)
    assert store.list() == []
    record, key = store.create(label="laptop")
    assert KEY_RE.fullmatch(key) and record.id in key
    path = tmp_path / "keys" / "api_keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text and key.split("_")[2] not in text  # never the key or its secret
    assert record.sha256 in text and record.owner == owner_id(key)
    assert [r.id for r in FileKeyStore(path).list()] == [record.id]


def test_authenticator_accepts_stored_keys_and_sees_revocations(tmp_path):
    store = FileKeyStore.in_data_dir(tmp_path)
    with pytest.raises(AuthConfigError):
        Authenticator([], key_store=store)  # no key anywhere: refuse to start
    _, key = store.create()
    auth = Authenticator(["static-key"], key_store=FileKeyStore.in_data_dir(tmp_path))
    assert auth.authenticate(f"Key {key}").owner == owner_id(key)
    assert auth.authenticate("Bearer static-key").owner == owner_id("static-key")
    _, second = store.create()
    assert auth.authenticate(f"Key {second}").owner == owner_id(second)  # made while serving
    assert store.remove(key.split("_")[1])
    with pytest.raises(AuthError):
        auth.authenticate(f"Key {key}")  # revoked: refused on the next request
    assert auth.authenticate(f"Key {second}").owner == owner_id(second)


def test_keys_command(tmp_path, capsys):
    data = tmp_path / "data"
    assert cli.main(["keys", "list", "--data-dir", str(data)]) == 0
    assert "no stored keys" in capsys.readouterr().err
    assert cli.main(["keys", "create", "--data-dir", str(data), "--label", "ci"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert KEY_RE.fullmatch(key) and "FAL_KEY" in err
    assert cli.main(["keys", "--data-dir", str(data)]) == 0
    listed = capsys.readouterr().out
    key_id = key.split("_")[1]
    assert key_id in listed and "ci" in listed and key not in listed
    assert cli.main(["keys", "revoke", "nope", "--data-dir", str(data)]) == 2
    assert "no key 'nope'" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", key_id, "--data-dir", str(data)]) == 0
    assert FileKeyStore.in_data_dir(data).list() == []


# ---------------------------------------------------------------------------- real serve runs


def _serve(data_dir: Path, port: int, *extra: str, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEINSERVE_")}
    env.update(PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "kleinserve", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--model", "tiny", "--no-warmup", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _read_until(proc: subprocess.Popen, pattern: str) -> str:
    """Output of `proc` up to (and including) the first line matching `pattern` (pytest-timeout
    bounds the wait)."""
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(lines)}")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def test_explicit_key_or_no_auth_creates_nothing(tmp_path):
    data = tmp_path / "data"
    for flags in (["--api-key", "given-key"], ["--no-auth"]):
        proc = _serve(data, free_port(), *flags)
        try:
            banner = _read_until(proc, r"  auth      :")
            assert not KEY_RE.search(banner)
        finally:
            _stop(proc)
    assert not (data / "keys" / "api_keys.json").exists()
