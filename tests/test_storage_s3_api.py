"""The HTTP file routes on S3 storage (a REAL Ceph RGW, see s3_server.py): the unmodified Python
`fal_client` uploads land in the bucket and download through /files with Range; --storage-redirect;
and an S3 outage (radosgw SIGKILLed): downloads answer 503 + Retry-After and recover by themselves,
uploads fail cleanly with nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest

from kleinserve.api.app import create_app
from kleinserve.service.settings import Settings
from service_helpers import fal_client_env, make_self_signed_cert, run_fal_client_script, serve_app

pytest.importorskip("fal_client")

KEY = "s3-test-key"
AUTH = {"Authorization": f"Key {KEY}"}
MiB = 1024 * 1024


def make_app(data_dir: Path, storage: str, **settings):
    return create_app(Settings(data_dir=data_dir, api_keys=[KEY], storage=storage, **settings), start_worker=False)


def _bucket_prefix(url: str) -> tuple[str, str]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    return bucket, prefix


def _keys(s3_server, url: str) -> set[str]:
    bucket, prefix = _bucket_prefix(url)
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def _file_id(url: str) -> str:
    return url.rstrip("/").split("/")[-2]


def _upload_js_style(base: str, data: bytes, content_type="image/png", name="cat.png") -> tuple[str, httpx.Response]:
    r = httpx.post(f"{base}/storage/upload/initiate?storage_type=fal-cdn-v3",
                   json={"content_type": content_type, "file_name": name}, headers=AUTH)
    assert r.status_code == 200, r.text
    put = httpx.put(r.json()["upload_url"], content=data, headers={"Content-Type": content_type}, timeout=30)
    return r.json()["file_url"], put


def test_fal_client_uploads_land_in_the_bucket_and_download_with_range(s3_server, s3_url, tmp_path: Path):
    cert, key = make_self_signed_cert(tmp_path / "cert")
    app = make_app(tmp_path / "data", s3_url, max_upload_bytes=16 * MiB)
    small, big = os.urandom(5000), os.urandom(11 * MiB)
    (tmp_path / "big.bin").write_bytes(big)
    with serve_app(app, ssl_cert=cert, ssl_key=key) as srv:
        code = textwrap.dedent(f"""
            import json
            import fal_client, fal_client.client as C
            C.REST_URL = C.CDN_URL = {srv.base_url!r}
            out = {{"plain": fal_client.upload(b"hello s3", "text/plain", file_name="note.txt")}}
            C.MULTIPART_THRESHOLD = 1024           # the multipart path, small parts (streamed through)
            C.MULTIPART_CHUNK_SIZE = 1500
            out["small_parts"] = fal_client.upload(bytes.fromhex({small.hex()!r}), "application/octet-stream",
                                                   file_name="small.bin")
            C.MULTIPART_CHUNK_SIZE = 5 * 1024 * 1024  # parts S3 takes as they are (server-side copy)
            out["big_parts"] = fal_client.upload_file({str(tmp_path / "big.bin")!r})
            print(json.dumps(out))
        """)
        proc = run_fal_client_script(code, fal_client_env(srv.host_port, KEY, cert), timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        urls = json.loads(proc.stdout.strip().splitlines()[-1])

        keys = _keys(s3_server, s3_url)
        for url in urls.values():
            assert url.startswith(srv.base_url + "/files/")
            assert f"files/{_file_id(url)}" in keys  # the bytes are in the bucket
        assert not [k for k in keys if k.startswith("uploads/")]  # multipart leftovers cleaned up
        verify = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=verify, timeout=30) as c:
            r = c.get(urls["plain"])
            assert r.status_code == 200 and r.content == b"hello s3"
            assert r.headers["content-type"].startswith("text/plain")
            assert r.headers["content-disposition"] == 'inline; filename="note.txt"'
            assert r.headers["accept-ranges"] == "bytes" and r.headers["etag"].startswith('"')
            assert r.headers["x-content-type-options"] == "nosniff"
            assert c.get(urls["small_parts"]).content == small
            r = c.get(urls["big_parts"], headers={"Range": "bytes=5242878-5242881"})
            assert r.status_code == 206 and r.content == big[5242878:5242882]
            assert r.headers["content-range"] == f"bytes 5242878-5242881/{len(big)}"
            assert r.headers["content-length"] == "4"
            r = c.get(urls["big_parts"], headers={"Range": "bytes=-7"})
            assert r.status_code == 206 and r.content == big[-7:]
            r = c.get(urls["big_parts"], headers={"Range": f"bytes={len(big) - 2}-"})
            assert r.content == big[-2:]
            r = c.get(urls["big_parts"], headers={"Range": f"bytes={len(big)}-"})
            assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(big)}"
            assert "range not satisfiable" in r.json()["detail"]
            etag = c.get(urls["small_parts"]).headers["etag"]
            r = c.get(urls["small_parts"], headers={"Range": "bytes=0-9", "If-Range": etag})
            assert r.status_code == 206 and r.content == small[:10]
            r = c.get(urls["small_parts"], headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
            assert r.status_code == 200 and r.content == small  # changed since: the whole file
            h = c.head(urls["big_parts"])
            assert h.status_code == 200 and h.headers["content-length"] == str(len(big)) and h.content == b""
            h = c.head(urls["big_parts"], headers={"Range": "bytes=0-0"})
            assert h.status_code == 206 and h.headers["content-length"] == "1"
            assert c.get(urls["plain"].replace("note.txt", "other.txt")).status_code == 404
            r = c.get(f"{srv.base_url}/files/{uuid.uuid4().hex}/x.txt")
            assert r.status_code == 404 and r.json()["detail"] == "no such file"


JS_DIR = Path(__file__).parent / "js"


@pytest.mark.node
def test_js_client_uploads_land_in_the_bucket(s3_server, s3_url, tmp_path: Path):
    """The unmodified @fal-ai/client: a single upload, and a 91 MiB one through its multipart
    protocol (10 MiB parts: assembled in the bucket by server-side copy)."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.skip("node or tests/js/node_modules is missing: run `npm ci` in tests/js (bash .ci/run does)")
    with serve_app(make_app(tmp_path / "data", s3_url)) as srv:
        urls = {}
        for check in ("storage", "storageMultipart"):
            env = dict(os.environ, KLEINSERVE_URL=srv.base_url, FAL_KEY=KEY)
            proc = subprocess.run([node, "client_checks.mjs", check], cwd=JS_DIR, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            assert out["ok"] is True  # the check downloaded the bytes back and compared them
            urls[check] = out["url"]
        keys = _keys(s3_server, s3_url)
        for url in urls.values():
            assert f"files/{_file_id(url)}" in keys
        assert not [k for k in keys if k.startswith("uploads/")]
        head = s3_server.client().head_object(Bucket=_bucket_prefix(s3_url)[0],
                                              Key=f"{_bucket_prefix(s3_url)[1]}/files/{_file_id(urls['storageMultipart'])}")
        assert head["ContentLength"] == 91 * MiB + 123
        assert head["ETag"].endswith('-10"')  # an S3 multipart object: the client's 10 parts, copied


def test_redirect_mode_answers_307_to_a_presigned_url(s3_server, s3_url, tmp_path: Path):
    with serve_app(make_app(tmp_path / "data", s3_url, storage_redirect=True)) as srv:
        data = os.urandom(4000)
        file_url, put = _upload_js_style(srv.base_url, data, "application/octet-stream", "blob.bin")
        assert put.status_code == 200, put.text
        r = httpx.get(file_url)
        assert r.status_code == 307 and r.headers["location"].startswith(s3_server.endpoint + "/")
        assert "X-Amz-Signature=" in r.headers["location"] and r.headers["cache-control"] == "private, no-store"
        r = httpx.get(file_url, follow_redirects=True)
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-disposition"] == 'inline; filename="blob.bin"'  # from the object
        r = httpx.get(file_url, headers={"Range": "bytes=10-19"}, follow_redirects=True)
        assert r.status_code == 206 and r.content == data[10:20]
        assert httpx.get(file_url.replace("blob.bin", "x.bin")).status_code == 404  # checked before redirecting

    # a public/CDN base URL: here the bucket itself, made publicly readable under this prefix
    bucket, prefix = _bucket_prefix(s3_url)
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*"}]}))
    try:
        public = f"{s3_server.endpoint}/{bucket}"
        app = make_app(tmp_path / "data2", s3_url, storage_redirect=True, storage_public_url=public)
        with serve_app(app) as srv:
            r = httpx.get(f"{srv.base_url}/files/{_file_id(file_url)}/blob.bin")
            assert r.status_code == 307 and r.headers["location"] == f"{public}/{prefix}/files/{_file_id(file_url)}"
            r = httpx.get(r.headers["location"])  # no signature: readable because public
            assert r.status_code == 200 and r.content == data
    finally:
        s3_server.client().delete_bucket_policy(Bucket=bucket)


def test_s3_outage_downloads_503_then_recover_uploads_fail_cleanly(s3_server, s3_url, tmp_path: Path):
    with serve_app(make_app(tmp_path / "data", s3_url)) as srv:
        base = srv.base_url
        data = os.urandom(3000)
        file_url, put = _upload_js_style(base, data)
        assert put.status_code == 200
        r = httpx.post(f"{base}/files/upload/multipart", headers={**AUTH, "Content-Type": "text/plain",
                                                                  "X-Fal-File-Name": "mp.txt"})
        access_url, upload_id = r.json()["access_url"], r.json()["uploadId"]
        before = _keys(s3_server, s3_url)
        s3_server.kill_rgw()
        try:
            t = time.monotonic()
            r = httpx.get(file_url, timeout=30)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0 and "unavailable" in r.json()["detail"]
            assert time.monotonic() - t < 10  # no hang
            assert httpx.head(file_url, timeout=30).status_code == 503
            # uploads fail cleanly: 503, nothing half-written
            lost_url, put = _upload_js_style(base, os.urandom(20 * 1024))
            assert put.status_code == 503 and put.headers["retry-after"]
            r = httpx.post(f"{base}/files/upload", content=b"x" * 100,
                           headers={**AUTH, "Content-Type": "text/plain", "X-Fal-File-Name": "b.txt"}, timeout=30)
            assert r.status_code == 503 and "unavailable" in r.json()["detail"]
            r = httpx.put(f"{access_url}/multipart/{upload_id}/1", content=b"part", headers=AUTH, timeout=30)
            assert r.status_code == 503
        finally:
            s3_server.start_rgw()
        # back: the same server process recovers by itself
        deadline = time.monotonic() + 20
        while (r := httpx.get(file_url, timeout=30)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200 and r.content == data
        assert httpx.get(lost_url).status_code == 404
        assert _keys(s3_server, s3_url) == before  # nothing of the failed uploads is there
        r = httpx.put(f"{access_url}/multipart/{upload_id}/1", content=b"part", headers=AUTH)
        assert r.status_code == 200
        r = httpx.post(f"{access_url}/multipart/{upload_id}/complete",
                       json={"parts": [{"partNumber": 1, "etag": r.headers["etag"]}]}, headers=AUTH)
        assert r.status_code == 200 and httpx.get(r.json()["access_url"]).content == b"part"
