"""The worker: claims jobs from the store and runs them on the engine, one at a time per device.

It runs as a thread inside the server process (so /health answers during a generation) but relies on
nothing in-process for correctness: the job comes from `store.claim_next`, cancellation is the store's
flag (polled between steps), liveness is a heartbeat in the store. Any exception — a validation
error, torch running out of memory, a decode crash, a cancellation, the run-time limit — completes
THAT job with a clear error and the worker goes on with the next one.

`Maintenance` is the companion thread: it expires queued jobs whose X-Fal-Request-Timeout passed
(504), re-queues jobs whose worker died (heartbeat/pid), and purges old results.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Optional

from pydantic import ValidationError

from kleinserve.engine.types import GenerationCancelled, ModelUnavailable

from . import jobs as J
from . import metrics
from ..engine.imageio import data_uri, preview_data_uri
from .events import EventHub
from .jobs import Job, job_error
from .logging import request_context
from .store import JobStore

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ worker identity

_HOST = socket.gethostname()
_LIVE_WORKERS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def make_worker_id(name: str = "w0") -> str:
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{name}"


def is_worker_alive(worker_id: Optional[str]) -> Optional[bool]:
    """True/False when we can tell (a worker of this host), None when we cannot (another host: the
    heartbeat decides)."""
    if not worker_id:
        return False
    parts = worker_id.split(":")
    if len(parts) < 3 or parts[0] != _HOST:
        return None
    try:
        pid = int(parts[1])
    except ValueError:
        return None
    if pid == os.getpid():
        with _LIVE_LOCK:
            return worker_id in _LIVE_WORKERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


# ------------------------------------------------------------------------------ helpers

def _free_accelerator_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def classify_exception(exc: BaseException) -> dict[str, Any]:
    """The stored error for an exception raised while running a job."""
    name = type(exc).__name__
    if isinstance(exc, ValidationError):
        return job_error(f"Invalid input: {exc.errors(include_url=False)}", J.ERR_VALIDATION, 422,
                         detail=J.validation_detail(exc.errors()))
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return job_error("The accelerator ran out of memory while generating this request; try a "
                         "smaller image size or fewer images.", J.ERR_MODEL, 500)
    if isinstance(exc, ModelUnavailable):
        return job_error(f"The model is unavailable: {exc}", J.ERR_MODEL, 503)
    if isinstance(exc, (ValueError, TypeError)) and name not in ("JSONDecodeError",):
        # The engine raises ValueError for requests it cannot serve (e.g. an unsupported option).
        return job_error(f"Generation failed: {name}: {exc}", J.ERR_MODEL, 500)
    return job_error(f"Generation failed: {name}: {exc}", J.ERR_INTERNAL, 500)


# ------------------------------------------------------------------------------ the worker

class Worker:
    """One worker thread per engine/device."""

    def __init__(
        self,
        store: JobStore,
        engine: Any = None,
        *,
        registry: Any,
        storage: Any = None,
        hub: Optional[EventHub] = None,
        settings: Any = None,
        name: str = "w0",
        on_complete: Optional[Callable[[Job], None]] = None,
        idle_poll: float = 0.5,
        heartbeat_every: float = 10.0,
    ):
        self.store = store
        self.engine = engine
        self.registry = registry
        self.storage = storage
        self.hub = hub
        self.settings = settings
        self.name = name
        self.worker_id = make_worker_id(name)
        self.on_complete = on_complete
        self.idle_poll = idle_poll
        self.heartbeat_every = heartbeat_every
        self.preview_every = int(getattr(settings, "preview_every", 4) or 0)
        self.max_run_seconds = float(getattr(settings, "max_run_seconds", 0) or 0)
        self.current: Optional[str] = None
        self.jobs_done = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()  # stop the running generation (shutdown)
        self._thread: Optional[threading.Thread] = None
        self._hb_thread: Optional[threading.Thread] = None
        self._listener = self._on_store_change
        self.last_error: Optional[str] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Worker":
        if self._thread is not None:
            return self
        with _LIVE_LOCK:
            _LIVE_WORKERS.add(self.worker_id)
        self.store.add_listener(self._listener)
        self._stop.clear()
        self._abort.clear()
        self._thread = threading.Thread(target=self._run, name=f"kleinserve-worker-{self.name}", daemon=True)
        self._thread.start()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"kleinserve-heartbeat-{self.name}",
                                           daemon=True)
        self._hb_thread.start()
        return self

    def stop(self, timeout: float = 30.0, *, abort_running: bool = True) -> None:
        """Stops claiming. With `abort_running`, the running generation stops at its next step and
        its job goes back to the queue (not counted as an attempt)."""
        self._stop.set()
        if abort_running:
            self._abort.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker %s did not stop within %.0fs", self.name, timeout)
        self._thread = None
        self.store.remove_listener(self._listener)
        with _LIVE_LOCK:
            _LIVE_WORKERS.discard(self.worker_id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_engine(self, engine: Any) -> None:
        self.engine = engine
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _on_store_change(self, job: Job, event: str) -> None:
        if event in ("submit", "requeue", "release"):
            self._wake.set()

    # ------------------------------------------------------------------ loops
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.engine is None:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            try:
                job = self.store.claim_next(self.worker_id, endpoint_ids=self.registry.ids())
            except Exception:
                log.exception("claiming a job failed; retrying")
                self._stop.wait(1.0)
                continue
            if job is None:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            self.current = job.request_id
            try:
                with request_context(job.request_id):
                    self._process(job)
            except BaseException:  # absolutely never let the loop die
                log.exception("worker crashed while finishing %s", job.request_id)
            finally:
                self.current = None
                self.jobs_done += 1

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            rid = self.current
            if rid:
                try:
                    self.store.heartbeat(rid, self.worker_id)
                except Exception:
                    log.debug("heartbeat failed", exc_info=True)

    # ------------------------------------------------------------------ one job
    def _process(self, job: Job) -> None:
        rid = job.request_id
        started = time.monotonic()
        metrics.observe_job_started(job.queue_time)
        reason: dict[str, str] = {}
        try:
            spec = self.registry.get(job.endpoint_id)
            request = spec.validate_input(job.input)
            engine = self.engine
            note = " (TINY RANDOM MODEL)" if engine.info.is_tiny else ""
            self.store.append_log(rid, f"Generating with {engine.info.source}{note}, attempt {job.attempts}",
                                  source="service")
            last_check = [0.0]
            cancelled_cached = [False]

            def should_cancel() -> bool:
                if self._abort.is_set():
                    reason["why"] = "shutdown"
                    return True
                if self.max_run_seconds and time.monotonic() - started > self.max_run_seconds:
                    reason["why"] = "timeout"
                    return True
                now = time.monotonic()
                if not cancelled_cached[0] and now - last_check[0] >= 0.05:
                    last_check[0] = now
                    cancelled_cached[0] = self.store.is_cancel_requested(rid)
                if cancelled_cached[0]:
                    reason["why"] = "cancel"
                return cancelled_cached[0]

            def on_step(ev: Any) -> None:
                event: dict[str, Any] = {"type": "step", "step": int(ev.step), "total": int(ev.total)}
                if ev.preview is not None:
                    try:
                        event["preview"] = preview_data_uri(ev.preview, max_side=256)
                    except Exception:
                        log.debug("preview encoding failed", exc_info=True)
                if self.hub is not None:
                    self.hub.publish(rid, event)
                self.store.append_log(rid, f"step {int(ev.step)}/{int(ev.total)}")
                metrics.observe_step()

            result = engine.generate(request, on_step=on_step, should_cancel=should_cancel,
                                     preview_every=self.preview_every,
                                     wants_preview=self._has_listeners(rid))
            for line in result.logs:
                self.store.append_log(rid, str(line), source="engine")
            files = self._store_images(job, request, result)
            output = spec.build_output(job, request, result, files)
            # Metrics first: once the job reads COMPLETED, /metrics already counts it.
            metrics.observe_result(result, getattr(request, "output_format", "png"))
            done = self.store.complete_ok(rid, output)
            log.info("request completed in %.2fs", time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - every failure completes the job
            done = self._fail(job, exc, reason.get("why"))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            metrics.observe_job_finished_running()
        if done is not None and self.on_complete is not None:
            try:
                self.on_complete(done)
            except Exception:
                log.exception("on_complete hook failed")

    def _fail(self, job: Job, exc: BaseException, why: Optional[str]) -> Optional[Job]:
        rid = job.request_id
        if isinstance(exc, GenerationCancelled) or why in ("shutdown", "timeout", "cancel"):
            if why == "shutdown":
                try:
                    self.store.release(rid)
                    log.info("request %s released back to the queue (shutdown)", rid)
                except Exception:
                    log.exception("could not release %s", rid)
                return None
            if why == "timeout":
                error = job_error(f"Generation exceeded the server's run-time limit of "
                                  f"{self.max_run_seconds:.0f}s and was stopped.", J.ERR_TIMEOUT, 504)
            else:
                error = job_error("Request was cancelled while running; it stopped at the next step.",
                                  J.ERR_CANCELLED, J.CANCELLED_STATUS_CODE)
        else:
            error = classify_exception(exc)
            if error["error_type"] in (J.ERR_INTERNAL, J.ERR_MODEL):
                log.error("request %s failed: %s", rid, error["error"], exc_info=exc)
            _free_accelerator_memory()
        self.last_error = error["error"]
        metrics.observe_job_failed(error["error_type"])
        try:
            self.store.append_log(rid, error["error"], level="ERROR", source="service")
        except Exception:
            pass
        try:
            return self.store.complete_error(rid, error)
        except J.InvalidTransition:
            log.warning("request %s was no longer ours to complete (recovered elsewhere?)", rid)
        except Exception:
            log.exception("could not record the failure of %s", rid)
        return None

    # ------------------------------------------------------------------ outputs
    def _public_base(self, job: Job) -> str:
        base = getattr(self.settings, "public_url", None) or job.public_base
        if not base:
            host = getattr(self.settings, "host", "127.0.0.1")
            port = getattr(self.settings, "port", 8000)
            scheme = "https" if getattr(self.settings, "tls", False) else "http"
            base = f"{scheme}://{host}:{port}"
        return str(base).rstrip("/")

    def _has_listeners(self, rid: str) -> Callable[[], bool]:
        """Previews only go out over this process's event hub: skip them while nobody subscribes."""
        hub = self.hub
        return lambda: hub is not None and hub.subscriber_count(rid) > 0

    def _store_images(self, job: Job, request: Any, result: Any) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = []
        sync = bool(getattr(request, "sync_mode", False))
        for k, im in enumerate(result.images):
            file_name = f"{job.request_id[:8]}-{k}.{im.extension}"
            if sync or self.storage is None:
                if not sync:
                    log.warning("no file storage configured: returning data URIs")
                files.append({"url": data_uri(im.data, im.content_type), "file_name": file_name,
                              "file_size": len(im.data)})
                continue
            stored = self.storage.put(im.data, im.content_type, file_name, owner=job.owner)
            files.append({"url": stored.url(self._public_base(job)), "file_name": stored.file_name,
                          "file_size": stored.size})
        return files


