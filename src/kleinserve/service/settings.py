"""Service configuration: one `Settings` object, filled from CLI flags with KLEINSERVE_* env fallbacks.

Precedence: command-line flag > environment variable > default. `OPTIONS` is the single table the
`serve` flags, the env lookup and README.md's configuration table are generated from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

from kleinserve.service.netguard import NetPolicy, parse_cidr
from kleinserve.service.storage import check_storage_url
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


def parse_devices(value: Any) -> list[str]:
    """`all`, or torch device names: cuda, cuda:N, cpu (each one worker process)."""
    devices = parse_list(value)
    if devices == ["all"]:
        return devices
    for d in devices:
        if d != "cpu" and d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"not a device: {d!r} (use all, cuda:0,cuda:1 or cpu,cpu)")
    return devices


def parse_model(value: Any) -> str:
    """`--model` (repeatable) / KLEINSERVE_MODEL: one spec, or FAMILY=SPEC parts; checked, and kept in
    the canonical text form `schema.format_model_specs` writes (what `to_env` passes on)."""
    from kleinserve.schema import format_model_specs, parse_model_specs

    if isinstance(value, (list, tuple)):
        return format_model_specs(parse_model_specs([str(v) for v in value]))
    return format_model_specs(parse_model_specs(str(value)))


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
    commands: tuple[str, ...] = ("serve", "worker")  # the subcommands that take it

    @property
    def default(self) -> Any:
        f = {f.name: f for f in dataclasses.fields(Settings)}[self.name]
        if f.default is not dataclasses.MISSING:
            return f.default
        return cast(Callable[[], Any], f.default_factory)()


def _opt_str(v: Any) -> Optional[str]:
    v = str(v).strip()
    return v or None


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    tls_self_signed: bool = False
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
    storage: Optional[str] = None
    storage_redirect: bool = False
    storage_public_url: Optional[str] = None
    no_image_metadata: bool = False
    max_queue_depth: int = 1000
    max_queued_per_key: int = 200
    preview_every: int = 4
    batch_images: int = 1
    max_run_seconds: float = 1800.0
    worker_stale_after: float = 120.0
    shutdown_grace: float = 60.0
    webhook_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    webhook_backoff_base: float = DEFAULT_BACKOFF_BASE
    webhook_allow_private: bool = False
    webhook_allow_cidrs: list[str] = field(default_factory=list)
    log_format: str = "text"
    log_level: str = "info"
    role: str = "all"
    devices: list[str] = field(default_factory=list)
    store: Optional[str] = None
    threads: int = 0
    max_input_image_bytes: int = 20 * 1024 * 1024
    max_input_image_pixels: int = 64 * 1024 * 1024
    input_fetch_timeout: float = 30.0
    lora_dir: Optional[Path] = None
    lora_cache_bytes: int = 8 * 1024 * 1024 * 1024
    model_memory: int = 0
    metrics_port: int = 0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.model = parse_model(self.model)  # ValueError naming the bad FAMILY=SPEC part
        if self.model_memory < 0:
            raise ValueError("model memory must be >= 0 (0: 90% of the CUDA device's memory, no limit on CPU)")
        if self.role not in ("all", "api"):
            raise ValueError(f"role must be all or api, not {self.role!r}")
        if self.role == "api" and self.devices:
            raise ValueError("--devices starts worker processes: it needs --role all (an api replica runs none)")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: a share of the CPU cores per worker)")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be a TCP port (1-65535) or 0 for none, not {self.metrics_port}")
        if self.public_url:
            self.public_url = str(self.public_url).rstrip("/")
        if self.storage:
            self.storage = check_storage_url(self.storage)
        if self.storage_redirect and not (self.storage or "").startswith("s3://"):
            raise ValueError("--storage-redirect redirects to the object store: it needs --storage s3://...")
        if self.storage_public_url:
            self.storage_public_url = str(self.storage_public_url).rstrip("/")
            if not self.storage_public_url.startswith(("https://", "http://")):
                raise ValueError(f"storage public URL must start with https:// or http://, "
                                 f"not {self.storage_public_url!r}")
            if not self.storage_redirect:
                raise ValueError("--storage-public-url is where --storage-redirect sends downloads: "
                                 "add --storage-redirect")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {self.log_format!r}")
        if self.batch_images < 1:
            raise ValueError("batch images must be >= 1 (1: every request runs alone)")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown grace must be >= 0")
        if self.max_queue_depth < 0 or self.max_queued_per_key < 0:
            raise ValueError("queue limits must be >= 0 (0: no limit)")
        if self.max_attempts < 1:
            raise ValueError("max attempts must be >= 1")
        if self.webhook_max_attempts < 1:
            raise ValueError("webhook max attempts must be >= 1")
        if self.webhook_backoff_base < 0:
            raise ValueError("webhook backoff base must be >= 0")
        for cidr in self.webhook_allow_cidrs:
            try:
                parse_cidr(cidr)
            except ValueError as exc:
                raise ValueError(f"--webhook-allow-cidr: {exc}") from None
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        if self.tls_self_signed and self.ssl_certfile:
            raise ValueError("--tls-self-signed makes its own certificate: drop --ssl-certfile/--ssl-keyfile, "
                             "or drop --tls-self-signed to serve yours")

    @property
    def model_specs(self) -> dict[str, str]:
        """The served klein families and their checkpoint specs, in `--model` order."""
        from kleinserve.schema import parse_model_specs

        return parse_model_specs(self.model)

    def net_policy(self) -> NetPolicy:
        """Where server-side requests (webhooks, and later fetched inputs) may go (service/netguard.py)."""
        return NetPolicy.from_options(self.webhook_allow_private, self.webhook_allow_cidrs)

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile and self.ssl_keyfile)

    @property
    def store_url(self) -> str:
        """`--store`, or the embedded SQLite database under --data-dir."""
        return self.store or f"sqlite://{(self.data_dir / 'jobs.sqlite3').resolve()}"  # sqlite:///abs/path

    @classmethod
    def from_sources(cls, values: Optional[Mapping[str, Any]] = None,
                     env: Optional[Mapping[str, str]] = None, *, command: str = "serve") -> Settings:
        """`values`: explicit values (e.g. parsed flags; None entries are "not given"); then the
        environment (the options of `command` only); then the defaults."""
        env = os.environ if env is None else env
        values = dict(values or {})
        kw: dict[str, Any] = {}
        for opt in OPTIONS:
            if command not in opt.commands:
                continue
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
        settings = cls(**kw)
        if command == "serve" and settings.metrics_port:
            settings._check_worker_metrics_ports()
        return settings

    def _check_worker_metrics_ports(self) -> None:
        """`serve --metrics-port`: the ports of its worker processes (see supervisor.py)."""
        if not self.devices:
            raise ValueError("--metrics-port is where worker processes serve their /metrics: it needs --devices "
                             f"(this server's own /metrics is on --port {self.port})")
        last = self.metrics_port + (len(self.devices) if self.devices != ["all"] else 1) - 1
        if self.metrics_port <= self.port <= last or last > 65535:
            raise ValueError(f"--metrics-port {self.metrics_port}: the worker processes would listen on "
                             f"{self.metrics_port}-{last}, which must be free TCP ports other than --port {self.port}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Optional[Mapping[str, str]] = None, *,
                  command: str = "serve") -> Settings:
        return cls.from_sources({o.name: getattr(args, o.name, None) for o in OPTIONS}, env, command=command)

    def to_env(self, command: str = "worker") -> dict[str, str]:
        """The KLEINSERVE_* variables that give a `command` process these settings (the options it
        takes that differ from their defaults): how the supervisor configures its worker processes."""
        out: dict[str, str] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if command not in opt.commands or value is None or value == opt.default:
                continue
            if isinstance(value, bool):
                out[opt.env] = "1" if value else "0"
            elif isinstance(value, (list, tuple)):
                out[opt.env] = ",".join(str(v) for v in value)
            else:
                out[opt.env] = str(value)
        return out


OPTIONS: list[Option] = [
    Option("host", ("--host",), "KLEINSERVE_HOST", str,
           "Interface to listen on (0.0.0.0: all); for a worker process, that of its --metrics-port.",
           commands=("serve", "worker")),
    Option("port", ("--port",), "KLEINSERVE_PORT", parse_int, "TCP port.", commands=("serve",)),
    Option("ssl_certfile", ("--ssl-certfile",), "KLEINSERVE_SSL_CERTFILE", _opt_str,
           "TLS certificate (PEM). The fal clients speak https only: serve TLS, or put a TLS proxy in front.",
           metavar="PATH", commands=("serve",)),
    Option("ssl_keyfile", ("--ssl-keyfile",), "KLEINSERVE_SSL_KEYFILE", _opt_str, "TLS private key (PEM).",
           metavar="PATH", commands=("serve",)),
    Option("tls_self_signed", ("--tls-self-signed",), "KLEINSERVE_TLS_SELF_SIGNED", parse_bool,
           "Serve https with a self-signed certificate made once and kept in <data-dir>/tls/ (its path is "
           "printed at startup: trust it with SSL_CERT_FILE / NODE_EXTRA_CA_CERTS).", kind="flag",
           commands=("serve",)),
    Option("model", ("--model",), "KLEINSERVE_MODEL", parse_model,
           "Model spec: auto | tiny | a local diffusers folder | a Hugging Face repo id (the 9B base family); "
           "or FAMILY=SPEC to serve a klein family (9b-base, 9b, 4b-base, 4b; tiny-distilled is the tiny "
           "distilled twin): repeat the flag (the env var is comma-separated) to serve several from one "
           "server, each family's endpoints by its own worker. See docs/FAMILY.md.",
           metavar="SPEC", kind="append"),
    Option("model_memory", ("--model-memory",), "KLEINSERVE_MODEL_MEMORY", parse_size,
           "With several --model families: device memory their weights may hold at once; past it the least "
           "recently used family is unloaded and loads again on demand (0: 90% of the CUDA device, no limit "
           "on CPU).", metavar="SIZE"),
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
           metavar="KEY", kind="append", commands=("serve",)),
    Option("no_auth", ("--no-auth",), "KLEINSERVE_NO_AUTH", parse_bool,
           "Serve without API keys (anyone who can reach the port can use it).", kind="flag", commands=("serve",)),
    Option("public_url", ("--public-url",), "KLEINSERVE_PUBLIC_URL", _opt_str,
           "Base URL clients reach us at, for file and queue URLs (default: the request's own host).",
           metavar="URL"),
    Option("result_retention", ("--result-retention",), "KLEINSERVE_RESULT_RETENTION", parse_duration,
           "How long finished requests (and their results) are kept, e.g. 7d, 24h.", metavar="DURATION"),
    Option("max_attempts", ("--max-attempts",), "KLEINSERVE_MAX_ATTEMPTS", parse_int,
           "A request whose run was interrupted by a crash this many times fails as 'crashed'."),
    Option("max_request_bytes", ("--max-request-bytes",), "KLEINSERVE_MAX_REQUEST_BYTES", parse_size,
           "Largest request body on the API routes (413 beyond).", metavar="SIZE", commands=("serve",)),
    Option("max_upload_bytes", ("--max-upload-bytes",), "KLEINSERVE_MAX_UPLOAD_BYTES", parse_size,
           "Largest file accepted by the storage upload routes (413 beyond).", metavar="SIZE"),
    Option("storage", ("--storage",), "KLEINSERVE_STORAGE", check_storage_url,
           "Where stored files live: file:///path or s3://bucket/prefix (default: DATA_DIR/files). S3's "
           "endpoint, region and credentials come from the standard AWS variables and config files "
           "(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); add "
           "?addressing_style=path for an endpoint without wildcard DNS.", metavar="URL"),
    Option("storage_redirect", ("--storage-redirect",), "KLEINSERVE_STORAGE_REDIRECT", parse_bool,
           "Answer file downloads with a 307 to a short-lived presigned URL of the object store instead of "
           "streaming the bytes (S3 only; clients must reach the store's endpoint).", kind="flag"),
    Option("storage_public_url", ("--storage-public-url",), "KLEINSERVE_STORAGE_PUBLIC_URL", _opt_str,
           "With --storage-redirect: redirect to this base URL plus the object's key (a CDN or public "
           "bucket in front of the S3 storage) instead of a presigned URL.", metavar="URL"),
    Option("no_image_metadata", ("--no-image-metadata",), "KLEINSERVE_NO_IMAGE_METADATA", parse_bool,
           "Store output images without their recipe (prompt, seed and parameters) in the file's metadata "
           "(it is embedded by default, bounded to 16,000 characters).", kind="flag"),
    Option("max_queue_depth", ("--max-queue-depth",), "KLEINSERVE_MAX_QUEUE_DEPTH", parse_int,
           "Most requests waiting in the queue (all keys); a submit beyond it answers 429 with Retry-After "
           "(0: no limit).", commands=("serve",)),
    Option("max_queued_per_key", ("--max-queued-per-key",), "KLEINSERVE_MAX_QUEUED_PER_KEY", parse_int,
           "Most requests one API key may have waiting in the queue; beyond it 429 with Retry-After "
           "(0: no limit).", commands=("serve",)),
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
    Option("shutdown_grace", ("--shutdown-grace",), "KLEINSERVE_SHUTDOWN_GRACE", parse_duration,
           "On SIGTERM/Ctrl-C: how long running requests may take to finish; past it they go back to the "
           "queue (not cancelled). Waiting sync runs then get 503 with the request id to poll.",
           metavar="DURATION"),
    Option("webhook_max_attempts", ("--webhook-max-attempts",), "KLEINSERVE_WEBHOOK_MAX_ATTEMPTS", parse_int,
           "Delivery attempts of a webhook before it is given up."),
    Option("webhook_backoff_base", ("--webhook-backoff-base",), "KLEINSERVE_WEBHOOK_BACKOFF_BASE", parse_duration,
           "Wait after the first failed webhook delivery; it doubles after each further failure "
           f"(capped at {format_duration(DEFAULT_BACKOFF_MAX)}).", metavar="DURATION"),
    Option("role", ("--role",), "KLEINSERVE_ROLE", str,
           "all: the API and the worker(s) in one service; api: a stateless API replica that loads no model "
           "(workers run as `kleinserve worker`, see docs/DEPLOY.md).", commands=("serve",)),
    Option("devices", ("--devices",), "KLEINSERVE_DEVICES", parse_devices,
           "One supervised worker process per device: all (every CUDA GPU), or a list like cuda:0,cuda:1 "
           "or cpu,cpu (none: one worker thread in the server process).", metavar="LIST", commands=("serve",)),
    Option("store", ("--store",), "KLEINSERVE_STORE", _opt_str,
           "The job store: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: SQLite under --data-dir). "
           "Every API replica and worker of one deployment names the same store.", metavar="URL"),
    Option("threads", ("--threads",), "KLEINSERVE_THREADS", parse_int,
           "CPU threads of each worker's torch (0: the cores divided among this box's worker processes).",
           commands=("serve", "worker")),
    Option("metrics_port", ("--metrics-port",), "KLEINSERVE_METRICS_PORT", parse_int,
           "Worker processes serve their Prometheus /metrics (jobs, steps, inference time, GPU memory) on this "
           "port, on --host; with serve --devices, the first worker on this port and each next one on the "
           "next port (0: none; the server's own /metrics is on --port).", metavar="PORT",
           commands=("serve", "worker")),
    Option("webhook_allow_private", ("--webhook-allow-private",), "KLEINSERVE_WEBHOOK_ALLOW_PRIVATE", parse_bool,
           "Let webhooks (and other server-side requests) reach loopback, private and link-local addresses "
           "(default: public addresses only, against SSRF). For on-prem receivers prefer --webhook-allow-cidr.",
           kind="flag"),
    Option("webhook_allow_cidrs", ("--webhook-allow-cidr",), "KLEINSERVE_WEBHOOK_ALLOW_CIDRS", parse_list,
           "A network that webhooks may reach although it is not public, e.g. 10.20.0.0/16 (repeat the flag; "
           "the env var is comma-separated).", metavar="CIDR", kind="append"),
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


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """Adds the options of `command` (serve | worker) as flags. Defaults are None (so env vars can fill
    in); the help shows the env var and the real default."""
    for opt in OPTIONS:
        if command not in opt.commands:
            continue
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
