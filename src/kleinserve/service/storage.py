"""File storage: the `FileStorage` interface and its local-disk backend, plus upload tokens.

Files are addressed by a random id (uuid4 hex) and a sanitised file name; their public URL is
`{public_url}/files/{id}/{file_name}`. Nothing a client sends ever becomes a path on disk except
through `_check_id` (32 lowercase hex digits) and `sanitize_file_name` (a plain name, safe characters
only), so path traversal is impossible by construction.

On-disk layout of `LocalFileStorage(root)`:

    root/ab/abcdef....bin     the bytes (ab = the first two hex digits of the id)
    root/ab/abcdef....json    sidecar metadata: id, file_name, content_type, size, created_at, owner,
                              expires_at, sha256
    root/.tmp/                uploads in progress (renamed into place when complete)
    root/.multipart/<id>/     multipart uploads in progress: meta.json + one file per part

This module knows nothing about HTTP; `api/files.py` maps its exceptions to status codes. The API
layer only uses the interface: nothing there assumes a local path (`read` streams a byte range).
`open_storage(url)` picks the backend: `file:///path` (this module) or `s3://bucket/prefix`
(`service/s3_storage.py`, boto3).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mimetypes
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MAX_FILE_NAME_LENGTH = 128
MAX_MULTIPART_PARTS = 10_000

# --------------------------------------------------------------------------------------------------
# errors


class StorageError(Exception):
    """Base class; `status_code` is the HTTP status the API layer answers with."""

    status_code = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class InvalidUpload(StorageError):
    status_code = 400


class FileTooLarge(StorageError):
    status_code = 413


class UnsupportedMediaType(StorageError):
    status_code = 415


class FileNotFound(StorageError):
    status_code = 404


class InvalidToken(StorageError):
    """A missing, malformed or forged token (401); see `ExpiredToken` for an expired one."""

    status_code = 401


class ExpiredToken(InvalidToken):
    status_code = 403


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (or answers with a server error) right now: try again
    in `retry_after` seconds. Nothing was written (uploads) or sent (downloads)."""

    status_code = 503

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail)
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------------
# names and content types

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE_RE = re.compile(rf"^({_TOKEN})/({_TOKEN})$")

# Exact types accepted besides the image/*, video/* and audio/* families.
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/json",
        "application/zip",
        "application/x-zip-compressed",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/x-safetensors",
        "text/plain",
        "text/csv",
    }
)
ALLOWED_CONTENT_TYPE_FAMILIES = ("image", "video", "audio")
# Types of those families that a browser could execute when served from our origin.
DENIED_CONTENT_TYPES = frozenset({"image/svg+xml", "image/svg"})


def is_valid_file_id(file_id: str) -> bool:
    return isinstance(file_id, str) and bool(_ID_RE.fullmatch(file_id))


def _check_id(file_id: str) -> str:
    if not is_valid_file_id(file_id):
        raise FileNotFound("no such file")
    return file_id


def new_file_id() -> str:
    return uuid.uuid4().hex


def normalize_content_type(content_type: Optional[str]) -> str:
    """Returns the media type (lowercase, parameters dropped, text keeps its charset) if it is on
    the allow-list; raises `UnsupportedMediaType` otherwise. Empty means application/octet-stream."""
    raw = (content_type or "").strip()
    if not raw:
        return "application/octet-stream"
    base, _, params = raw.partition(";")
    base = base.strip().lower()
    m = _CONTENT_TYPE_RE.fullmatch(base)
    if not m:
        raise UnsupportedMediaType(f"malformed content type {raw[:100]!r}")
    family = m.group(1)
    allowed = base in ALLOWED_CONTENT_TYPES or (
        family in ALLOWED_CONTENT_TYPE_FAMILIES and base not in DENIED_CONTENT_TYPES
    )
    if not allowed:
        raise UnsupportedMediaType(
            f"content type {base!r} is not accepted; allowed: image/* (not svg), video/*, audio/*, "
            + ", ".join(sorted(ALLOWED_CONTENT_TYPES))
        )
    if family == "text":
        charset = re.search(r"charset\s*=\s*\"?([A-Za-z0-9._-]{1,40})", params)
        if charset:
            return f"{base}; charset={charset.group(1).lower()}"
    return base


