"""LoRA files of requests: each `loras[k].path` resolved to a local safetensors file.

    cache = LoraCache.from_settings(settings)          # <data-dir>/lora-cache, --lora-cache-bytes
    files = cache.resolve(request.loras, sources)      # -> [engine.types.LoraFile], or InputError

`path` may be
  - an http(s) URL (fetched by `inputs.fetch_url`, the SSRF-guarded fetch) or the URL of a file uploaded
    to this server (read from storage): downloaded once into the cache, named by the URL's hash;
  - a Hugging Face repo id `org/repo` (its one .safetensors file, or pytorch_lora_weights.safetensors)
    or `org/repo/file.safetensors`: through huggingface_hub's own cache;
  - a local path: under --lora-dir on the server; anywhere in the CLI.
The cache keeps at most `max_bytes` of downloads; the least recently used files go first. Whether a
file is a LoRA the model understands is the engine's question (engine.loras; a LoraFormatError is a 422).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..engine.types import LoraFile
from .inputs import FetchError, InputError, InputSources, fetch_url, local_path, own_file_id, read_stored_file
from .settings import Settings

if TYPE_CHECKING:
    from ..schema import LoraWeight

log = logging.getLogger(__name__)

MAX_LORA_BYTES = 2 * 1024**3  # one LoRA file
DOWNLOAD_TIMEOUT = 600.0  # a LoRA download may take longer than an input image (--input-fetch-timeout)
SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.safetensors)?$")
FIELD = "loras"


class LoraCache:
    def __init__(self, directory: Path, max_bytes: int, *, lora_dir: Optional[Path] = None):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.lora_dir = lora_dir
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> LoraCache:
        return cls(Path(settings.data_dir) / "lora-cache", int(settings.lora_cache_bytes), lora_dir=settings.lora_dir)

    def resolve(self, loras: Sequence[LoraWeight], sources: InputSources) -> list[LoraFile]:
        """One LoraFile per entry ({path, scale}), in order."""
        return [LoraFile(file=self.resolve_path(str(lora.path), sources, index=k), scale=float(lora.scale),
                         name=str(lora.path)) for k, lora in enumerate(loras)]

    def resolve_path(self, path: str, sources: InputSources, *, index: int) -> Path:
        try:
            low = path.lower()
            if low.startswith(("http://", "https://")):
                return self._download(path, sources)
            if sources.allow_local_paths or self.lora_dir is not None:
                local = InputSources(allow_local_paths=sources.allow_local_paths,
                                     local_root=None if sources.allow_local_paths else self.lora_dir)
                try:
                    return _checked(local_path(path, local))
                except FetchError:
                    if not HF_REPO_RE.match(path):
                        raise
            if HF_REPO_RE.match(path):
                return self._from_hub(path)
            raise FetchError("not an https URL, a Hugging Face repo id or a file under the server's LoRA "
                             "folder (--lora-dir)")
        except FetchError as exc:
            raise InputError(FIELD, index, f"path: {exc}") from None

    # -- sources -----------------------------------------------------------------------------------

    def _download(self, url: str, sources: InputSources) -> Path:
        target = self.directory / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".safetensors")
        if target.is_file():
            os.utime(target)  # most recently used
            return target
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            file_id = own_file_id(url, sources.own_bases)
            if file_id is not None and sources.storage is not None:
                tmp.write_bytes(read_stored_file(sources.storage, file_id, MAX_LORA_BYTES))
            else:  # streamed to disk: LoRA files can be large
                with open(tmp, "wb") as f:
                    fetch_url(url, policy=sources.policy, max_bytes=MAX_LORA_BYTES,
                              timeout=max(sources.timeout, DOWNLOAD_TIMEOUT), into=f)
            try:
                _checked(tmp)
            except FetchError:
                raise FetchError("not a safetensors file (LoRA weights must be .safetensors)") from None
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=target)
        return target

    def _from_hub(self, path: str) -> Path:
        from huggingface_hub import hf_hub_download, list_repo_files
        from huggingface_hub.errors import HfHubHTTPError

        parts = path.split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
        try:
            if filename is None:
                names = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
                preferred = [f for f in names if f.endswith("pytorch_lora_weights.safetensors")]
                if len(preferred) == 1 or len(names) == 1:
                    filename = (preferred or names)[0]
                else:
                    raise FetchError(f"the repo {repo} has {len(names)} .safetensors files; name one "
                                     f"({repo}/<file>.safetensors)")
            return _checked(Path(hf_hub_download(repo, filename)))
        except FetchError:
            raise
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise FetchError(f"could not fetch from Hugging Face ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

    def _evict(self, keep: Path) -> None:
        """Least recently used downloads go until the cache fits max_bytes (`keep` stays)."""
        with self._lock:
            files = sorted((p for p in self.directory.glob("*.safetensors") if p != keep),
                           key=lambda p: p.stat().st_mtime)
            total = sum(p.stat().st_size for p in files) + keep.stat().st_size
            for p in files:
                if total <= self.max_bytes:
                    break
                total -= p.stat().st_size
                p.unlink(missing_ok=True)
                log.info("LoRA cache: evicted %s", p.name)


def _checked(path: Path) -> Path:
    """`path`, when it looks like a safetensors file (its header; the tensors are the engine's to read)."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (2 <= n <= min(SAFETENSORS_MAGIC_MAX_HEADER, size - 8) and head[8:9] == b"{"):
        raise FetchError(f"not a safetensors file: {path.name}")
    return path
