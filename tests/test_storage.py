"""File storage: the local backend (ids, names, limits, content types, retention, multipart), the
HTTP routes of api/files.py, and the REAL Python `fal_client` upload functions against a TLS server.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from kleinserve.service.storage import (
    ExpiredToken,
    FileNotFound,
    FileTooLarge,
    InvalidToken,
    InvalidUpload,
    LocalFileStorage,
    UnsupportedMediaType,
    UploadTokens,
    normalize_content_type,
    sanitize_file_name,
)
from kleinserve.service.webhooks import WebhookSigner
from service_helpers import fal_client_env, make_self_signed_cert, run_fal_client_script, serve_app

KEY = "test-key-123"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
    "c0f01f0005000201a5e0e0a90000000049454e44ae426082"
)

# ==================================================================================== unit


@pytest.fixture()
def storage(tmp_path: Path) -> LocalFileStorage:
    return LocalFileStorage(tmp_path / "files", max_upload_bytes=1000)


def test_put_open_roundtrip(storage: LocalFileStorage):
    f = storage.put(PNG, "image/png", "cat.png", owner="k_1")
    assert len(f.id) == 32 and f.size == len(PNG) and f.content_type == "image/png"
    assert f.file_name == "cat.png" and f.owner == "k_1" and f.sha256
    assert f.url("https://h:1/") == f"https://h:1/files/{f.id}/cat.png"
    assert storage.read_bytes(f.id) == PNG
    with storage.read(f.id, 1, 4) as stream:
        assert b"".join(stream) == PNG[1:4]
    path = storage._paths(f.id)[0]
    assert path.read_bytes() == PNG
    # sidecar metadata next to the bytes
    meta = json.loads((path.parent / f"{f.id}.json").read_text())
    assert meta["file_name"] == "cat.png" and meta["size"] == len(PNG)
    assert storage.get(f.id) == f
    other = storage.put(PNG, "image/png", "cat.png")
    assert other.id != f.id  # random ids


def test_ids_and_names_cannot_traverse(storage: LocalFileStorage, tmp_path: Path):
    for bad in ["../../etc/passwd", "..", "", "A" * 32, "0" * 31, "0" * 33, "../" + "0" * 32,
                "0" * 31 + "/", "0" * 32 + "\x00"]:
        with pytest.raises(FileNotFound):
            storage.read(bad)
        with pytest.raises(FileNotFound):
            storage.get(bad)
    f = storage.put(b"x", "text/plain", "../../../../tmp/evil.txt")
    assert f.file_name == "evil.txt"
    assert storage._paths(f.id)[0].resolve().is_relative_to((tmp_path / "files").resolve())
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(InvalidUpload):
        storage.put(b"x", "text/plain", "a.txt", file_id="../" + "0" * 29)


@pytest.mark.parametrize(
    "given, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo 1.JPG", "photo_1.JPG"),
        ("héllo wörld.png", "hello_world.png"),
        ("..", "file.bin"),
        (".hidden", "hidden"),
        ("", "file.png"),
        (None, "file.png"),
        ("a<b>c|d?.png", "a_b_c_d_.png"),
        ("x" * 300 + ".webp", "x" * 123 + ".webp"),
    ],
)
def test_sanitize_file_name(given, expected):
    ctype = "image/png" if given in ("", None) else "application/octet-stream"
    assert sanitize_file_name(given, ctype) == expected


def test_content_type_allow_list():
    assert normalize_content_type("IMAGE/PNG") == "image/png"
    assert normalize_content_type("image/jpeg; q=1") == "image/jpeg"
    assert normalize_content_type("text/plain; charset=UTF-8") == "text/plain; charset=utf-8"
    assert normalize_content_type(None) == "application/octet-stream"
    for ok in ["image/webp", "video/mp4", "audio/wav", "application/json", "application/zip",
               "application/octet-stream", "text/csv"]:
        assert normalize_content_type(ok) == ok
    for bad in ["text/html", "image/svg+xml", "application/javascript", "application/x-sh",
                "text/javascript", "application/xhtml+xml", "nonsense", "image/png\r\nX-Evil: 1"]:
        with pytest.raises(UnsupportedMediaType):
            normalize_content_type(bad)


def test_size_limit(storage: LocalFileStorage, tmp_path: Path):
    storage.put(b"x" * 1000, "application/octet-stream", "ok.bin")
    with pytest.raises(FileTooLarge):
        storage.put(b"x" * 1001, "application/octet-stream", "big.bin")
    w = storage.writer("application/octet-stream", "chunks.bin")
    w.write(b"x" * 600)
    with pytest.raises(FileTooLarge):
        w.write(b"x" * 600)
    assert list((tmp_path / "files" / ".tmp").iterdir()) == []  # partial data removed


def test_retention_and_expiry(storage: LocalFileStorage):
    old = storage.put(b"old", "text/plain", "old.txt")
    new = storage.put(b"new", "text/plain", "new.txt")
    short = storage.put(b"short", "text/plain", "short.txt", expires_in=0.05)
    # age the first file
    path = storage._paths(old.id)[1]
    meta = json.loads(path.read_text())
    meta["created_at"] -= 3600
    path.write_text(json.dumps(meta))
    time.sleep(0.1)
    with pytest.raises(FileNotFound):
        storage.read(short.id)  # expired files are gone at once, even before the purge
    assert storage.purge_older_than(600) == 2
    with pytest.raises(FileNotFound):
        storage.read(old.id)
    assert storage.read_bytes(new.id) == b"new"
    assert not storage._paths(old.id)[0].exists()


def test_maintenance_purge_removes_old_uploads(tmp_path: Path):
    """The maintenance purge (--result-retention) deletes uploads older than the retention and
    abandoned partial uploads, and keeps fresh ones."""
    from kleinserve.service.sqlite_store import SQLiteJobStore
    from kleinserve.service.worker import Maintenance

    storage = LocalFileStorage(tmp_path / "files", max_upload_bytes=1000)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    try:
        old = storage.put(b"old", "text/plain", "old.txt")
        fresh = storage.put(b"fresh", "text/plain", "fresh.txt")
        meta_path = storage._paths(old.id)[1]
        meta = json.loads(meta_path.read_text())
        meta["created_at"] -= 2 * 3600
        meta_path.write_text(json.dumps(meta))
        abandoned = storage.create_multipart("text/plain", "big.txt")
        mp_dir = tmp_path / "files" / ".multipart" / abandoned.upload_id
        two_days_ago = time.time() - 2 * 86400
        os.utime(mp_dir, (two_days_ago, two_days_ago))
        ongoing = storage.create_multipart("text/plain", "big2.txt")

        settings = Settings(data_dir=tmp_path, result_retention=3600)
        Maintenance(store, settings=settings, storage=storage).purge_now()

        with pytest.raises(FileNotFound):
            storage.read(old.id)
        assert storage.read_bytes(fresh.id) == b"fresh"
        assert not mp_dir.exists()
        assert storage.get_multipart(ongoing.upload_id).upload_id == ongoing.upload_id
    finally:
        store.close()


def test_multipart(storage: LocalFileStorage):
    mp = storage.create_multipart("application/octet-stream", "big.bin", owner="o")
    for n, chunk in [(2, b"B" * 300), (1, b"A" * 300), (3, b"C" * 10)]:
        w = storage.multipart_part_writer(mp.upload_id, n)
        w.write(chunk)
        assert w.commit().startswith('"')
    with pytest.raises(InvalidUpload):
        storage.complete_multipart(mp.upload_id, [1, 2, 3, 4])
    f = storage.complete_multipart(mp.upload_id, [1, 2, 3])
    assert f.id == mp.file.id and f.size == 610 and f.owner == "o"
    assert storage.read_bytes(f.id) == b"A" * 300 + b"B" * 300 + b"C" * 10
    with pytest.raises(FileNotFound):
        storage.get_multipart(mp.upload_id)  # cleaned up
    mp2 = storage.create_multipart("application/octet-stream", "too-big.bin")
    w = storage.multipart_part_writer(mp2.upload_id, 1)
    w.write(b"x" * 900)
    w.commit()
    w = storage.multipart_part_writer(mp2.upload_id, 2)
    with pytest.raises(FileTooLarge):
        w.write(b"x" * 200)
    with pytest.raises(InvalidUpload):
        storage.multipart_part_writer(mp2.upload_id, 0)


def test_upload_tokens(tmp_path: Path):
    tokens = UploadTokens.from_data_dir(tmp_path)
    secret = tmp_path / "keys" / "upload-token.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    tok, exp = tokens.issue("put", 60, f="abc")
    assert exp > time.time() and tokens.verify(tok, "put")["f"] == "abc"
    assert UploadTokens.from_data_dir(tmp_path).verify(tok, "put")  # same secret after a restart
    with pytest.raises(InvalidToken):
        tokens.verify(tok, "cdn")  # kinds are not interchangeable
    body, mac = tok.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    for bad in [None, "", "x", f"{forged_body}.{mac}", f"{body}.{mac[:-2]}xx", tok + ".x"]:
        with pytest.raises(InvalidToken) as ei:
            tokens.verify(bad, "put")
        assert ei.value.status_code == 401
    expired, _ = tokens.issue("put", -1, f="abc")
    with pytest.raises(ExpiredToken) as ei:
        tokens.verify(expired, "put")
    assert ei.value.status_code == 403
    with pytest.raises(InvalidToken):
        UploadTokens.from_data_dir(tmp_path / "other").verify(tok, "put")


# ==================================================================================== HTTP


def make_app(data_dir: Path, **settings) -> FastAPI:
    """The real app (middleware, error handlers, auth), without a model or worker: storage only."""
    return create_app(Settings(data_dir=data_dir, api_keys=[KEY], **settings), start_worker=False)


@pytest.fixture()
def server(tmp_path: Path):
    with serve_app(make_app(tmp_path / "data", max_upload_bytes=64 * 1024)) as srv:
        yield srv


AUTH = {"Authorization": f"Key {KEY}"}


def _initiate(base: str, content_type="image/png", file_name="cat.png", storage_type="fal-cdn-v3",
              headers=AUTH) -> httpx.Response:
    return httpx.post(f"{base}/storage/upload/initiate?storage_type={storage_type}",
                      json={"content_type": content_type, "file_name": file_name}, headers=headers)


def test_http_initiate_put_download(server):
    base = server.base_url
    r = _initiate(base)
    assert r.status_code == 200, r.text
    up, file_url = r.json()["upload_url"], r.json()["file_url"]
    assert file_url.startswith(base + "/files/") and file_url.endswith("/cat.png")
    assert "token=" in up
    assert httpx.get(file_url).status_code == 404  # not uploaded yet
    r = httpx.put(up, content=PNG, headers={"Content-Type": "image/png"})  # no auth header
    assert r.status_code == 200, r.text
    d = httpx.get(file_url)
    assert d.status_code == 200 and d.content == PNG
    assert d.headers["content-type"] == "image/png"
    assert d.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in d.headers["content-security-policy"]
    assert 'filename="cat.png"' in d.headers["content-disposition"]
    h = httpx.head(file_url)
    assert h.status_code == 200 and h.headers["content-length"] == str(len(PNG)) and h.content == b""
    assert d.headers["etag"] == h.headers["etag"] and d.headers["accept-ranges"] == "bytes"
    r = httpx.get(file_url, headers={"Range": "bytes=1-3"})
    assert r.status_code == 206 and r.content == PNG[1:4]
    assert r.headers["content-range"] == f"bytes 1-3/{len(PNG)}" and r.headers["content-length"] == "3"
    assert httpx.get(file_url, headers={"Range": "bytes=-4"}).content == PNG[-4:]
    r = httpx.get(file_url, headers={"Range": f"bytes={len(PNG)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(PNG)}"
    assert httpx.get(file_url, headers={"Range": "lines=1-2"}).status_code == 400
    # wrong name, bad id, traversal attempts: all 404
    fid = file_url.split("/")[-2]
    for path in [f"/files/{fid}/dog.png", "/files/" + "0" * 32 + "/cat.png", "/files/../etc/passwd",
                 "/files/..%2F..%2Fetc/passwd", f"/files/{fid}/..%2F..%2Fkeys%2Fwebhook-ed25519.pem",
                 "/files/%2e%2e/%2e%2e/keys/upload-token.secret"]:
        assert httpx.get(base + path).status_code == 404, path
    # the gcs storage_type (the Python client's fallback) works the same
    r = _initiate(base, storage_type="gcs", content_type="text/plain", file_name="a.txt")
    assert r.status_code == 200
    assert httpx.put(r.json()["upload_url"], content=b"hi").status_code == 200
    assert httpx.get(r.json()["file_url"]).text == "hi"
    assert _initiate(base, storage_type="s3").status_code == 400


def test_upload_tokens_are_redacted_in_the_access_log(tmp_path: Path):
    """The signed upload URL's token never reaches uvicorn's access log."""
    import logging

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    with serve_app(make_app(tmp_path / "data"), log_level="info") as srv:
        access = logging.getLogger("uvicorn.access")
        handler = Capture()
        access.addHandler(handler)  # after uvicorn configured its loggers
        try:
            r = _initiate(srv.base_url)
            up = r.json()["upload_url"]
            token = up.split("token=")[1]
            assert httpx.put(up, content=PNG, headers={"Content-Type": "image/png"}).status_code == 200
            assert httpx.put(up.replace("token=", "x=1&token="), content=PNG).status_code == 200
            deadline = time.time() + 5
            while sum("/storage/upload/" in line and "PUT" in line for line in lines) < 2 and time.time() < deadline:
                time.sleep(0.02)
        finally:
            access.removeHandler(handler)
    puts = [line for line in lines if "PUT" in line and "/storage/upload/" in line]
    assert len(puts) == 2, lines
    assert all("token=REDACTED" in line for line in puts), puts
    assert not any(token in line for line in lines), lines


def test_http_auth_required(server):
    base = server.base_url
    assert _initiate(base, headers={}).status_code == 401
    assert _initiate(base, headers={"Authorization": "Key wrong"}).status_code == 401
    assert httpx.post(f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}).status_code == 401
    assert httpx.post(f"{base}/files/upload", content=b"x").status_code == 401
    assert httpx.post(f"{base}/files/upload", content=b"x",
                      headers={"Authorization": "Bearer not-a-token"}).status_code == 401


def test_http_forged_and_expired_tokens(server, tmp_path: Path):
    base = server.base_url
    r = _initiate(base)
    up = r.json()["upload_url"]
    fid = r.json()["file_url"].split("/")[-2]
    token = up.split("token=")[1]
    body, mac = token.split(".")
    # forged signature / missing token -> 401
    assert httpx.put(up.replace(mac, mac[::-1]), content=PNG).status_code == 401
    assert httpx.put(up.split("?")[0], content=PNG).status_code == 401
    # a token for another file id -> 403
    other = _initiate(base).json()["upload_url"]
    assert httpx.put(f"{base}/storage/upload/{fid}?token={other.split('token=')[1]}",
                     content=PNG).status_code == 403
    # an expired token (signed with the server's own secret) -> 403
    tokens = server.app.state.services.tokens  # the secret every replica shares (kept in the store)
    expired, _ = tokens.issue("put", -5, f=fid, n="cat.png", t="image/png", o=None)
    r = httpx.put(f"{base}/storage/upload/{fid}?token={expired}", content=PNG)
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    # a CDN token is not an upload URL token
    cdn = httpx.post(f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH).json()
    assert httpx.put(f"{base}/storage/upload/{fid}?token={cdn['token']}", content=PNG).status_code == 401
    # an expired CDN token -> 403
    exp_cdn, _ = tokens.issue("cdn", -5, o=None)
    r = httpx.post(f"{base}/files/upload", content=PNG,
                   headers={"Authorization": f"Bearer {exp_cdn}", "Content-Type": "image/png"})
    assert r.status_code == 403


def test_http_limits_and_content_types(server):
    base = server.base_url
    # 415 at initiate and at the CDN upload
    for ctype in ["text/html", "image/svg+xml", "application/x-msdownload"]:
        r = _initiate(base, content_type=ctype, file_name="x")
        assert r.status_code == 415, (ctype, r.text)
    cdn = httpx.post(f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH).json()
    h = {"Authorization": f"{cdn['token_type']} {cdn['token']}"}
    r = httpx.post(f"{base}/files/upload", content=b"<script>", headers={**h, "Content-Type": "text/html"})
    assert r.status_code == 415
    # 413: declared length, and a chunked body without a length
    big = b"x" * (64 * 1024 + 1)
    up = _initiate(base, content_type="application/octet-stream", file_name="b.bin").json()["upload_url"]
    assert httpx.put(up, content=big).status_code == 413
    r = httpx.post(f"{base}/files/upload", content=big, headers={**h, "Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def gen():
        for _ in range(65):
            yield b"y" * 1024

    try:
        r = httpx.put(up, content=gen())
        assert r.status_code == 413
    except httpx.HTTPError:
        pass  # the server may close the connection while we are still sending: also a refusal
    data_dir = Path(server.server.config.app.state.settings.data_dir)
    assert list((data_dir / "files" / ".tmp").iterdir()) == []
    # exactly at the limit is fine
    ok = b"z" * (64 * 1024)
    r = httpx.post(f"{base}/files/upload", content=ok, headers={**h, "Content-Type": "image/png"})
    assert r.status_code == 200 and httpx.get(r.json()["access_url"]).content == ok


def test_http_cdn_token_flow(server):
    base = server.base_url
    r = httpx.post(f"{base}/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH)
    assert r.status_code == 200
    tok = r.json()
    assert tok["token_type"] == "Bearer" and tok["base_url"] == base
    from datetime import datetime, timezone

    exp = datetime.fromisoformat(tok["expires_at"])
    assert exp.tzinfo is not None and exp > datetime.now(timezone.utc)
    r = httpx.post(f"{base}/files/upload", content=PNG, headers={
        "Authorization": f"Bearer {tok['token']}", "Content-Type": "image/png",
        "X-Fal-File-Name": "../x/../my image.png"})
    assert r.status_code == 200, r.text
    url = r.json()["access_url"]
    assert url.endswith("/my_image.png")
    assert httpx.get(url).content == PNG
    # an API key works on the CDN route too
    r = httpx.post(f"{base}/files/upload", content=b"{}", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200 and httpx.get(r.json()["access_url"]).json() == {}


def test_http_multipart_js_style(tmp_path: Path):
    with serve_app(make_app(tmp_path / "data", max_upload_bytes=1000)) as srv:
        base = srv.base_url
        r = httpx.post(f"{base}/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
                       json={"content_type": "application/octet-stream", "file_name": "big.bin"},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        up, file_url = r.json()["upload_url"], r.json()["file_url"]
        path, _, query = up.partition("?")
        parts = []
        for n, chunk in [(1, b"a" * 400), (2, b"b" * 400)]:
            pr = httpx.put(f"{path}/{n}?{query}", content=chunk)
            assert pr.status_code == 200, pr.text
            parts.append(pr.json())
        assert parts[0]["partNumber"] == 1 and parts[0]["etag"]
        assert httpx.put(f"{path}/3?token=forged.x", content=b"c").status_code == 401
        assert httpx.put(f"{path}/3?{query}", content=b"c" * 300).status_code == 413
        r = httpx.post(f"{path}/complete?{query}", json={"parts": parts})
        assert r.status_code == 200, r.text
        assert httpx.get(file_url).content == b"a" * 400 + b"b" * 400


def test_jwks_route(server, tmp_path: Path):
    r = httpx.get(server.base_url + "/.well-known/jwks.json")
    assert r.status_code == 200
    (k,) = r.json()["keys"]
    assert k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["alg"] == "EdDSA"
    assert k["kid"] == server.app.state.services.signer.kid
    # the key lives in the store (shared by every replica), and the store is private to its owner
    assert stat.S_IMODE((tmp_path / "data" / "jobs.sqlite3").stat().st_mode) == 0o600


def test_replicas_on_one_store_share_the_jwks_and_accept_each_others_upload_urls(server, tmp_path: Path):
    """A second API replica on the same store: same JWKS, and an upload URL signed by one replica is
    accepted by the other (the secrets are the store's, not the process's)."""
    with serve_app(make_app(tmp_path / "data", max_upload_bytes=64 * 1024)) as other:
        assert httpx.get(other.base_url + "/.well-known/jwks.json").json() == \
            httpx.get(server.base_url + "/.well-known/jwks.json").json()
        up = _initiate(server.base_url).json()
        path = up["upload_url"].split(server.base_url, 1)[1]
        r = httpx.put(other.base_url + path, content=PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert httpx.get(up["file_url"]).content == PNG


def test_an_older_data_dirs_keys_are_taken_over(tmp_path: Path):
    """A data dir from before the secrets moved into the store keeps its webhook key (receivers that
    pinned the JWKS keep verifying) and upload secret."""
    old = WebhookSigner.from_data_dir(tmp_path / "data")
    old_tokens = UploadTokens.from_data_dir(tmp_path / "data")
    tok, _ = old_tokens.issue("put", 60, f="0" * 32)
    app = make_app(tmp_path / "data")
    try:
        svc = app.state.services
        assert svc.signer.jwks() == old.jwks()
        assert svc.tokens.verify(tok, "put")["f"] == "0" * 32
    finally:
        app.state.services.close()


# ==================================================================================== real client


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = make_self_signed_cert(d / "cert")
    with serve_app(make_app(d / "data", max_upload_bytes=1024 * 1024),
                   ssl_cert=cert, ssl_key=key) as srv:
        srv.cert = cert
        yield srv


def _run_client(srv, body: str) -> dict:
    code = textwrap.dedent(
        f"""
        import json, sys
        import fal_client, fal_client.client as C
        C.REST_URL = {srv.base_url!r}
        C.CDN_URL = {srv.base_url!r}
        """
    ) + textwrap.dedent(body)
    proc = run_fal_client_script(code, fal_client_env(srv.host_port, KEY, srv.cert), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_fal_client_upload(tls_server, tmp_path: Path):
    src = tmp_path / "photo.png"
    src.write_bytes(PNG)
    out = _run_client(tls_server, f"""
        url_file = fal_client.upload_file({str(src)!r})
        url_bytes = fal_client.upload(b"hello world", "text/plain", file_name="note.txt")
        url_fallback = fal_client.upload(b"via gcs", "application/octet-stream", repository="fal")
        print(json.dumps({{"file": url_file, "bytes": url_bytes, "fallback": url_fallback}}))
    """)
    verify = ssl.create_default_context(cafile=str(tls_server.cert))
    assert out["file"].startswith(tls_server.base_url + "/files/") and out["file"].endswith("/photo.png")
    r = httpx.get(out["file"], verify=verify)
    assert r.content == PNG and r.headers["content-type"] == "image/png"
    assert httpx.get(out["bytes"], verify=verify).text == "hello world"
    assert httpx.get(out["fallback"], verify=verify).content == b"via gcs"


def test_real_fal_client_async_and_multipart(tls_server):
    data = os.urandom(5000)
    out = _run_client(tls_server, f"""
        import asyncio
        C.MULTIPART_THRESHOLD = 1024     # force the multipart path with a small file
        C.MULTIPART_CHUNK_SIZE = 1500
        data = bytes.fromhex({data.hex()!r})
        sync_url = fal_client.upload(data, "application/octet-stream", file_name="mp.bin")
        async def main():
            return await fal_client.upload_async(data, "application/octet-stream", file_name="amp.bin")
        async_url = asyncio.run(main())
        print(json.dumps({{"sync": sync_url, "async": async_url}}))
    """)
    verify = ssl.create_default_context(cafile=str(tls_server.cert))
    for url in out.values():
        assert httpx.get(url, verify=verify).content == data


def test_real_fal_client_upload_errors(tls_server, tmp_path: Path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    out = _run_client(tls_server, f"""
        res = {{}}
        for name, fn in [("big", lambda: fal_client.upload_file({str(big)!r})),
                         ("html", lambda: fal_client.upload(b"<b>", "text/html"))]:
            try:
                fn(); res[name] = None
            except Exception as exc:
                res[name] = [type(exc).__name__, getattr(exc, "status_code", None), str(exc)]
        print(json.dumps(res))
    """)
    assert out["big"][1] == 413 and "limit" in out["big"][2]
    assert out["html"][1] == 415
