"""Input files of a request (edit images, LoRA files): where they come from, and every limit on them.

    images = resolve_images(request.image_urls, sources)        # -> [PIL.Image (RGB)], or InputError
    data   = read_source(url_or_path, sources, field=..., index=..., max_bytes=...)   # raw bytes

A source is one of:
  - a `data:` URI (base64 or percent-encoded);
  - a URL of a file uploaded to this server (`<public base>/files/<id>/<name>`): read from the file
    storage directly, no HTTP round trip (`read_stored_file`, the one place that reads storage);
  - an http(s) URL: fetched by `fetch_url`, the ONE function here that touches the network (every
    hop of a redirect passes `check_fetch_target`, where the SSRF guard plugs in);
  - a local file path, only where the caller allows it (the CLI).

Every failure is an `InputError` naming the item and the reason (`image_urls[1]: could not fetch (HTTP
404)`, `... not an image`, `... larger than 20 MiB`); the worker reports it as a 422. No tensors here:
the worker hands the decoded images to the engine.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Optional

from PIL import Image

from ..engine.types import LoraFile
from . import netguard
from .netguard import NetPolicy
from .settings import Settings, format_size
from .storage import FileNotFound, FileStorage, StorageUnavailable, is_valid_file_id

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .loras import LoraCache

MAX_REDIRECTS = 5
USER_AGENT = "kleinserve-input-fetch"
MIN_SIDE = 64  # diffusers' Flux2ImageProcessor.check_image_input: both sides >= 64 px
MAX_ASPECT = 8  # ... and an aspect ratio of at most 8:1


class InputError(ValueError):
    """A bad input file: `loc` is the field path (["body", "image_urls", 1]); the message names the item."""

    def __init__(self, field_name: str, index: Optional[int], reason: str, *, kind: str = "input_file"):
        self.field_name, self.index, self.reason, self.kind = field_name, index, reason, kind
        item = field_name if index is None else f"{field_name}[{index}]"
        super().__init__(f"{item}: {reason}")

    @property
    def loc(self) -> list[Any]:
        return ["body", self.field_name] + ([] if self.index is None else [self.index])

    def detail(self) -> list[dict[str, Any]]:
        """As a 422 `detail` list (the shape of pydantic's errors)."""
        return [{"loc": self.loc, "msg": str(self), "type": self.kind}]


@dataclass
class InputSources:
    """Where input files may come from, and the limits on them (from Settings; see `from_settings`)."""

    storage: Optional[FileStorage] = None  # our own uploads
    own_bases: Sequence[str] = ()  # public base URLs of this server ("https://host:port")
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    timeout: float = 30.0
    allow_local_paths: bool = False  # the CLI: a plain path names a local file
    local_root: Optional[Path] = None  # when set, local paths must lie under it (the server's LoRA folder)
    policy: NetPolicy = field(default_factory=NetPolicy)  # the SSRF guard's (public addresses only by default)

    @classmethod
    def from_settings(cls, settings: Settings, *, storage: Optional[FileStorage] = None,
                      own_bases: Iterable[str] = ()) -> InputSources:
        bases = [b for b in [settings.public_url, *own_bases] if b]
        return cls(storage=storage, own_bases=tuple(str(b).rstrip("/") for b in bases),
                   max_bytes=int(settings.max_input_image_bytes),
                   max_pixels=int(settings.max_input_image_pixels),
                   timeout=float(settings.input_fetch_timeout),
                   policy=settings.net_policy())


class FetchError(Exception):
    """A source that could not be read; the message is the reason as the user sees it."""


# ------------------------------------------------------------------------------ the network

def fetch_url(url: str, *, policy: NetPolicy, max_bytes: int, timeout: float,
              into: Optional[BinaryIO] = None) -> bytes:
    """The bytes at `url`: the one network fetch of input files, through the SSRF guard
    (service/netguard.py: every hop resolved once, checked against `policy` and connected to the
    checked address). Follows up to MAX_REDIRECTS redirects, refuses bodies past `max_bytes`, gives up
    after `timeout` seconds in all. `into`: write the bytes there instead of returning them (b"" is
    returned). Raises FetchError with a short reason."""
    import httpx

    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"could not fetch (took longer than {timeout:g}s)")
        try:
            resp = netguard.guarded_get(url, policy=policy, headers={"User-Agent": USER_AGENT},
                                        total_timeout=left, max_bytes=max_bytes)
        except netguard.BlockedURL as exc:
            raise FetchError(f"could not fetch ({exc})") from None
        except netguard.ResponseTooLarge:
            raise FetchError(f"larger than {format_size(max_bytes)}") from None
        except httpx.TimeoutException:
            raise FetchError(f"could not fetch (took longer than {timeout:g}s)") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"could not fetch ({type(exc).__name__}: {exc})") from None
        location = {k.lower(): v for k, v in resp.headers.items()}.get("location")
        if resp.status_code in (301, 302, 303, 307, 308) and location:
            url = urllib.parse.urljoin(url, location)
            continue
        if resp.status_code != 200:
            raise FetchError(f"could not fetch (HTTP {resp.status_code})")
        if into is not None:
            into.write(resp.content)
            return b""
        return resp.content
    raise FetchError(f"could not fetch (more than {MAX_REDIRECTS} redirects)")


# ------------------------------------------------------------------------------ the other sources

