"""The composition root: builds the service's parts ONCE from the settings, and runs the background
ones for a process's role.

    services = build_services(settings, registry)      # store, storage, secrets, event feed
    runtime = Runtime(services, role="all")             # + engine, worker(s), maintenance, webhooks
    runtime.start(); ...; runtime.stop()

`kleinserve serve` (roles "all" and "api"), `kleinserve worker` and the tests all go through here; the
HTTP layer receives the `Services` and never assembles a part itself.

Roles:
- "all" (the default `serve`): the API, and workers: in-process worker threads on one device, or
  with `--devices` one supervised `kleinserve worker` process per device (service/supervisor.py).
- "api": the API only; loads no model; every worker runs elsewhere (`kleinserve worker`).
- "worker": a worker process: the workers of one device; no API (its metrics with --metrics-port).

Models (`--model`, `settings.model_specs`): one checkpoint per served klein family. The registry
declares the served families' endpoints (`default_registry(settings.model_specs)`); a process that runs
workers builds one `EnginePool` for its device and one Worker per family, holding
`pool.engine_for(family)` and claiming only `registry.subset(family)`. At startup the families load in
`--model` order until the memory budget (`--model-memory`) is full; the others load on demand, the
least recently used evicted (engine/pool.py says how a worker waits for the device and a load).
Every role runs the maintenance loop (deadline expiry, the lease sweeper, purge) and the webhook
dispatcher: the store makes them safe to run everywhere at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import secrets as pysecrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import metrics
from .events import EventFeed
from .jobs import Job
from .lifecycle import Loop
from .netguard import NetPolicy
from .settings import Settings
from .storage import FileStorage, UploadTokens, load_or_create_secret, open_storage
from .store import JobStore, SecretVersions, open_store
from .webhooks import JWKS_MAX_AGE, KEY_FILE_NAME, WebhookDispatcher, WebhookSigner, load_or_create_private_key
from .worker import Maintenance, Worker

if TYPE_CHECKING:
    from kleinserve.endpoints import EndpointRegistry
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.pool import EnginePool, FamilyEngine
    from kleinserve.engine.types import ModelInfo

    from .supervisor import Supervisor

log = logging.getLogger(__name__)

ROLES = ("all", "api", "worker")
TINY_WARNING = ("SERVING THE TINY RANDOM MODEL: outputs are noise, NOT FLUX.2 [klein]. "
                "Start with --model auto (or a model folder / repo id) for real images.")

UPLOAD_SECRET = "upload-token"
WEBHOOK_KEY = "webhook-ed25519"
SECRETS = {"upload-secret": UPLOAD_SECRET, "webhook-key": WEBHOOK_KEY}  # `kleinserve secrets` names -> store names
SECRETS_REFRESH_SECONDS = 30.0  # how soon every process takes a rotated secret (`kleinserve secrets rotate`)


@dataclass
class Services:
    """What every part of a process shares: built once by `build_services`."""

    settings: Settings
    registry: EndpointRegistry
    store: JobStore
    storage: FileStorage
    tokens: UploadTokens  # signs upload URLs: the same secret on every replica
    signer: WebhookSigner  # signs webhooks: the same key (and JWKS) on every replica
    feed: EventFeed  # this process's view of the store's event log
    net_policy: NetPolicy  # the SSRF guard every server-side request goes through (webhooks, inputs)
    process_id: str  # this process, as a watcher / in logs
    webhook_versions: Optional[SecretVersions] = None  # the webhook keys `signer` holds (refresh_secrets)

    def close(self) -> None:
        self.feed.stop()
        self.storage.close()
        self.store.close()

    def refresh_secrets(self) -> None:
        """Takes the shared secrets' versions from the store (another process may have rotated them), and
        makes a staged webhook key current once it is due. Upload URLs and webhooks are signed with the
        current versions; previous upload secrets still verify; the JWKS publishes every webhook key
        that signs or may sign (current, staged, previous)."""
        if self.store.promote_due_secret(WEBHOOK_KEY):
            log.warning("the staged webhook key is current now (this process promoted it)")
        upload = self.store.secret_versions(UPLOAD_SECRET)
        if upload.current is not None and (upload.current, upload.previous) != self.tokens.secrets:
            self.tokens.set_secrets(upload.current, upload.previous)
            log.warning("the upload secret was rotated: new upload URLs are signed with the new one")
        hook = self.store.secret_versions(WEBHOOK_KEY)
        if hook.current is not None and hook != self.webhook_versions:
            self.signer.set_keys(*_webhook_keys(hook))
            self.webhook_versions = hook
            log.warning("webhook keys now: signing with %s; JWKS %s", self.signer.kid,
                        ", ".join(k["kid"] for k in self.signer.jwks()["keys"]))


def _webhook_keys(v: SecretVersions) -> tuple[Ed25519PrivateKey, Optional[Ed25519PrivateKey],
                                               Optional[Ed25519PrivateKey]]:
    """(signing, previous, staged) keys of the webhook key's versions."""
    assert v.current is not None
    return (_ed25519(v.current), _ed25519(v.previous) if v.previous else None,
            _ed25519(v.next) if v.next else None)


