"""Service configuration: one `Settings` object, filled from CLI flags with KLEINSERVE_* env fallbacks.

Precedence: command-line flag > environment variable > default. `OPTIONS` is the single table the
`serve` flags, the env lookup and README.md's configuration table are generated from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from kleinserve.service.webhooks import DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_MAX_ATTEMPTS

ENV_PREFIX = "KLEINSERVE_"


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on", "y", "t"):
        return True
    if v in ("0", "false", "no", "off", "n", "f", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"not a whole number: {value!r}") from None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_size(value: Any) -> int:
    """Bytes from "123", "10MiB", "512k", "1G" (binary units)."""
    if isinstance(value, int):
        return value
    s = str(value).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"not a size: {value!r} (use e.g. 8MiB, 512k, 1048576)")
    return int(float(num) * _SIZE_UNITS[unit])


def format_size(value: int) -> str:
    """The inverse of parse_size, in the largest binary unit that divides it: 8388608 -> "8MiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """Seconds from "90", "90s", "15m", "24h", "7d"."""
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _DURATION_UNITS or not num:
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 24h, 7d)")
    return float(num) * _DURATION_UNITS[unit]


def format_duration(value: float) -> str:
    """The inverse of parse_duration, in the largest unit that divides it: 604800 -> "7d",
    1800 -> "30m", 0.5 -> "0.5s"."""
    for unit in ("d", "h", "m"):
        factor = _DURATION_UNITS[unit]
        if value and float(value) % factor == 0:
            return f"{int(value // factor)}{unit}"
    return f"{value:g}s"


def parse_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for v in value:
            out.extend(parse_list(v))
        return out
    return [p.strip() for p in str(value).split(",") if p.strip()]


@dataclass(frozen=True)
class Option:
    name: str  # Settings field
    flags: tuple[str, ...]
    env: str
    parse: Callable[[Any], Any]
    help: str
    metavar: Optional[str] = None
    kind: str = "value"  # value | flag (store_true) | append

    @property
    def default(self) -> Any:
        f = {f.name: f for f in dataclasses.fields(Settings)}[self.name]
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory()  # type: ignore[misc]


def _opt_str(v: Any) -> Optional[str]:
    v = str(v).strip()
    return v or None


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    model: str = "auto"
    device: Optional[str] = None
    dtype: Optional[str] = None
    cpu_offload: bool = False
    no_warmup: bool = False
    data_dir: Path = field(default_factory=lambda: Path("data"))
    api_keys: list[str] = field(default_factory=list)
    no_auth: bool = False
    public_url: Optional[str] = None
    result_retention: float = 7 * 86400.0
    max_attempts: int = 3
    max_request_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 100 * 1024 * 1024
    preview_every: int = 4
    batch_images: int = 1
    max_run_seconds: float = 1800.0
    worker_stale_after: float = 120.0
    webhook_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    webhook_backoff_base: float = DEFAULT_BACKOFF_BASE
    log_format: str = "text"
    log_level: str = "info"
    max_input_image_bytes: int = 20 * 1024 * 1024
    max_input_image_pixels: int = 64 * 1024 * 1024
    input_fetch_timeout: float = 30.0
    lora_dir: Optional[Path] = None
    lora_cache_bytes: int = 8 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.public_url:
            self.public_url = str(self.public_url).rstrip("/")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {self.log_format!r}")
        if self.batch_images < 1:
            raise ValueError("batch images must be >= 1 (1: every request runs alone)")
        if self.max_attempts < 1:
            raise ValueError("max attempts must be >= 1")
        if self.webhook_max_attempts < 1:
            raise ValueError("webhook max attempts must be >= 1")
        if self.webhook_backoff_base < 0:
            raise ValueError("webhook backoff base must be >= 0")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile and self.ssl_keyfile)

    @classmethod
    def from_sources(cls, values: Optional[Mapping[str, Any]] = None,
                     env: Optional[Mapping[str, str]] = None) -> "Settings":
        """`values`: explicit values (e.g. parsed flags; None entries are "not given"); then the
        environment; then the defaults."""
        env = os.environ if env is None else env
        values = dict(values or {})
        kw: dict[str, Any] = {}
        for opt in OPTIONS:
            given = values.get(opt.name)
            if opt.kind == "append" and given == []:
                given = None
            if given is not None and not (opt.kind == "flag" and given is False):
                try:
                    kw[opt.name] = opt.parse(given)
                except ValueError as exc:
                    raise ValueError(f"{opt.flags[0]}: {exc}") from None
            elif opt.env in env and str(env[opt.env]).strip() != "":
                try:
                    kw[opt.name] = opt.parse(env[opt.env])
                except ValueError as exc:
                    raise ValueError(f"{opt.env}: {exc}") from None
        for k, v in values.items():  # fields with no Option (programmatic use)
            if k not in kw and k in {f.name for f in dataclasses.fields(cls)} and v is not None \
                    and k not in {o.name for o in OPTIONS}:
                kw[k] = v
        return cls(**kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> "Settings":
        return cls.from_sources({o.name: getattr(args, o.name, None) for o in OPTIONS}, env)


OPTIONS: list[Option] = [
    Option("host", ("--host",), "KLEINSERVE_HOST", str, "Interface to listen on (0.0.0.0: all)."),
    Option("port", ("--port",), "KLEINSERVE_PORT", parse_int, "TCP port."),
    Option("ssl_certfile", ("--ssl-certfile",), "KLEINSERVE_SSL_CERTFILE", _opt_str,
           "TLS certificate (PEM). The fal clients speak https only: serve TLS, or put a TLS proxy in front.",
           metavar="PATH"),
    Option("ssl_keyfile", ("--ssl-keyfile",), "KLEINSERVE_SSL_KEYFILE", _opt_str, "TLS private key (PEM).",
           metavar="PATH"),
    Option("model", ("--model",), "KLEINSERVE_MODEL", str,
           "Model spec: auto | tiny | a local diffusers folder | a Hugging Face repo id.", metavar="SPEC"),
    Option("device", ("--device",), "KLEINSERVE_DEVICE", _opt_str, "Torch device (default: cuda if available)."),
    Option("dtype", ("--dtype",), "KLEINSERVE_DTYPE", _opt_str, "bfloat16 | float16 | float32 (default: per device)."),
    Option("cpu_offload", ("--cpu-offload",), "KLEINSERVE_CPU_OFFLOAD", parse_bool,
           "Keep weights on the CPU and move each model to the GPU when used.", kind="flag"),
    Option("no_warmup", ("--no-warmup",), "KLEINSERVE_NO_WARMUP", parse_bool,
           "Skip compiling the preset sizes at startup (then the first request of each shape compiles).",
           kind="flag"),
    Option("data_dir", ("--data-dir",), "KLEINSERVE_DATA_DIR", Path,
           "Where the job database, stored files and keys live.", metavar="DIR"),
    Option("api_keys", ("--api-key",), "KLEINSERVE_API_KEYS", parse_list,
           "An accepted API key (repeat the flag for several; the env var is comma-separated).",
           metavar="KEY", kind="append"),
    Option("no_auth", ("--no-auth",), "KLEINSERVE_NO_AUTH", parse_bool,
           "Serve without API keys (anyone who can reach the port can use it).", kind="flag"),
    Option("public_url", ("--public-url",), "KLEINSERVE_PUBLIC_URL", _opt_str,
           "Base URL clients reach us at, for file and queue URLs (default: the request's own host).",
           metavar="URL"),
    Option("result_retention", ("--result-retention",), "KLEINSERVE_RESULT_RETENTION", parse_duration,
           "How long finished requests (and their results) are kept, e.g. 7d, 24h.", metavar="DURATION"),
    Option("max_attempts", ("--max-attempts",), "KLEINSERVE_MAX_ATTEMPTS", parse_int,
           "A request whose run was interrupted by a crash this many times fails as 'crashed'."),
    Option("max_request_bytes", ("--max-request-bytes",), "KLEINSERVE_MAX_REQUEST_BYTES", parse_size,
           "Largest request body on the API routes (413 beyond).", metavar="SIZE"),
    Option("max_upload_bytes", ("--max-upload-bytes",), "KLEINSERVE_MAX_UPLOAD_BYTES", parse_size,
           "Largest file accepted by the storage upload routes (413 beyond).", metavar="SIZE"),
    Option("preview_every", ("--preview-every",), "KLEINSERVE_PREVIEW_EVERY", parse_int,
           "Send a preview image every N denoising steps on /stream (0: never)."),
    Option("batch_images", ("--batch-images",), "KLEINSERVE_BATCH_IMAGES", parse_int,
           "Up to this many images of queued requests that can share a forward (same size, steps, CFG on "
           "or off, CNS settings; acceleration none or regular) run together (1: each request alone). "
           "More throughput under load, a later first result; see BENCHMARKS.md."),
    Option("max_run_seconds", ("--max-run-seconds",), "KLEINSERVE_MAX_RUN_SECONDS", parse_duration,
           "Longest a single generation may run before it is stopped as a timeout (0: no limit).",
           metavar="DURATION"),
    Option("worker_stale_after", ("--worker-stale-after",), "KLEINSERVE_WORKER_STALE_AFTER", parse_duration,
           "A running request whose worker showed no sign of life for this long is re-queued.",
           metavar="DURATION"),
    Option("webhook_max_attempts", ("--webhook-max-attempts",), "KLEINSERVE_WEBHOOK_MAX_ATTEMPTS", parse_int,
           "Delivery attempts of a webhook before it is given up."),
    Option("webhook_backoff_base", ("--webhook-backoff-base",), "KLEINSERVE_WEBHOOK_BACKOFF_BASE", parse_duration,
           "Wait after the first failed webhook delivery; it doubles after each further failure "
           f"(capped at {format_duration(DEFAULT_BACKOFF_MAX)}).", metavar="DURATION"),
    Option("log_format", ("--log-format",), "KLEINSERVE_LOG_FORMAT", str, "text | json (one object a line)."),
    Option("log_level", ("--log-level",), "KLEINSERVE_LOG_LEVEL", str, "debug | info | warning | error."),
    Option("max_input_image_bytes", ("--max-input-image-bytes",), "KLEINSERVE_MAX_INPUT_IMAGE_BYTES", parse_size,
           "Largest input image (image_urls) accepted, fetched or inline (422 beyond).", metavar="SIZE"),
    Option("max_input_image_pixels", ("--max-input-image-pixels",), "KLEINSERVE_MAX_INPUT_IMAGE_PIXELS",
           parse_int, "Largest input image in pixels (width x height) decoded (422 beyond: decompression bombs)."),
    Option("input_fetch_timeout", ("--input-fetch-timeout",), "KLEINSERVE_INPUT_FETCH_TIMEOUT", parse_duration,
           "Longest the server spends fetching one input file (image or LoRA) from a URL.", metavar="DURATION"),
    Option("lora_dir", ("--lora-dir",), "KLEINSERVE_LORA_DIR", lambda v: Path(v) if str(v).strip() else None,
           "A folder of LoRA files that requests may name by a path relative to it (none: no local paths).",
           metavar="DIR"),
    Option("lora_cache_bytes", ("--lora-cache-bytes",), "KLEINSERVE_LORA_CACHE_BYTES", parse_size,
           "Disk space for downloaded LoRA files (<data-dir>/lora-cache); least recently used go first.",
           metavar="SIZE"),
]


def shown_default(opt: Option) -> str:
    """An option's default as a user writes it: "7d", "8MiB", "a, b", "none"."""
    d = opt.default
    if isinstance(d, list):
        return ", ".join(d) or "none"
    if d in (None, ""):
        return "none"
    if opt.parse is parse_duration:
        return format_duration(d)
    if opt.parse is parse_size:
        return format_size(d)
    return str(d)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every option as a flag. Defaults are None (so env vars can fill in); the help shows the
    env var and the real default."""
    for opt in OPTIONS:
        help_text = f"{opt.help} [env {opt.env}; default: {shown_default(opt)}]"
        if opt.kind == "flag":
            parser.add_argument(*opt.flags, dest=opt.name, action="store_true", default=None, help=help_text)
        elif opt.kind == "append":
            parser.add_argument(*opt.flags, dest=opt.name, action="append", default=None,
                                metavar=opt.metavar, help=help_text)
        else:
            parser.add_argument(*opt.flags, dest=opt.name, default=None, metavar=opt.metavar, help=help_text)


def options_markdown_table() -> str:
    rows = ["| Flag | Env var | Default | Meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        help_text = opt.help.replace("|", "\\|")
        rows.append(f"| `{opt.flags[0]}` | `{opt.env}` | `{shown_default(opt)}` | {help_text} |")
    return "\n".join(rows)
