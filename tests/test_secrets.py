"""Rotating the shared secrets (`kleinserve secrets rotate`): two processes' services on one real
SQLite store; one rotates through the CLI, the other takes the new versions on its refresh. Upload
tokens and webhooks signed before a rotation keep verifying; those two rotations old do not."""

from __future__ import annotations

import json
import time

import pytest

from kleinserve import cli
from kleinserve.endpoints import default_registry
from kleinserve.service.runtime import Runtime, build_services
from kleinserve.service.settings import Settings
from kleinserve.service.storage import InvalidToken
from kleinserve.service.webhooks import verify_webhook

BODY = json.dumps({"status": "OK", "request_id": "r"}).encode()


def secrets_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["secrets", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def two_processes(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", no_auth=True)
    a, b = build_services(settings, default_registry()), build_services(settings, default_registry())
    yield settings, a, b
    a.close()
    b.close()


def test_rotation_keeps_what_was_signed_before_valid_until_the_next_one(two_processes, capsys):
    settings, a, b = two_processes
    data_dir = str(settings.data_dir)
    assert a.signer.jwks() == b.signer.jwks() and len(a.signer.jwks()["keys"]) == 1
    old_kid = a.signer.kid
    rc, shown, _ = secrets_cli(capsys, "show", "--data-dir", data_dir)
    assert rc == 0 and f"webhook-key: current kid {old_kid}, previous none" in shown

    token, _ = a.tokens.issue("put", 600, f="file1")
    old_headers = a.signer.headers("r", "u", BODY)

    rc, shown, said = secrets_cli(capsys, "rotate", "webhook-key", "--data-dir", data_dir)
    assert rc == 0 and f"rotated webhook-key: kid {old_kid} -> kid " in said
    rc, _, _ = secrets_cli(capsys, "rotate", "upload-secret", "--data-dir", data_dir)
    assert rc == 0

    b.refresh_secrets()
    jwks = b.signer.jwks()
    assert [k["kid"] for k in jwks["keys"]][1:] == [old_kid] and b.signer.kid != old_kid
    assert f"webhook-key: current kid {b.signer.kid}, previous kid {old_kid}" in shown
    # a webhook signed before the rotation, and one signed after it, both verify against the JWKS
    assert verify_webhook(old_headers, BODY, jwks)
    assert verify_webhook(b.signer.headers("r", "u", BODY), BODY, jwks)
    assert not verify_webhook(b.signer.headers("r", "u", BODY), BODY, {"keys": jwks["keys"][1:]})
    # an upload URL signed before the rotation still works; new ones use the new secret everywhere
    assert b.tokens.verify(token, "put")["f"] == "file1"
    new_token, _ = b.tokens.issue("put", 600, f="file2")
    with pytest.raises(InvalidToken):
        a.tokens.verify(new_token, "put")  # a has not refreshed yet
    a.refresh_secrets()
    assert a.tokens.verify(new_token, "put")["f"] == "file2" and a.signer.jwks() == jwks

    # a second rotation: what was signed two versions ago is no longer accepted
    secrets_cli(capsys, "rotate", "upload-secret", "--data-dir", data_dir)
    secrets_cli(capsys, "rotate", "webhook-key", "--data-dir", data_dir)
    a.refresh_secrets()
    with pytest.raises(InvalidToken):
        a.tokens.verify(token, "put")
    assert a.tokens.verify(new_token, "put")["f"] == "file2"
    assert not verify_webhook(old_headers, BODY, a.signer.jwks())


def test_a_running_process_takes_a_rotated_key_on_its_own(two_processes, capsys):
    settings, a, b = two_processes
    runtime = Runtime(b, role="api", secrets_every=0.1)
    runtime.start()
    try:
        before = b.signer.kid
        assert secrets_cli(capsys, "rotate", "webhook-key", "--data-dir", str(settings.data_dir))[0] == 0
        deadline = time.monotonic() + 10
        while b.signer.kid == before:
            assert time.monotonic() < deadline, "the running process kept the old key"
            time.sleep(0.05)
        assert [k["kid"] for k in b.signer.jwks()["keys"]] == [b.signer.kid, before]
    finally:
        runtime.stop()


def test_rotate_names_the_secret(tmp_path, capsys):
    rc, _, said = secrets_cli(capsys, "rotate", "--data-dir", str(tmp_path))
    assert rc == 2 and "rotate needs the secret: webhook-key or upload-secret" in said
    with pytest.raises(SystemExit):
        cli.main(["secrets", "rotate", "api-key", "--data-dir", str(tmp_path)])
    assert "invalid choice: 'api-key'" in capsys.readouterr().err