# ------------------------------------------------------------------------------ maintenance

class Maintenance:
    """Background upkeep: deadline expiry (often), crash recovery (every `recover_every`), purge
    (every `purge_every`)."""

    def __init__(self, store: JobStore, *, settings: Any = None, storage: Any = None,
                 expire_every: float = 0.25, recover_every: float = 15.0, purge_every: float = 3600.0):
        self.store = store
        self.settings = settings
        self.storage = storage
        self.expire_every = expire_every
        self.recover_every = recover_every
        self.purge_every = purge_every
        self.max_attempts = int(getattr(settings, "max_attempts", 3) or 3)
        self.stale_after = float(getattr(settings, "worker_stale_after", 120.0) or 120.0)
        self.retention = float(getattr(settings, "result_retention", 7 * 86400.0) or 0)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def recover_now(self) -> list[Job]:
        changed = self.store.recover(max_attempts=self.max_attempts, stale_after=self.stale_after,
                                     is_worker_alive=is_worker_alive)
        for j in changed:
            if j.status == J.IN_QUEUE:
                log.warning("request %s: its worker stopped; re-queued (attempt %d so far)", j.request_id, j.attempts)
            else:
                log.error("request %s: failed as crashed after %d attempts", j.request_id, j.attempts)
                metrics.observe_job_failed(J.ERR_CRASHED)
        return changed

    def purge_now(self) -> list[Job]:
        """Deletes finished requests older than the retention with their images, then every stored
        file older than it (uploads included) and abandoned partial uploads. Returns the purged jobs."""
        if not self.retention:
            return []
        purged = self.store.purge(self.retention)
        if purged and self.storage is not None:
            for j in purged:
                for f in _stored_file_ids(j):
                    try:
                        self.storage.delete(f)
                    except Exception:
                        log.debug("could not delete file %s", f, exc_info=True)
        if purged:
            log.info("purged %d finished request(s) older than %.0fs", len(purged), self.retention)
        if self.storage is not None:
            removed = self.storage.purge_older_than(self.retention)
            if removed:
                log.info("purged %d stored file(s) older than %.0fs", removed, self.retention)
        return purged

    def start(self) -> "Maintenance":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kleinserve-maintenance", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        next_recover = time.monotonic() + self.recover_every
        next_purge = time.monotonic() + 5.0
        while not self._stop.wait(self.expire_every):
            try:
                expired = self.store.expire_due()
                for j in expired:
                    log.info("request %s expired in the queue (X-Fal-Request-Timeout)", j.request_id)
                    metrics.observe_job_failed(J.ERR_TIMEOUT)
                now = time.monotonic()
                if now >= next_recover:
                    next_recover = now + self.recover_every
                    self.recover_now()
                if now >= next_purge:
                    next_purge = now + self.purge_every
                    self.purge_now()
            except Exception:
                log.exception("maintenance pass failed")


def _stored_file_ids(job: Job) -> list[str]:
    """Ids of our stored files referenced by a job's result (`.../files/<id>/<name>` URLs)."""
    out = []
    for im in (job.result or {}).get("images", []) or []:
        url = str(im.get("url", ""))
        if "/files/" in url and not url.startswith("data:"):
            parts = url.split("/files/", 1)[1].split("/")
            if parts and parts[0]:
                out.append(parts[0])
    return out
