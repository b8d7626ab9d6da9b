"""Rotating the shared secrets (`kleinserve secrets rotate`): two processes' services on one real
SQLite store; one rotates through the CLI, the other takes the new versions on its refresh. Upload
tokens and webhooks signed before a rotation keep verifying; those two rotations old do not. A new
webhook key is published before it signs (`--after`); `--drop-previous` retires a leaked one at once."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kleinserve import cli
from kleinserve.endpoints import default_registry
from kleinserve.service.runtime import WEBHOOK_KEY, Runtime, build_services
from kleinserve.service.settings import Settings
from kleinserve.service.storage import InvalidToken
from kleinserve.service.store import open_store
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

    rc, shown, said = secrets_cli(capsys, "rotate", "webhook-key", "--after", "0", "--data-dir", data_dir)
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
    secrets_cli(capsys, "rotate", "webhook-key", "--after", "0", "--data-dir", data_dir)
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
        # the CLI stages a key 15 minutes ahead (test_the_cli_stages_...); here the store is told 2 s, to
        # see a running process publish it, then promote it
        new_key = Ed25519PrivateKey.generate().private_bytes_raw()
        a.store.rotate_secret(WEBHOOK_KEY, new_key, active_from=time.time() + 2)
        # published first, next to the key that still signs ...
        deadline = time.monotonic() + 10
        while len(b.signer.jwks()["keys"]) < 2:
            assert time.monotonic() < deadline, "the running process did not publish the staged key"
            time.sleep(0.05)
        staged = b.signer.jwks()["keys"][1]["kid"]
        assert b.signer.kid == before and staged != before
        headers = b.signer.headers("r", "u", BODY)
        assert verify_webhook(headers, BODY, b.signer.jwks())
        # ... then signing, with the old key still published (and a's own refresh agrees)
        deadline = time.monotonic() + 15
        while b.signer.kid == before:
            assert time.monotonic() < deadline, "the staged key never started signing"
            time.sleep(0.05)
        assert [k["kid"] for k in b.signer.jwks()["keys"]] == [staged, before]
        assert verify_webhook(headers, BODY, b.signer.jwks())
        a.refresh_secrets()
        assert a.signer.kid == staged and a.signer.jwks() == b.signer.jwks()
    finally:
        runtime.stop()


def test_a_leaked_secret_is_retired_at_once_with_drop_previous(two_processes, capsys):
    settings, a, b = two_processes
    token, _ = a.tokens.issue("put", 600, f="file1")
    leaked = a.signer.headers("r", "u", BODY)
    for which in ("upload-secret", "webhook-key"):  # --drop-previous: at once, even for the webhook key
        rc, _, said = secrets_cli(capsys, "rotate", which, "--drop-previous", "--data-dir", str(settings.data_dir))
        assert rc == 0 and "no longer accepted" in said and "signing from" not in said
    b.refresh_secrets()
    with pytest.raises(InvalidToken):
        b.tokens.verify(token, "put")
    assert len(b.signer.jwks()["keys"]) == 1 and not verify_webhook(leaked, BODY, b.signer.jwks())


def test_bad_rotations_say_what_to_do(tmp_path, capsys):
    rc, _, said = secrets_cli(capsys, "rotate", "--data-dir", str(tmp_path))
    assert rc == 2 and "rotate needs the secret: webhook-key or upload-secret" in said
    with pytest.raises(SystemExit):
        cli.main(["secrets", "rotate", "api-key", "--data-dir", str(tmp_path)])
    assert "invalid choice: 'api-key'" in capsys.readouterr().err
    # no store there (the wrong --data-dir?): said, and none created
    rc, _, said = secrets_cli(capsys, "show", "--data-dir", str(tmp_path))
    assert rc == 1 and f"no job store at {tmp_path / 'jobs.sqlite3'}" in said and "--store" in said
    assert not (tmp_path / "jobs.sqlite3").exists()
    # a store no process has used yet: nothing to rotate
    open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}").close()
    rc, _, said = secrets_cli(capsys, "rotate", "webhook-key", "--data-dir", str(tmp_path))
    assert rc == 1 and "no secret 'webhook-ed25519' yet" in said and "--store" in said
    rc, shown, _ = secrets_cli(capsys, "show", "--data-dir", str(tmp_path))
    assert rc == 0 and "webhook-key: not created yet" in shown
    build_services(Settings(data_dir=tmp_path), default_registry()).close()  # a first process creates them
    rc, _, said = secrets_cli(capsys, "rotate", "upload-secret", "--after", "1h", "--data-dir", str(tmp_path))
    assert rc == 2 and "upload-secret rotates at once" in said
    rc, _, said = secrets_cli(capsys, "rotate", "webhook-key", "--after", "1h", "--drop-previous",
                              "--data-dir", str(tmp_path))
    assert rc == 2 and "use it with --after 0" in said
    rc, _, said = secrets_cli(capsys, "rotate", "webhook-key", "--after", "soon", "--data-dir", str(tmp_path))
    assert rc == 2 and "'soon'" in said
    rc, _, said = secrets_cli(capsys, "rotate", "webhook-key", "--after", "1m", "--data-dir", str(tmp_path))
    assert rc == 2 and "at least 330 s" in said  # receivers could not have the key yet
    rc, _, said = secrets_cli(capsys, "rotate", "webhook-key", "--after", "90d", "--data-dir", str(tmp_path))
    assert rc == 2 and "between 0 and 30 days" in said
    rc, _, said = secrets_cli(capsys, "show", "--drop-previous", "--data-dir", str(tmp_path))
    assert rc == 2 and "go with rotate" in said


def test_the_cli_stages_a_new_webhook_key_and_never_upgrades_a_store(two_processes, capsys):
    settings, a, b = two_processes
    signing = a.signer.kid
    rc, shown, said = secrets_cli(capsys, "rotate", "webhook-key", "--data-dir", str(settings.data_dir))
    assert rc == 0 and "signing from" in said and "from 900 s on" in said
    a.refresh_secrets()  # published now, not signing for 15 minutes
    staged = a.signer.jwks()["keys"][1]["kid"]
    assert a.signer.kid == signing and [k["kid"] for k in a.signer.jwks()["keys"]] == [signing, staged]
    assert f"webhook-key: current kid {signing}, next kid {staged} from " in shown
    # a store of an older schema (servers not upgraded yet): refused, left as it is
    import sqlite3

    path = settings.data_dir / "jobs.sqlite3"
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    con.commit()
    rc, _, said = secrets_cli(capsys, "show", "--data-dir", str(settings.data_dir))
    assert rc == 1 and "has schema 2, older than this kleinserve's" in said and "upgrade the servers first" in said
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    con.close()