def _ed25519(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def _new_secret(which: str) -> bytes:
    if which == "webhook-key":
        return Ed25519PrivateKey.generate().private_bytes_raw()
    return pysecrets.token_bytes(32)


def _fingerprint(which: str, raw: Optional[bytes]) -> str:
    if raw is None:
        return "none"
    if which == "webhook-key":
        return "kid " + WebhookSigner(_ed25519(raw)).kid
    return "sha256 " + hashlib.sha256(raw).hexdigest()[:16]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe_secrets(store: JobStore) -> list[str]:
    """One line per shared secret: its versions' fingerprints."""
    lines = []
    for which, name in SECRETS.items():
        v = store.secret_versions(name)
        if v.current is None:
            lines.append(f"{which}: not created yet (the first kleinserve serve or worker on this store creates it)")
            continue
        staged = f", next {_fingerprint(which, v.next)} from {_when(v.next_from or 0.0)}" if v.next else ""
        lines.append(f"{which}: current {_fingerprint(which, v.current)}{staged}, "
                     f"previous {_fingerprint(which, v.previous)}")
    return lines


# A staged webhook key signs only once every process publishes it (a refresh) and receivers' cached
# JWKS hold it (its max-age); at most 30 days ahead.
MIN_KEY_LEAD = SECRETS_REFRESH_SECONDS + JWKS_MAX_AGE
MAX_KEY_LEAD = 30 * 86400.0


def check_rotation(which: str, after: float, drop_previous: bool) -> None:
    """ValueError (what to change) for a rotation `rotate_secrets` would refuse."""
    if which not in SECRETS:
        raise ValueError(f"no secret {which!r}: one of {', '.join(SECRETS)}")
    if not (math.isfinite(after) and 0 <= after <= MAX_KEY_LEAD):
        raise ValueError(f"--after must be between 0 and {MAX_KEY_LEAD / 86400:.0f} days")
    if after and which != "webhook-key":
        raise ValueError(f"{which} rotates at once (what it signed before stays valid): drop --after")
    if after and drop_previous:
        raise ValueError("--drop-previous replaces the current version at once: use it with --after 0")
    if 0 < after < MIN_KEY_LEAD:
        raise ValueError(f"--after must be 0 (at once) or at least {MIN_KEY_LEAD:.0f} s: every process publishes "
                         f"a new key within {SECRETS_REFRESH_SECONDS:.0f} s and receivers may cache the JWKS for "
                         f"{JWKS_MAX_AGE} s")


def rotate_secrets(store: JobStore, which: str, *, after: float = 0.0, drop_previous: bool = False) -> str:
    """`kleinserve secrets rotate WHICH`: a new version of a shared secret. `after` > 0 (the webhook key
    only, see check_rotation): it is published at once and signs from then on; otherwise it is current
    at once. The one it replaces stays valid as the previous version, unless `drop_previous`. Every
    process takes it within SECRETS_REFRESH_SECONDS. Returns what changed, for the operator.
    Raises SecretNotCreated when no process of this store has made it yet."""
    check_rotation(which, after, drop_previous)
    name = SECRETS[which]
    before = store.secret_versions(name).current
    new = _new_secret(which)
    active_from = time.time() + after if after else None
    store.rotate_secret(name, new, active_from=active_from, drop_previous=drop_previous)
    when = f", signing from {_when(active_from)}" if active_from is not None else ""
    return f"{which}: {_fingerprint(which, before)} -> {_fingerprint(which, new)}{when}"


def _existing_or_new_upload_secret(data_dir: Path) -> Callable[[], bytes]:
    """A store's first upload secret: the one an older kleinserve kept in the data dir, if any."""
    path = data_dir / "keys" / "upload-token.secret"

    def create() -> bytes:
        return load_or_create_secret(path) if path.exists() else pysecrets.token_bytes(32)
    return create


def _existing_or_new_webhook_key(data_dir: Path) -> Callable[[], bytes]:
    """A store's first webhook key (raw Ed25519 private bytes): the data dir's, if an older
    kleinserve made one, so receivers that pinned its JWKS keep verifying."""
    path = data_dir / "keys" / KEY_FILE_NAME

    def create() -> bytes:
        key = load_or_create_private_key(path) if path.exists() else Ed25519PrivateKey.generate()
        return key.private_bytes_raw()
    return create


def build_storage(settings: Settings) -> FileStorage:
    """`--storage` (file:///path or s3://bucket/prefix), default the data dir's files/."""
    return open_storage(settings.storage, data_dir=settings.data_dir, max_upload_bytes=settings.max_upload_bytes,
                        public_base_url=settings.storage_public_url)


def build_services(settings: Settings, registry: EndpointRegistry, *,
                   store: Optional[JobStore] = None) -> Services:
    """Opens the store (`--store`, default SQLite under --data-dir) and the storage, and reads the
    shared secrets from the store (created by the first process that needs them)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = store if store is not None else open_store(settings.store_url)
    try:
        storage = build_storage(settings)
        # The first process of a deployment creates them; then every process reads the same versions.
        store.shared_secret(UPLOAD_SECRET, _existing_or_new_upload_secret(settings.data_dir))
        store.shared_secret(WEBHOOK_KEY, _existing_or_new_webhook_key(settings.data_dir))
        upload = store.secret_versions(UPLOAD_SECRET)
        hook = store.secret_versions(WEBHOOK_KEY)
        assert upload.current is not None and hook.current is not None  # shared_secret made them
        tokens = UploadTokens(upload.current, upload.previous)
        signer = WebhookSigner(*_webhook_keys(hook))
    except BaseException:
        store.close()
        raise
    process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return Services(settings=settings, registry=registry, store=store, storage=storage, tokens=tokens,
                    signer=signer, feed=EventFeed(store, process_id), net_policy=settings.net_policy(),
                    process_id=process_id, webhook_versions=hook)


class Runtime:
    """The background parts of one process for its role: event feed, maintenance, webhook dispatcher,
    and (roles "all" and "worker") the engine and its worker, or the worker processes' supervisor."""

    def __init__(self, services: Services, *, role: str = "all", engine: Optional[Engine] = None,
                 load_engine: bool = False, start_worker: bool = True, worker_name: str = "w0",
                 on_model: Optional[Callable[[ModelInfo], None]] = None,
                 secrets_every: float = SECRETS_REFRESH_SECONDS):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.services = services
        self.settings = services.settings
        self.role = role
        # The process's (first family's) engine; with a pool, that family's FamilyEngine.
        self.engine: Optional[Engine | FamilyEngine] = engine
        if engine is not None:
            self._configure(engine)
        self.engine_error: Optional[str] = None
        self.engine_loading = False
        self.warmup_seconds: Optional[float] = None  # compile time spent at startup (None: not warmed)
        self.load_engine = load_engine and role != "api"
        self.on_model = on_model
        self.pool: Optional[EnginePool] = None  # the served families' engines (load_engine)
        self.workers: list[Worker] = []  # one per served family (or one over the registry with `engine`)
        self.supervisor: Optional[Supervisor] = None
        self.maintenance: Optional[Maintenance] = None
        self._secrets = Loop("secrets", services.refresh_secrets, interval=secrets_every)
        self.dispatcher: Optional[WebhookDispatcher] = None
        self._start_worker = start_worker and role != "api"
        self._worker_name = worker_name
        # Graceful shutdown (SIGTERM): set by begin_shutdown; running requests may finish until
        # stop_deadline (time.monotonic()), then they are released to the queue.
        self.stopping = threading.Event()
        self.stop_deadline: Optional[float] = None
        self._loader: Optional[threading.Thread] = None

    @property
    def worker(self) -> Optional[Worker]:
        """The first worker (the only one when one family is served)."""
        return self.workers[0] if self.workers else None

    @property
    def runs_workers_in_process(self) -> bool:
        return self._start_worker and not self.settings.devices

    # -------------------------------------------------------------- start / stop
    def start(self) -> None:
        sv, s = self.services, self.settings
        sv.feed.start()
        self.maintenance = Maintenance(sv.store, settings=s, storage=sv.storage)
        recovered = self.maintenance.recover_now()  # a previous process died: its running jobs
        if recovered:
            log.warning("recovered %d request(s) interrupted by a crash", len(recovered))
        metrics.set_queue_depth_source(sv.store.queue_depth)
        self.dispatcher = WebhookDispatcher(sv.store, sv.signer, policy=sv.net_policy,
                                            max_attempts=s.webhook_max_attempts,
                                            backoff_base=s.webhook_backoff_base)
        if self._start_worker and s.devices:
            from .supervisor import Supervisor

            self.supervisor = Supervisor(s, s.devices)
            self.supervisor.start()
        elif self._start_worker and self.engine is None and self.load_engine:
            self.pool = self._build_pool()
            families = [f for f in self.pool.specs if f in sv.registry.engines()]
            for family in families:  # engines once the startup load is done (_load_engines)
                name = self._worker_name if len(families) == 1 else f"{self._worker_name}-{family}"
                self.workers.append(Worker(sv.store, None, registry=sv.registry.subset(family), storage=sv.storage,
                                           feed=sv.feed, settings=s, name=name, on_complete=self._on_complete))
        elif self._start_worker:  # a given engine (or one set later): one worker over the whole registry
            self.workers.append(Worker(sv.store, self.engine, registry=sv.registry, storage=sv.storage,
                                       feed=sv.feed, settings=s, name=self._worker_name,
                                       on_complete=self._on_complete))
        for worker in self.workers:
            worker.start()
        self.maintenance.start()
        self._secrets.start()
        self.dispatcher.start()
        if self.engine is not None:
            self._announce_engine(self.engine.info)
        elif self.pool is not None:
            self.engine_loading = True
            self._loader = threading.Thread(target=self._load_engines, name="kleinserve-engine-loader",
                                            daemon=True)
            self._loader.start()

    def begin_shutdown(self) -> None:
        """The process was asked to stop (SIGTERM / Ctrl-C): claim nothing new; running requests get
        --shutdown-grace to finish; waiting sync runs and streams answer before it ends (api/run.py)."""
        if self.stopping.is_set():
            return
        self.stop_deadline = time.monotonic() + float(self.settings.shutdown_grace)
        self.stopping.set()
        log.warning("shutting down: no new request starts; running ones have %gs to finish",
                    self.settings.shutdown_grace)
        for worker in self.workers:
            worker.stop_claiming()

    def restart_due(self) -> bool:
        """Whether a handler waiting on a request must give up now: the shutdown grace is over."""
        return self.stopping.is_set() and time.monotonic() >= (self.stop_deadline or 0.0)

    def stop(self) -> None:
        # After begin_shutdown, what is left of the grace; without it (tests, embedding) none.
        grace = max(0.0, (self.stop_deadline or 0.0) - time.monotonic()) if self.stopping.is_set() else 0.0
        deadline = time.monotonic() + grace
        for worker in self.workers:  # none claims anything new meanwhile
            worker.stop_claiming()
        for worker in self.workers:
            worker.stop(grace=max(0.0, deadline - time.monotonic()))
        if self.supervisor is not None:
            self.supervisor.stop(grace=grace)
        if self.maintenance is not None:
            self.maintenance.stop()
        self._secrets.stop()
        if self.dispatcher is not None:
            try:
                self.dispatcher.stop()
            except Exception:
                log.exception("stopping the webhook dispatcher failed")
        self.services.feed.stop()

    def _on_complete(self, job: Job) -> None:
        if job.webhook_url and self.dispatcher is not None:
            self.dispatcher.notify()

    # -------------------------------------------------------------- the engine
    def _build_pool(self) -> EnginePool:
        """The served families' checkpoints on this process's device (`auto`: each family's own repo
        on CUDA, the tiny model or its distilled twin on CPU)."""
        from kleinserve.engine.models import resolve_spec
        from kleinserve.engine.pool import EnginePool
        from kleinserve.schema import FAMILIES

        s = self.settings
        served = self.services.registry.engines()
        specs = {f: resolve_spec(spec, repo_id=FAMILIES[f].default_repo, distilled=FAMILIES[f].distilled)
                 for f, spec in s.model_specs.items() if f in served}
        for family in served:
            if family not in specs:
                log.warning("no --model is given for the %s family: its endpoints are declared but nothing runs "
                            "them here", family)
        return EnginePool(specs or s.model_specs, loader=self._load_one, device=s.device, dtype=s.dtype,
                          cpu_offload=s.cpu_offload, budget_bytes=s.model_memory or None)

    def _load_one(self, spec: str) -> Engine:
        """The pool's loader: load, then warm up (before /ready says yes, or before the run that needed
        an on-demand load: the first request must not be the one compiling)."""
        from kleinserve.engine import load_engine

        s = self.settings
        log.info("loading model %r ...", spec)
        engine = self._configure(load_engine(spec, device=s.device, dtype=s.dtype, cpu_offload=s.cpu_offload))
        if not s.no_warmup:
            self.warmup_seconds = (self.warmup_seconds or 0.0) + sum(engine.warmup().values())
        return engine

    def _load_engines(self) -> None:
        """Startup: the families in `--model` order until the budget is full (the rest on demand),
        then every worker gets its family's engine."""
        pool = self.pool
        assert pool is not None
        family = ""
        try:
            for family in pool.specs:
                pool.ensure_loaded(family)
                self._announce_engine(pool.info(family), first=family == next(iter(pool.specs)))
                if pool.evictions:  # the budget holds no more: the others load when a request needs them
                    break
        except Exception as exc:
            self.engine_error = f"{family}: {type(exc).__name__}: {exc}" if len(pool.specs) > 1 else \
                f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", self.engine_error)
        else:
            self.engine = pool.engine_for(next(iter(pool.specs)))
            for worker in self.workers:
                worker.set_engine(pool.engine_for(worker.registry.engines()[0]))
        finally:
            self.engine_loading = False

    def _configure(self, engine: Engine) -> Engine:
        """What the service's options say about every engine it runs (`--no-image-metadata`)."""
        engine.image_metadata = not self.settings.no_image_metadata
        return engine

    def set_engine(self, engine: Engine) -> None:
        self.engine = self._configure(engine)
        self._announce_engine(engine.info)
        for worker in self.workers:
            worker.set_engine(engine)

    def _announce_engine(self, info: ModelInfo, first: bool = True) -> None:
        if first:  # the process's model in metrics, /health and the playground's badge: the first family's
            metrics.observe_model_loaded(info)
            if self.on_model is not None:
                self.on_model(info)
        if info.is_tiny:  # the loader printed the big banner; one line here for the service log
            log.warning(TINY_WARNING)
        else:
            log.info("model ready: %s on %s (%s), loaded in %.1fs", info.source, info.device, info.dtype,
                     info.load_seconds)

    # -------------------------------------------------------------- readiness
    def served(self, workers: Optional[dict[str, int]] = None) -> dict[str, Any]:
        """What this server serves, for /ready and the playground: per served klein family its
        endpoints, checkpoint spec, live workers (the whole fleet) and, where this process runs it,
        its state (resident | loading | not_loaded | failed); per unserved family how to enable it."""
        from kleinserve.schema import FAMILIES

        registry = self.services.registry
        if workers is None:
            try:
                workers = self.services.store.live_workers()
            except Exception:  # noqa: BLE001 - the store is down: /ready says so; no counts here
                workers = {}
        specs = self.settings.model_specs
        families: dict[str, Any] = {}
        for family in registry.engines():
            ids = registry.subset(family).ids()
            entry: dict[str, Any] = {"endpoints": ids, "spec": specs.get(family),
                                     "workers": max((workers.get(eid, 0) for eid in ids), default=0)}
            if self.pool is not None and family in self.pool.specs:
                entry["state"] = self.pool.state(family)
                if family in self.pool.errors:
                    entry["error"] = self.pool.errors[family]
            elif self.runs_workers_in_process:
                entry["state"] = "resident" if self.engine is not None else "not_loaded"
            families[family] = entry
        unserved: dict[str, str] = {}
        for name, declared in FAMILIES.items():
            if declared.base_id in registry.unserved:
                unserved[name] = registry.unserved[declared.base_id]
        return {"families": families, "unserved": unserved}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) for /ready: the store and storage answer, the model is loaded (roles that
        run it here), and how many live workers serve each endpoint (the whole fleet)."""
        sv = self.services
        body: dict[str, Any] = {"ready": False, "role": self.role}
        problems: list[str] = []
        for key, part, what in (("store", sv.store, "the job store"), ("storage", sv.storage, "the file storage")):
            try:
                part.ping()
                body[key] = {"ok": True, "url": part.describe()}
            except Exception as exc:
                body[key] = {"ok": False, "url": part.describe(), "error": f"{type(exc).__name__}: {exc}"}
                problems.append(f"{what} cannot be reached")
        try:
            workers = sv.store.live_workers() if body["store"]["ok"] else {}
        except Exception:
            workers = {}
        body["workers"] = {eid: workers.get(eid, 0) for eid in sv.registry.ids()}
        body.update(self.served(workers))
        info = self.engine.info if self.engine is not None else None
        if info is not None:
            body["model"] = {**dataclasses.asdict(info), "warmup_seconds": self.warmup_seconds}
            body["is_tiny"] = info.is_tiny
            if info.is_tiny:
                body["warning"] = TINY_WARNING
        if self.runs_workers_in_process:
            if self.engine is None:
                if self.engine_error:
                    body["status"] = "failed"
                    body["detail"] = f"The model failed to load: {self.engine_error}"
                elif self.engine_loading:
                    body["status"] = "loading"
                    loading = self.pool.loading if self.pool is not None else None
                    body["detail"] = (f"The model {self.pool.specs[loading]!r} ({loading}) is loading."
                                      if self.pool is not None and loading and len(self.pool.specs) > 1
                                      else f"The model {self.settings.model!r} is loading.")
                else:
                    body["status"] = "no_model"
                    body["detail"] = "No model is loaded."
                return False, body
            if any(not worker.alive for worker in self.workers):
                body["status"] = "worker_stopped"
                body["detail"] = "The worker thread is not running."
                return False, body
        if problems:
            body["status"] = "unavailable"
            body["detail"] = "; ".join(problems).capitalize() + "."
            return False, body
        body["ready"] = True
        body["status"] = "ready"
        if not any(body["workers"].values()):
            body["detail"] = ("No worker is serving yet: requests are accepted and wait in the queue "
                              "until one starts (kleinserve worker).")
        return True, body
