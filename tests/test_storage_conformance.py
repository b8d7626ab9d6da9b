"""One storage suite, run against every backend: local disk and S3 (a REAL Ceph RGW, see
s3_server.py). Whatever the API or the worker rely on must behave the same on both."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest

from kleinserve.service.storage import (
    FileNotFound,
    FileStorage,
    FileTooLarge,
    InvalidUpload,
    LocalFileStorage,
    StorageUnavailable,
    UnsupportedMediaType,
    new_file_id,
    open_storage,
)

LIMIT = 16 * 1024 * 1024
MiB = 1024 * 1024


@pytest.fixture(params=["disk", "s3"])
def storage(request, tmp_path: Path) -> FileStorage:
    if request.param == "disk":
        st = open_storage(f"file://{tmp_path / 'files'}", data_dir=tmp_path, max_upload_bytes=LIMIT)
        assert isinstance(st, LocalFileStorage)
    else:
        st = open_storage(request.getfixturevalue("s3_url"), data_dir=tmp_path, max_upload_bytes=LIMIT)
    yield st
    st.close()


def _read(st: FileStorage, fid: str, start: int = 0, stop=None) -> bytes:
    with st.read(fid, start, stop) as stream:
        return b"".join(stream)


def test_put_get_read_and_metadata_round_trip(storage: FileStorage):
    storage.ping()
    data = os.urandom(3000)
    f = storage.put(data, "image/png", "../x/My Cat.png", owner="k_1", expires_in=3600)
    assert (f.file_name, f.content_type, f.size, f.owner) == ("My_Cat.png", "image/png", 3000, "k_1")
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert abs(f.created_at - time.time()) < 60 and abs(f.expires_at - f.created_at - 3600) < 1
    assert storage.get(f.id) == f  # every field survives the round trip
    assert _read(storage, f.id) == data == storage.read_bytes(f.id)
    g = storage.put(b"hi", "text/plain; charset=UTF-8", None)
    assert (g.owner, g.expires_at, g.file_name, g.content_type) == (None, None, "file.txt", "text/plain; charset=utf-8")
    assert storage.get(g.id) == g and storage.get(g.id).etag == g.etag != f.etag
    with pytest.raises(UnsupportedMediaType):
        storage.put(b"<svg/>", "image/svg+xml", "a.svg")


def test_read_ranges(storage: FileStorage):
    data = bytes(range(256)) * 40  # 10240 bytes
    f = storage.put(data, "application/octet-stream", "r.bin")
    for start, stop in [(0, 1), (1, 5), (100, None), (0, 10240), (10239, 10240), (5000, 9000), (7, 7)]:
        assert _read(storage, f.id, start, stop) == data[start:stop], (start, stop)
    empty = storage.put(b"", "application/octet-stream", "empty.bin")
    assert empty.size == 0 and storage.get(empty.id).size == 0 and storage.read_bytes(empty.id) == b""
    stream = storage.read(f.id, 0, 10240)
    first = next(iter(stream))  # a reader that stops early still closes cleanly
    assert data.startswith(first)
    stream.close()


def test_missing_and_invalid_ids(storage: FileStorage):
    for bad in ["../../etc/passwd", "", "A" * 32, "0" * 31, new_file_id()]:
        with pytest.raises(FileNotFound):
            storage.get(bad)
        with pytest.raises(FileNotFound):
            storage.read(bad)
        assert storage.delete(bad) is False


def test_delete(storage: FileStorage):
    f = storage.put(b"bye", "text/plain", "bye.txt", expires_in=60)
    assert storage.delete(f.id) is True
    with pytest.raises(FileNotFound):
        storage.get(f.id)
    with pytest.raises(FileNotFound):
        storage.read(f.id)
    assert storage.delete(f.id) is False


def test_replace_by_id(storage: FileStorage):
    fid = new_file_id()
    storage.put(b"one", "text/plain", "a.txt", file_id=fid)
    f = storage.put(b"second", "text/plain", "a.txt", file_id=fid)
    assert f.id == fid and storage.read_bytes(fid) == b"second" and storage.get(fid).size == 6
    with pytest.raises(InvalidUpload):
        storage.put(b"x", "text/plain", "a.txt", file_id="../" + "0" * 29)


def test_size_limit_while_streaming_leaves_nothing(storage: FileStorage):
    fid = new_file_id()
    w = storage.writer("application/octet-stream", "big.bin", file_id=fid)
    chunk = os.urandom(MiB)
    with pytest.raises(FileTooLarge):
        for _ in range(LIMIT // MiB + 1):  # past the limit: refused mid-stream (S3: after a part went up)
            w.write(chunk)
    with pytest.raises(FileNotFound):
        storage.get(fid)
    # exactly at the limit is fine, and a streamed (multi-part on S3) file reads back whole
    data = os.urandom(LIMIT)
    with storage.writer("application/octet-stream", "max.bin") as w2:
        for i in range(0, LIMIT, 3 * MiB):
            w2.write(data[i:i + 3 * MiB])
        f = w2.commit()
    assert f.size == LIMIT and storage.get(f.id).size == LIMIT
    assert _read(storage, f.id, LIMIT - 10) == data[-10:] and storage.read_bytes(f.id) == data
    # an aborted writer leaves nothing either
    fid2 = new_file_id()
    w3 = storage.writer("text/plain", "a.txt", file_id=fid2)
    w3.write(b"half")
    w3.abort()
    with pytest.raises(FileNotFound):
        storage.get(fid2)


def test_multipart_small_parts(storage: FileStorage):
    mp = storage.create_multipart("application/octet-stream", "parts.bin", owner="o", expires_in=600)
    assert storage.get_multipart(mp.upload_id) == mp
    for n, chunk in [(2, b"B" * 300), (1, b"A" * 300), (3, b"C" * 10)]:
        w = storage.multipart_part_writer(mp.upload_id, n)
        w.write(chunk)
        assert w.commit() == f'"{hashlib.md5(chunk).hexdigest()}"'
    with pytest.raises(FileNotFound):
        storage.get(mp.file.id)  # not visible before complete
    with pytest.raises(InvalidUpload):
        storage.complete_multipart(mp.upload_id, [1, 2, 3, 4])
    f = storage.complete_multipart(mp.upload_id, [1, 2, 3])
    data = b"A" * 300 + b"B" * 300 + b"C" * 10
    assert (f.id, f.size, f.owner, f.file_name) == (mp.file.id, 610, "o", "parts.bin")
    assert f.sha256 == hashlib.sha256(data).hexdigest() and f.expires_at is not None
    assert storage.get(f.id) == f and storage.read_bytes(f.id) == data
    with pytest.raises(FileNotFound):
        storage.get_multipart(mp.upload_id)  # cleaned up
    with pytest.raises(FileNotFound):
        storage.multipart_part_writer(new_file_id(), 1)
    with pytest.raises(InvalidUpload):
        storage.multipart_part_writer(storage.create_multipart("text/plain", "x.txt").upload_id, 0)


def test_multipart_large_parts(storage: FileStorage):
    """Parts of S3's minimum size and more (both official clients send 10 MiB parts): on S3 they
    are assembled by server-side copy."""
    data = os.urandom(13 * MiB)
    mp = storage.create_multipart("video/mp4", "clip.mp4", owner="k_2")
    for n, (a, b) in enumerate([(0, 6 * MiB), (6 * MiB, 12 * MiB), (12 * MiB, 13 * MiB)], start=1):
        w = storage.multipart_part_writer(mp.upload_id, n)
        for i in range(a, b, MiB):
            w.write(data[i:min(b, i + MiB)])
        w.commit()
    f = storage.complete_multipart(mp.upload_id)
    assert (f.size, f.owner, f.content_type) == (13 * MiB, "k_2", "video/mp4")
    assert storage.get(f.id) == f and storage.read_bytes(f.id) == data
    assert _read(storage, f.id, 6 * MiB - 3, 6 * MiB + 3) == data[6 * MiB - 3:6 * MiB + 3]


def test_multipart_size_limit(storage: FileStorage):
    mp = storage.create_multipart("application/octet-stream", "too-big.bin")
    w = storage.multipart_part_writer(mp.upload_id, 1)
    w.write(b"x" * (LIMIT - 100))
    w.commit()
    w = storage.multipart_part_writer(mp.upload_id, 2)
    with pytest.raises(FileTooLarge):
        w.write(b"y" * 101)
    w = storage.multipart_part_writer(mp.upload_id, 1)  # a re-sent part replaces, it is not added
    w.write(b"x" * 10)
    w.commit()
    assert storage.complete_multipart(mp.upload_id).size == 10


def test_purge_by_age_and_expiry(storage: FileStorage):
    old = storage.put(b"old", "text/plain", "old.txt")
    soon = storage.put(b"soon", "text/plain", "soon.txt", expires_in=1)
    time.sleep(2.2)
    new = storage.put(b"new", "text/plain", "new.txt")
    short = storage.put(b"short", "text/plain", "short.txt", expires_in=0.5)
    time.sleep(0.7)
    with pytest.raises(FileNotFound):
        storage.get(short.id)  # expired files are gone at once, before any purge
    assert storage.purge_older_than(1.5) == 3  # old + soon by age, short by its expiry
    for f in (old, soon, short):
        with pytest.raises(FileNotFound):
            storage.get(f.id)
    assert storage.read_bytes(new.id) == b"new"
    assert storage.purge_older_than(3600) == 0


# ------------------------------------------------------------------------------ S3 specifics


def test_s3_objects_carry_their_metadata(s3_server, s3_url, tmp_path: Path):
    st = open_storage(s3_url, data_dir=tmp_path)
    f = st.put(b"\x89PNG...", "image/png", "cat.png", owner="k_9")
    bucket, prefix = s3_url[5:].split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/files/{f.id}")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == f.size
    assert head["ContentDisposition"] == 'inline; filename="cat.png"'
    assert head["Metadata"]["ks-owner"] == "k_9" and head["Metadata"]["ks-sha256"] == f.sha256
    url = st.direct_url(f, 60)
    r = httpx.get(url, headers={"Range": "bytes=1-3"})
    assert r.status_code == 206 and r.content == b"PNG"
    assert "s3://" in st.describe() and s3_server.endpoint in st.describe()


def test_s3_unreachable_or_misconfigured_is_unavailable(s3_server, tmp_path: Path, monkeypatch):
    st = open_storage("s3://no-such-bucket-here/p", data_dir=tmp_path)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        st.ping()
    with socket_closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        st = open_storage("s3://kleinserve-test/p", data_dir=tmp_path)
        t = time.monotonic()
        for call in (st.ping, lambda: st.get(new_file_id()), lambda: st.put(b"x", "text/plain", "a.txt")):
            with pytest.raises(StorageUnavailable) as exc:
                call()
            assert exc.value.status_code == 503 and exc.value.retry_after > 0
        assert time.monotonic() - t < 20
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageUnavailable, match="refused access"):
        open_storage("s3://kleinserve-test/p", data_dir=tmp_path).get(new_file_id())


def socket_closed_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def cm():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield port  # nothing listens there

    return cm()


@pytest.mark.parametrize("url, error", [
    ("s3://", "bucket name"), ("s3://UPPER/x", "bucket name"), ("s3://ok-bucket/a/../b", "'..'"),
    ("s3://ok-bucket/p?addressing_style=weird", "addressing_style"), ("gs://b/p", "file:///path or s3://"),
    ("file://host/p", "absolute directory"), ("/just/a/path", "file:///path or s3://"),
])
def test_storage_url_errors_say_what_is_accepted(url, error):
    from kleinserve.service.settings import Settings

    with pytest.raises(ValueError, match=error.replace("?", r"\?").replace(".", r"\.")):
        Settings(storage=url)


def test_storage_options_are_checked_together():
    from kleinserve.service.settings import Settings

    with pytest.raises(ValueError, match="needs --storage s3://"):
        Settings(storage_redirect=True)
    with pytest.raises(ValueError, match="add --storage-redirect"):
        Settings(storage="s3://b-1/p", storage_public_url="https://cdn.example")
    with pytest.raises(ValueError, match="https://"):
        Settings(storage="s3://b-1/p", storage_redirect=True, storage_public_url="cdn.example")
    s = Settings(storage="s3://b-1/p", storage_redirect=True, storage_public_url="https://cdn.example/")
    assert s.storage_public_url == "https://cdn.example"
    env = Settings.from_sources({}, env={"KLEINSERVE_STORAGE": "s3://b-1/p?addressing_style=path",
                                         "KLEINSERVE_STORAGE_REDIRECT": "1"})
    assert env.storage == "s3://b-1/p?addressing_style=path" and env.storage_redirect is True
    with pytest.raises(ValueError, match="KLEINSERVE_STORAGE"):
        Settings.from_sources({}, env={"KLEINSERVE_STORAGE": "ftp://x"})


def test_storage_urls_parse():
    from kleinserve.service.storage import parse_storage_url

    loc = parse_storage_url("s3://my-bucket/a/b/?addressing_style=path")
    assert (loc.bucket, loc.prefix, loc.addressing_style) == ("my-bucket", "a/b/", "path")
    assert parse_storage_url("s3://my-bucket").prefix == ""
    assert parse_storage_url("file:///var/lib/ks").path == Path("/var/lib/ks")


def test_s3_outage_mid_read_raises_unavailable(s3_server, s3_url, tmp_path: Path):
    """radosgw SIGKILLed while a file is being read: the rest of the iteration raises
    StorageUnavailable (the API then cuts the response short), and the stream still closes."""
    st = open_storage(s3_url, data_dir=tmp_path, max_upload_bytes=32 * MiB)
    f = st.put(os.urandom(32 * MiB), "application/octet-stream", "a.bin")
    stream = st.read(f.id)
    it = iter(stream)
    got = len(next(it))
    s3_server.kill_rgw()
    try:
        with pytest.raises(StorageUnavailable):
            for chunk in it:
                got += len(chunk)
        assert got < f.size
    finally:
        stream.close()
        s3_server.start_rgw()
    assert st.get(f.id) == f  # the objects outlive radosgw (they are in the OSD)