def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The payload of a `data:[<type>][;base64],<data>` URI."""
    head, sep, payload = uri.partition(",")
    if not sep:
        raise FetchError("not a valid data: URI (no comma)")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise FetchError(f"larger than {format_size(max_bytes)}")
    if head.lower().endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise FetchError("not a valid data: URI (bad base64)") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise FetchError(f"larger than {format_size(max_bytes)}")
    return data


def own_file_id(url: str, own_bases: Sequence[str]) -> Optional[str]:
    """The file id when `url` is `<one of our bases>/files/<id>/<name>`, else None."""
    for base in own_bases:
        if url.startswith(base + "/files/"):
            parts = url[len(base) + len("/files/"):].split("?")[0].split("/")
            if len(parts) == 2 and is_valid_file_id(parts[0]):
                return parts[0]
    return None


def read_stored_file(storage: FileStorage, file_id: str, max_bytes: int) -> bytes:
    """The bytes of one of our stored files, from whichever backend holds them (local disk or S3):
    the one place that reads storage for inputs."""
    try:
        meta = storage.get(file_id)
        if meta.size > max_bytes:
            raise FetchError(f"larger than {format_size(max_bytes)}")
        return storage.read_bytes(file_id)
    except FileNotFound:
        raise FetchError("no such uploaded file (expired or deleted? upload it again)") from None
    except StorageUnavailable as exc:
        raise FetchError(f"could not read the uploaded file ({exc.detail})") from None


def read_source(source: str, sources: InputSources, *, field_name: str, index: Optional[int],
                max_bytes: Optional[int] = None) -> bytes:
    """The bytes of one input (see the module doc); InputError naming `field_name[index]` on failure."""
    limit = sources.max_bytes if max_bytes is None else max_bytes
    try:
        low = source.lower()
        if low.startswith("data:"):
            return decode_data_uri(source, limit)
        if low.startswith(("http://", "https://")):
            file_id = own_file_id(source, sources.own_bases)
            if file_id is not None and sources.storage is not None:
                return read_stored_file(sources.storage, file_id, limit)
            return fetch_url(source, policy=sources.policy, max_bytes=limit, timeout=sources.timeout)
        if sources.allow_local_paths or sources.local_root is not None:
            return _read_local(source, sources, limit)
        raise FetchError("not an https URL or a data: URI")
    except FetchError as exc:
        raise InputError(field_name, index, str(exc)) from None


def local_path(source: str, sources: InputSources) -> Path:
    """The local file a path names; under `local_root` when one is set (no escaping it)."""
    if sources.local_root is not None:
        root = Path(sources.local_root).resolve()
        path = (root / source).resolve()
        if root != path and root not in path.parents:
            raise FetchError(f"local paths must lie under the LoRA folder ({root})")
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise FetchError(f"no such file: {path}")
    return path


def _read_local(source: str, sources: InputSources, limit: int) -> bytes:
    path = local_path(source, sources)
    if path.stat().st_size > limit:
        raise FetchError(f"larger than {format_size(limit)}")
    return path.read_bytes()


# ------------------------------------------------------------------------------ images

def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decoded RGB image; FetchError for non-images, decompression bombs and sizes the model refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise FetchError(f"larger than {max_pixels} pixels ({im.width}x{im.height})")
            im.load()
    except FetchError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FetchError("larger than Pillow's decompression-bomb limit") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images and truncated files
        raise FetchError("not an image (or a truncated/unsupported one)") from None
    if im.width < MIN_SIDE or im.height < MIN_SIDE:
        raise FetchError(f"too small: {im.width}x{im.height} (both sides must be at least {MIN_SIDE} px)")
    if max(im.width / im.height, im.height / im.width) > MAX_ASPECT:
        raise FetchError(f"aspect ratio too extreme: {im.width}x{im.height} (at most {MAX_ASPECT}:1)")
    # As diffusers' image processor does (alpha dropped, not composited), so edits match the pipeline.
    return im.convert("RGB") if im.mode != "RGB" else im


def resolve_images(urls: Sequence[str], sources: InputSources, field_name: str = "image_urls") -> list[Image.Image]:
    """Every input image decoded (RGB), in order; InputError naming the first bad one."""
    images = []
    for k, url in enumerate(urls):
        data = read_source(url, sources, field_name=field_name, index=k)
        try:
            images.append(open_image(data, max_pixels=sources.max_pixels))
        except FetchError as exc:
            raise InputError(field_name, k, str(exc)) from None
    return images


# ------------------------------------------------------------------------------ a request's files

@dataclass
class RequestFiles:
    """What the engine gets beside a request: its decoded input images and its LoRA files."""

    images: list[Image.Image]
    loras: list[LoraFile]


class RequestInputs:
    """Resolves the input files of requests for the worker: `image_urls` -> images, `loras` -> local
    LoRA files (downloads cached on disk, see service/loras.py)."""

    def __init__(self, settings: Settings, storage: Optional[FileStorage] = None):
        self.settings = settings
        self.storage = storage
        self._loras: Optional[LoraCache] = None

    def sources(self, public_base: Optional[str] = None) -> InputSources:
        return InputSources.from_settings(self.settings, storage=self.storage,
                                          own_bases=[public_base] if public_base else [])

    @property
    def lora_cache(self) -> LoraCache:
        if self._loras is None:
            from .loras import LoraCache

            self._loras = LoraCache.from_settings(self.settings)
        return self._loras

    def resolve(self, request: BaseModel, *, public_base: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> RequestFiles:
        """InputError (naming the item) when one cannot be read or is not what it must be."""
        files = RequestFiles(images=[], loras=[])
        urls = getattr(request, "image_urls", None) or []
        if urls:
            files.images = resolve_images(urls, self.sources(public_base))
            if log:
                log("input images: " + ", ".join(f"{im.width}x{im.height}" for im in files.images))
        loras = getattr(request, "loras", None) or []
        if loras:
            files.loras = self.lora_cache.resolve(loras, self.sources(public_base))
            if log:
                log("LoRA files: " + ", ".join(f"{lf.name} (scale {lf.scale:g})" for lf in files.loras))
        return files