def sanitize_file_name(file_name: Optional[str], content_type: str = "application/octet-stream") -> str:
    """A plain, URL-safe file name: the last path component, NFKD-folded to ASCII, anything outside
    [A-Za-z0-9._-] replaced by '_', no leading dots, at most 128 characters (the extension is kept).
    An empty result becomes `file` plus an extension guessed from the content type."""
    name = (file_name or "").replace("\\", "/").split("/")[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    name = _NAME_UNSAFE.sub("_", name).strip("_")
    name = name.lstrip(".")
    if len(name) > MAX_FILE_NAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            name = stem[: MAX_FILE_NAME_LENGTH - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_FILE_NAME_LENGTH]
    if not name or set(name) <= {"_", "."}:
        ext = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ".bin"
        name = "file" + ext
    return name


# --------------------------------------------------------------------------------------------------
# the interface


@dataclass(frozen=True)
class StoredFile:
    id: str
    file_name: str
    content_type: str
    size: int
    created_at: float = 0.0
    owner: Optional[str] = None
    expires_at: Optional[float] = None
    sha256: Optional[str] = None

    @property
    def url_path(self) -> str:
        """The path part of the file's URL (names are sanitised, so no quoting is needed)."""
        return f"/files/{self.id}/{self.file_name}"

    def url(self, public_url: str) -> str:
        return public_url.rstrip("/") + self.url_path

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def etag(self) -> str:
        """A strong HTTP entity tag, the same whatever backend or replica serves the file: the
        content's sha256 when known, else a digest of (id, size, created_at)."""
        if self.sha256:
            return f'"{self.sha256}"'
        basis = f"{self.id}-{self.size}-{self.created_at!r}".encode("ascii")
        return f'"{hashlib.sha256(basis).hexdigest()[:32]}"'


class FileStream(ABC):
    """An open byte range of a stored file: iterate it for the bytes (chunks of any size), then
    `close()` it (or use it as a context manager) to release the file handle or connection, also
    when the reader stops early. Iterating may raise `StorageUnavailable` mid-way."""

    @abstractmethod
    def __iter__(self) -> Iterator[bytes]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FileStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class UploadWriter(ABC):
    """Receives the bytes of one file in chunks; `commit()` makes it visible, `abort()` drops it.
    `write` raises `FileTooLarge` as soon as the size limit is passed."""

    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> StoredFile: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> UploadWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class MultipartUpload:
    upload_id: str
    file: StoredFile  # id, name, type and owner the finished file will have (size 0 until complete)


class FileStorage(ABC):
    """What the service needs from a file store. Implementations must be thread-safe."""

    max_upload_bytes: int

    @abstractmethod
    def writer(
        self,
        content_type: Optional[str],
        file_name: Optional[str],
        owner: Optional[str] = None,
        *,
        file_id: Optional[str] = None,
        expires_in: Optional[float] = None,
    ) -> UploadWriter:
        """A writer for a new file (or a replacement of `file_id`, which must be a valid id)."""

    def put(
        self,
        data: bytes,
        content_type: Optional[str],
        file_name: Optional[str],
        owner: Optional[str] = None,
        *,
        file_id: Optional[str] = None,
        expires_in: Optional[float] = None,
    ) -> StoredFile:
        with self.writer(content_type, file_name, owner, file_id=file_id, expires_in=expires_in) as w:
            w.write(data)
            return w.commit()

    @abstractmethod
    def get(self, file_id: str) -> StoredFile:
        """The metadata; raises FileNotFound."""

    @abstractmethod
    def read(self, file_id: str, start: int = 0, stop: Optional[int] = None) -> FileStream:
        """The bytes [start, stop) of the file (stop None: to its end), to be closed by the caller;
        raises FileNotFound. Callers take the size from `get` and pass a range within it."""

    def read_bytes(self, file_id: str) -> bytes:
        with self.read(file_id) as stream:
            return b"".join(stream)

    def direct_url(self, meta: StoredFile, expires_in: float) -> Optional[str]:
        """A URL the client can GET the file from directly, for `--storage-redirect`: the object
        under the public/CDN base URL when one is configured, else a presigned URL valid for
        `expires_in` seconds; None when the backend has none (local disk)."""
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raises StorageError (StorageUnavailable when the backend cannot be reached) for /ready."""

    def close(self) -> None:  # noqa: B027 - optional: most storages hold no connections
        """Releases connections; the storage is not used afterwards."""

    def describe(self) -> str:
        """Where the files live, for logs and /ready (never a credential)."""
        return type(self).__name__

    @abstractmethod
    def delete(self, file_id: str) -> bool: ...

    @abstractmethod
    def purge_older_than(self, seconds: float) -> int:
        """Deletes files created more than `seconds` ago (and any past their own expiry, and stale
        partial uploads). Returns the number of files deleted."""

    # multipart (both clients switch to it above ~90-100 MiB)
    @abstractmethod
    def create_multipart(
        self,
        content_type: Optional[str],
        file_name: Optional[str],
        owner: Optional[str] = None,
        *,
        expires_in: Optional[float] = None,
    ) -> MultipartUpload: ...

    @abstractmethod
    def multipart_part_writer(self, upload_id: str, part_number: int) -> PartWriter: ...

    @abstractmethod
    def complete_multipart(self, upload_id: str, parts: Optional[list[int]] = None) -> StoredFile: ...

    @abstractmethod
    def get_multipart(self, upload_id: str) -> MultipartUpload: ...


def select_parts(present: Iterable[int], parts: Optional[list[int]]) -> list[int]:
    """The part numbers a multipart completion assembles, in order: those the client listed (each
    must have been uploaded: InvalidUpload otherwise), or every uploaded part."""
    present = sorted(present)
    if parts is None:
        return present
    wanted = sorted({int(p) for p in parts})
    missing = [p for p in wanted if p not in set(present)]
    if missing:
        raise InvalidUpload(f"parts not uploaded: {missing[:10]}")
    return wanted


class PartWriter(ABC):
    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> str:
        """Stores the part; returns its etag (quoted hex md5, like S3)."""

    @abstractmethod
    def abort(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# local disk


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any], tmp_dir: Path) -> None:
    tmp = tmp_dir / f"{uuid.uuid4().hex}.json"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _TempFile:
    """The bytes of an upload (or of one multipart part) written under a temporary name, counted
    against the storage's upload limit together with `counted_elsewhere` bytes (the other parts)."""

    def __init__(self, storage: LocalFileStorage, tmp: Path, counted_elsewhere: int = 0):
        self._storage = storage
        self._tmp = tmp
        self._f = open(tmp, "wb")
        self._size = 0
        self._counted_elsewhere = counted_elsewhere
        self._done = False

    def _write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._counted_elsewhere + self._size > self._storage.max_upload_bytes:
            self.abort()
            raise FileTooLarge(
                f"file exceeds the upload limit of {self._storage.max_upload_bytes} bytes"
            )
        self._f.write(chunk)

    def _close_durably(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class _LocalWriter(_TempFile, UploadWriter):
    def __init__(self, storage: LocalFileStorage, meta: StoredFile):
        super().__init__(storage, storage._tmp_dir / f"{meta.id}.{uuid.uuid4().hex}.part")
        os.chmod(self._tmp, 0o640)
        self._meta = meta
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise InvalidUpload("upload already finished")
        self._write(chunk)
        self._hash.update(chunk)

    def commit(self) -> StoredFile:
        if self._done:
            raise InvalidUpload("upload already finished")
        self._close_durably()
        meta = StoredFile(
            **{**self._meta.to_json(), "size": self._size, "sha256": self._hash.hexdigest()}
        )
        self._storage._install(self._tmp, meta)
        self._done = True
        return meta


class _LocalPartWriter(_TempFile, PartWriter):
    def __init__(self, storage: LocalFileStorage, upload_dir: Path, part_number: int):
        others = sum(
            p.stat().st_size for p in upload_dir.glob("*.bin") if p.name != f"{part_number}.bin"
        )
        super().__init__(storage, upload_dir / f"{part_number}.{uuid.uuid4().hex}.tmp", others)
        self._dir = upload_dir
        self._part = part_number
        self._md5 = hashlib.md5(usedforsecurity=False)

    def write(self, chunk: bytes) -> None:
        self._write(chunk)
        self._md5.update(chunk)

    def commit(self) -> str:
        self._close_durably()
        os.replace(self._tmp, self._dir / f"{self._part}.bin")
        self._done = True
        return f'"{self._md5.hexdigest()}"'


def new_file_meta(
    content_type: Optional[str],
    file_name: Optional[str],
    owner: Optional[str],
    file_id: Optional[str],
    expires_in: Optional[float],
) -> StoredFile:
    """The metadata of a file about to be written (size 0 until it is): the content type checked,
    the name sanitised, a new id unless `file_id` (which must be valid) is given."""
    ctype = normalize_content_type(content_type)
    if file_id is None:
        file_id = new_file_id()
    elif not is_valid_file_id(file_id):
        raise InvalidUpload("invalid file id")
    now = time.time()
    return StoredFile(
        id=file_id,
        file_name=sanitize_file_name(file_name, ctype),
        content_type=ctype,
        size=0,
        created_at=now,
        owner=owner,
        expires_at=(now + float(expires_in)) if expires_in and expires_in > 0 else None,
    )


class _LocalFileStream(FileStream):
    CHUNK = 256 * 1024

    def __init__(self, f: Any, start: int, stop: Optional[int]):
        self._f = f
        self._start = max(0, int(start))
        self._stop = stop

    def __iter__(self) -> Iterator[bytes]:
        self._f.seek(self._start)
        left = None if self._stop is None else max(0, self._stop - self._start)
        while left is None or left > 0:
            chunk = self._f.read(self.CHUNK if left is None else min(self.CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk

    def close(self) -> None:
        self._f.close()


class LocalFileStorage(FileStorage):
    """Files on local disk under `root` (created 0700 when missing). Thread- and process-safe for
    the operations the service does: every file appears through an atomic rename."""

    PARTIAL_UPLOAD_MAX_AGE = 24 * 3600.0

    def __init__(self, root: Path | str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        if max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        self.root = Path(root)
        self.max_upload_bytes = int(max_upload_bytes)
        self._tmp_dir = self.root / ".tmp"
        self._mp_dir = self.root / ".multipart"
        for d in (self.root, self._tmp_dir, self._mp_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.Lock()

    @classmethod
    def in_data_dir(
        cls, data_dir: Path | str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    ) -> LocalFileStorage:
        """The service's standard place: `<data_dir>/files`."""
        return cls(Path(data_dir) / "files", max_upload_bytes=max_upload_bytes)

    # paths ----------------------------------------------------------------------------------
    def _paths(self, file_id: str) -> tuple[Path, Path]:
        _check_id(file_id)
        d = self.root / file_id[:2]
        return d / f"{file_id}.bin", d / f"{file_id}.json"

    def _new_meta(self, content_type, file_name, owner, file_id, expires_in) -> StoredFile:
        return new_file_meta(content_type, file_name, owner, file_id, expires_in)

    def _install(self, tmp: Path, meta: StoredFile) -> None:
        data_path, meta_path = self._paths(meta.id)
        data_path.parent.mkdir(exist_ok=True, mode=0o700)
        # Bytes first, metadata last: a file "exists" once its sidecar does.
        with self._lock:
            os.replace(tmp, data_path)
            _write_json_atomic(meta_path, meta.to_json(), self._tmp_dir)
        _fsync_dir(data_path.parent)

    # single-shot uploads --------------------------------------------------------------------
    def writer(self, content_type, file_name, owner=None, *, file_id=None, expires_in=None):
        return _LocalWriter(self, self._new_meta(content_type, file_name, owner, file_id, expires_in))

    def get(self, file_id: str) -> StoredFile:
        data_path, meta_path = self._paths(file_id)
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise FileNotFound("no such file") from None
        meta = StoredFile(**{k: raw.get(k) for k in StoredFile.__dataclass_fields__})
        if meta.expires_at is not None and meta.expires_at <= time.time():
            raise FileNotFound("file expired")
        if not data_path.is_file():
            raise FileNotFound("no such file")
        return meta

    def read(self, file_id: str, start: int = 0, stop: Optional[int] = None) -> FileStream:
        data_path = self._paths(file_id)[0]
        self.get(file_id)  # expired or half-installed files are not there
        try:
            f = open(data_path, "rb")
        except OSError:
            raise FileNotFound("no such file") from None
        return _LocalFileStream(f, start, stop)

    def describe(self) -> str:
        return f"file://{self.root.resolve()}"

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")

    def delete(self, file_id: str) -> bool:
        if not is_valid_file_id(file_id):
            return False
        data_path, meta_path = self._paths(file_id)
        with self._lock:
            existed = meta_path.exists()
            meta_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
        return existed

    def iter_files(self) -> Iterable[StoredFile]:
        for meta_path in self.root.glob("[0-9a-f][0-9a-f]/*.json"):
            try:
                raw = json.loads(meta_path.read_text(encoding="utf-8"))
                yield StoredFile(**{k: raw.get(k) for k in StoredFile.__dataclass_fields__})
            except (OSError, ValueError, TypeError):
                continue

    def purge_older_than(self, seconds: float) -> int:
        now = time.time()
        cutoff = now - float(seconds)
        removed = 0
        for meta in list(self.iter_files()):
            expired = meta.expires_at is not None and meta.expires_at <= now
            if expired or (meta.created_at or 0) < cutoff:
                if self.delete(meta.id):
                    removed += 1
        stale = now - max(float(seconds), self.PARTIAL_UPLOAD_MAX_AGE)
        for p in self._tmp_dir.iterdir():
            try:
                if p.stat().st_mtime < stale:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        for d in self._mp_dir.iterdir():
            try:
                if d.stat().st_mtime < stale:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
        return removed

    # multipart ------------------------------------------------------------------------------
    def _mp_path(self, upload_id: str) -> Path:
        if not is_valid_file_id(upload_id):
            raise FileNotFound("no such multipart upload")
        return self._mp_dir / upload_id

    def create_multipart(self, content_type, file_name, owner=None, *, expires_in=None):
        meta = self._new_meta(content_type, file_name, owner, None, expires_in)
        upload_id = new_file_id()
        d = self._mp_path(upload_id)
        d.mkdir(mode=0o700)
        _write_json_atomic(d / "meta.json", meta.to_json(), self._tmp_dir)
        return MultipartUpload(upload_id=upload_id, file=meta)

    def get_multipart(self, upload_id: str) -> MultipartUpload:
        d = self._mp_path(upload_id)
        try:
            raw = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise FileNotFound("no such multipart upload") from None
        return MultipartUpload(upload_id=upload_id, file=StoredFile(**raw))

    def multipart_part_writer(self, upload_id: str, part_number: int) -> PartWriter:
        self.get_multipart(upload_id)
        if not (1 <= int(part_number) <= MAX_MULTIPART_PARTS):
            raise InvalidUpload(f"part number must be between 1 and {MAX_MULTIPART_PARTS}")
        return _LocalPartWriter(self, self._mp_path(upload_id), int(part_number))

    def complete_multipart(self, upload_id: str, parts: Optional[list[int]] = None) -> StoredFile:
        mp = self.get_multipart(upload_id)
        d = self._mp_path(upload_id)
        present = sorted(int(p.stem) for p in d.glob("*.bin") if p.stem.isdigit())
        wanted = select_parts(present, parts)
        if not wanted:
            raise InvalidUpload("no parts uploaded")
        expires_in = None
        if mp.file.expires_at is not None:
            expires_in = max(mp.file.expires_at - time.time(), 0.001)
        with self.writer(
            mp.file.content_type,
            mp.file.file_name,
            mp.file.owner,
            file_id=mp.file.id,
            expires_in=expires_in,
        ) as w:
            for n in wanted:
                with open(d / f"{n}.bin", "rb") as f:
                    while chunk := f.read(1 << 20):
                        w.write(chunk)
            meta = w.commit()
        shutil.rmtree(d, ignore_errors=True)
        return meta


# --------------------------------------------------------------------------------------------------
# choosing a backend

STORAGE_URL_HELP = "file:///path or s3://bucket/prefix"


@dataclass(frozen=True)
class StorageLocation:
    """A parsed `--storage` value."""

    scheme: str  # "file" | "s3"
    path: Optional[Path] = None  # file
    bucket: str = ""  # s3
    prefix: str = ""  # s3: "" or ending in "/"
    addressing_style: Optional[str] = None  # s3: path | virtual | auto (None: boto3's config)


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_QUERY_KEYS = {"addressing_style": ("path", "virtual", "auto")}


def parse_storage_url(url: str) -> StorageLocation:
    """`file:///abs/path` or `s3://bucket[/prefix][?addressing_style=path]`; ValueError (saying
    what is wrong and what is accepted) otherwise."""
    raw = str(url).strip()
    parts = urlsplit(raw)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path or parts.query or parts.fragment:
            raise ValueError(f"not a storage URL: {raw!r} (use {STORAGE_URL_HELP}; a file URL "
                             "names an absolute directory, e.g. file:///var/lib/kleinserve/files)")
        return StorageLocation("file", path=Path(unquote(parts.path)))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.fullmatch(bucket or "") or ".." in bucket:
            raise ValueError(f"not a storage URL: {raw!r}: {bucket!r} is not a valid S3 bucket name "
                             f"(3-63 characters: a-z 0-9 . -); use {STORAGE_URL_HELP}")
        prefix = unquote(parts.path).strip("/")
        if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
            raise ValueError(f"not a storage URL: {raw!r}: the key prefix {prefix!r} has an empty, "
                             "'.' or '..' segment")
        style = None
        for item in filter(None, parts.query.split("&")):
            key, _, value = item.partition("=")
            if key not in _S3_QUERY_KEYS or value not in _S3_QUERY_KEYS[key]:
                raise ValueError(f"not a storage URL: {raw!r}: unknown option {item!r} (accepted: "
                                 "addressing_style=path|virtual|auto)")
            style = value
        return StorageLocation("s3", bucket=bucket, prefix=prefix + "/" if prefix else "",
                               addressing_style=style)
    raise ValueError(f"not a storage URL: {raw!r} (use {STORAGE_URL_HELP})")


def check_storage_url(url: Any) -> Optional[str]:
    """The settings parser of `--storage`: the URL unchanged if it parses, None when empty."""
    text = str(url).strip()
    if not text:
        return None
    parse_storage_url(text)
    return text


def open_storage(
    url: Optional[str],
    *,
    data_dir: Path | str,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    public_base_url: Optional[str] = None,
) -> FileStorage:
    """The file storage `url` names: None (or empty) is `<data_dir>/files` on local disk. An
    s3:// storage takes its endpoint, region and credentials from the standard AWS environment
    variables and config files (boto3's own lookup); nothing is contacted here.
    `public_base_url` (S3 only): where the bucket's objects are publicly readable (a CDN or a
    public bucket), `{public_base_url}/{object key}`; `direct_url` then points there."""
    if not url:
        return LocalFileStorage.in_data_dir(data_dir, max_upload_bytes=max_upload_bytes)
    loc = parse_storage_url(url)
    if loc.scheme == "file":
        assert loc.path is not None
        return LocalFileStorage(loc.path, max_upload_bytes=max_upload_bytes)
    from kleinserve.service.s3_storage import S3FileStorage  # boto3 is only imported when used

    return S3FileStorage(loc.bucket, loc.prefix, max_upload_bytes=max_upload_bytes,
                         addressing_style=loc.addressing_style, public_base_url=public_base_url)


# --------------------------------------------------------------------------------------------------
# upload tokens


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_secret(path: Path, nbytes: int = 32) -> bytes:
    """A random secret kept in `path` (0600), created on first use. Safe against two processes
    creating it at once (O_EXCL; the loser reads the winner's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            data = path.read_bytes()
            if data:
                return base64.b64decode(data.strip())
            time.sleep(0.01)
        raise RuntimeError(f"secret file {path} is empty") from None
    secret = secrets.token_bytes(nbytes)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(secret) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


class UploadTokens:
    """Short-lived HMAC-SHA256 tokens: `<base64url(json claims)>.<base64url(mac)>`.

    Kinds: "put" (a signed upload URL for one file id: no other credential needed), "mp" (the same
    for a multipart upload), "cdn" (the Python client's bearer token for `POST /files/upload`).
    The kind is inside the MAC, so one kind can never be used as another. After a rotation
    (`kleinserve secrets rotate upload-secret`) tokens are signed with the new secret, and those
    signed with the previous one stay valid until they expire."""

    def __init__(self, secret: bytes, previous: Optional[bytes] = None):
        self.set_secrets(secret, previous)

    def set_secrets(self, secret: bytes, previous: Optional[bytes] = None) -> None:
        if len(secret) < 16 or (previous is not None and len(previous) < 16):
            raise ValueError("secret too short")
        self._secrets = (secret,) if previous is None else (secret, previous)

    @property
    def secrets(self) -> tuple[bytes, Optional[bytes]]:
        """(the signing secret, the previous one that still verifies or None)."""
        return self._secrets[0], (self._secrets[1] if len(self._secrets) > 1 else None)

    @classmethod
    def from_data_dir(cls, data_dir: Path | str) -> UploadTokens:
        return cls(load_or_create_secret(Path(data_dir) / "keys" / "upload-token.secret"))

    @staticmethod
    def _mac(secret: bytes, body: str) -> bytes:
        return hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest()

    def issue(self, kind: str, ttl_seconds: float, **claims: Any) -> tuple[str, float]:
        exp = time.time() + float(ttl_seconds)
        payload = {"k": kind, "e": round(exp, 3), **claims}
        body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return f"{body}.{_b64e(self._mac(self._secrets[0], body))}", exp

    def verify(self, token: Optional[str], kind: str) -> dict[str, Any]:
        """The claims; raises InvalidToken (forged, malformed, wrong kind) or ExpiredToken."""
        if not token or not isinstance(token, str) or token.count(".") != 1 or len(token) > 4096:
            raise InvalidToken("missing or malformed upload token")
        body, _, mac = token.partition(".")
        try:
            given = _b64d(mac)
        except (ValueError, TypeError):
            raise InvalidToken("malformed upload token") from None
        if not any(hmac.compare_digest(given, self._mac(secret, body)) for secret in self._secrets):
            raise InvalidToken("invalid upload token signature")
        try:
            claims = json.loads(_b64d(body))
        except (ValueError, TypeError):
            raise InvalidToken("malformed upload token") from None
        if not isinstance(claims, dict) or claims.get("k") != kind:
            raise InvalidToken("upload token not valid for this operation")
        if float(claims.get("e", 0)) < time.time():
            raise ExpiredToken("upload token expired")
        return claims
