"""The worker: claims jobs from the store and runs them on the engine, one engine run at a time per device.

It runs as a thread inside the server process (so /health answers during a generation) but relies on
nothing in-process for correctness: the job comes from `store.claim_next`, cancellation is the store's
flag (polled between steps), liveness is a heartbeat in the store. Any exception — a validation
error, torch running out of memory, a decode crash, a cancellation, the run-time limit — completes
THAT job with a clear error and the worker goes on with the next one.

With `batch_images > 1` (`--batch-images`) one engine run may hold several jobs: after a claim the
worker also claims queued jobs with the same `Engine.batch_key` (the store's `claim_next(match=...)`)
and runs them through one `engine.generate_batch`; each job is still completed on its own (a cancelled
one at once), and a batch whose shared run fails is re-run one job at a time.

`Maintenance` is the companion thread: it expires queued jobs whose X-Fal-Request-Timeout passed
(504), re-queues jobs whose worker died (heartbeat/pid), and purges old results.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Optional

from pydantic import ValidationError

from kleinserve.engine.types import GenerationCancelled, GenerationTask, LoraFormatError, ModelUnavailable

from . import jobs as J
from . import metrics
from ..engine.imageio import data_uri, preview_data_uri
from .events import EventHub
from .inputs import InputError, RequestInputs
from .jobs import Job, job_error
from .logging import request_context
from .store import JobStore

log = logging.getLogger(__name__)

BATCH_LOOKAHEAD = 32  # queued jobs looked at for ones that can join a batch (the rest keep their place)


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
    if isinstance(exc, LoraFormatError):  # a LoRA file the model cannot take
        return job_error(f"Invalid input: {exc}", J.ERR_VALIDATION, 422,
                         detail=[{"loc": ["body", "loras"], "msg": str(exc), "type": "lora_format"}])
    if isinstance(exc, InputError):  # a bad input file (image_urls, loras): names the item and the reason
        return job_error(f"Invalid input: {exc}", J.ERR_VALIDATION, 422, detail=exc.detail())
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
        self.batch_images = int(getattr(settings, "batch_images", 1) or 1)
        self.running: list[str] = []  # request ids of the jobs being run
        self.jobs_done = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()  # stop the running generation (shutdown)
        self._thread: Optional[threading.Thread] = None
        self._hb_thread: Optional[threading.Thread] = None
        self._listener = self._on_store_change
        self.last_error: Optional[str] = None
        self.inputs = RequestInputs(settings, storage)  # image_urls and loras -> decoded images, LoRA files

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
            batch = self._fill_batch(job)
            self.running = [j.request_id for j in batch]
            try:
                self._process([_Run(self, j) for j in batch])
            except BaseException:  # absolutely never let the loop die
                log.exception("worker crashed while finishing %s", ", ".join(self.running))
            finally:
                self.running = []
                self.jobs_done += len(batch)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            for rid in list(self.running):
                try:
                    self.store.heartbeat(rid, self.worker_id)
                except Exception:
                    log.debug("heartbeat failed", exc_info=True)

    # ------------------------------------------------------------------ batches
    def _batch_key(self, job: Job) -> tuple[Optional[tuple], int]:
        """(the engine's batch key of the job's request or None, its number of images)."""
        try:
            request = self.registry.get(job.endpoint_id).validate_input(job.input)
            return self.engine.batch_key(request), int(getattr(request, "num_images", 1))
        except Exception:  # invalid input: it runs (and fails) alone
            return None, 0

    def _fill_batch(self, first: Job) -> list[Job]:
        """`first` plus queued jobs that can share its forwards, up to `batch_images` images in all."""
        if self.batch_images <= 1:
            return [first]
        key, images = self._batch_key(first)
        batch = [first]
        while key is not None and images < self.batch_images:
            room = self.batch_images - images

            def fits(job: Job) -> bool:
                other, n = self._batch_key(job)
                return other == key and n <= room

            try:
                more = self.store.claim_next(self.worker_id, endpoint_ids=self.registry.ids(), match=fits,
                                             lookahead=BATCH_LOOKAHEAD)
            except Exception:  # the jobs claimed so far are ours now: run them
                log.exception("claiming more jobs for a batch failed; running %d", len(batch))
                break
            if more is None:
                break
            batch.append(more)
            images += self._batch_key(more)[1]
        return batch

    # ------------------------------------------------------------------ running jobs
    def _process(self, runs: list["_Run"]) -> None:
        """Runs claimed jobs through one `engine.generate_batch` and completes each of them."""
        for run in runs:
            metrics.observe_job_started(run.job.queue_time)
        metrics.observe_batch(len(runs))
        try:
            ready = [run for run in runs if run.prepare()]
            if ready:
                self._generate(ready)
        finally:
            for run in runs:
                if not run.finished:  # never leave a claimed job behind
                    self._complete(run, error=RuntimeError("the worker lost track of this request"))

    def _generate(self, runs: list["_Run"]) -> None:
        tasks = [GenerationTask(run.request, on_step=run.on_step, should_cancel=run.should_cancel,
                                wants_preview=self._has_listeners(run.rid), reference_images=run.files.images,
                                loras=run.files.loras) for run in runs]
        # Engine log lines carry the request id when there is one request to name.
        context = request_context(runs[0].rid) if len(runs) == 1 else contextlib.nullcontext()
        failure: Optional[BaseException] = None
        try:
            with context:
                outcomes = self.engine.generate_batch(tasks, preview_every=self.preview_every)
        except (KeyboardInterrupt, SystemExit) as exc:
            for run in runs:
                self._complete(run, error=exc)
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure completes the job(s)
            failure = exc
            # Its traceback holds the failed run's frames and their tensors: free them before re-running.
            traceback.clear_frames(exc.__traceback__)
        if failure is None:
            for run, outcome in zip(runs, outcomes):
                self._complete(run, result=outcome)
            return
        live = [run for run in runs if not run.finished]
        if len(live) > 1:
            # A failure of the shared run (most likely memory): each request gets its own chance.
            log.warning("a batch of %d requests failed (%s: %s); running them one by one",
                        len(live), type(failure).__name__, failure)
            failure = None
            _free_accelerator_memory()
            for run in live:
                if self._abort.is_set():
                    run.stop("shutdown")
                else:
                    run.restart("the batch it ran in failed; running it alone")
                    self._generate([run])
            return
        for run in live:
            if self._abort.is_set():
                run.stop("shutdown")
            else:
                self._complete(run, error=failure)

    def _complete(self, run: "_Run", *, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Completes one job with its result (or cancellation outcome) or error, then calls on_complete."""
        if run.finished:
            return
        run.finished = True
        metrics.observe_job_finished_running()
        job, rid = run.job, run.rid
        done: Optional[Job] = None
        with request_context(rid):
            if isinstance(result, BaseException):  # cancelled, or its own decoding/encoding failed
                error = result
            try:
                if error is not None:
                    done = self._fail(job, error, run.why)
                else:
                    for line in result.logs:
                        self.store.append_log(rid, str(line), source="engine")
                    files = self._store_images(job, run.request, result)
                    output = run.spec.build_output(job, run.request, result, files)
                    # Metrics first: once the job reads COMPLETED, /metrics already counts it.
                    metrics.observe_result(result, getattr(run.request, "output_format", "png"))
                    done = self.store.complete_ok(rid, output)
                    log.info("request completed in %.2fs", time.monotonic() - run.started)
            except Exception as exc:  # storing or building the output failed
                done = self._fail(job, exc, None)
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


class _Run:
    """One claimed job on its way through the engine: its validated request, its progress and
    cancellation hooks (the engine calls them between steps), and whether it is finished."""

    def __init__(self, worker: Worker, job: Job):
        self.worker = worker
        self.job = job
        self.rid = job.request_id
        self.started = time.monotonic()
        self.spec: Any = None
        self.request: Any = None
        self.files: Any = None  # inputs.RequestFiles: its decoded input images and LoRA files
        self.why: Optional[str] = None  # why it was stopped: shutdown | timeout | cancel
        self.finished = False
        self._last_check = 0.0
        self._cancel_seen = False

    def prepare(self) -> bool:
        """Validates the input and logs the start; False (and the job failed) when it cannot run."""
        w = self.worker
        with request_context(self.rid):
            try:
                self.spec = w.registry.get(self.job.endpoint_id)
                self.request = self.spec.validate_input(self.job.input)
                self.files = w.inputs.resolve(self.request, public_base=w._public_base(self.job),
                                              log=lambda line: w.store.append_log(self.rid, line, source="service"))
                info = w.engine.info
                note = " (TINY RANDOM MODEL)" if info.is_tiny else ""
                w.store.append_log(self.rid, f"Generating with {info.source}{note}, attempt {self.job.attempts}",
                                   source="service")
            except Exception as exc:
                w._complete(self, error=exc)
                return False
        return True

    def restart(self, why: str) -> None:
        """Before running this job again on its own: its run-time limit starts over."""
        self.started = time.monotonic()
        with contextlib.suppress(Exception):
            self.worker.store.append_log(self.rid, f"Restarting: {why}", level="WARNING", source="service")

    def stop(self, why: str) -> None:
        """Completes the job as stopped: `cancel`, `timeout`, or `shutdown` (back to the queue)."""
        self.why = why
        self.worker._complete(self, error=GenerationCancelled(f"stopped: {why}"))

    def should_cancel(self) -> bool:
        """Polled by the engine before each step. Once True the engine drops this request, so it is
        completed here and now (cancelled, timed out, or released on shutdown) rather than when the
        requests it shares the run with finish. (`on_complete` then runs on the engine's thread, under
        its lock: a hook must never wait for another generation.)"""
        w = self.worker
        why = None
        if w._abort.is_set():
            why = "shutdown"
        elif w.max_run_seconds and time.monotonic() - self.started > w.max_run_seconds:
            why = "timeout"
        else:
            now = time.monotonic()
            if not self._cancel_seen and now - self._last_check >= 0.05:
                self._last_check = now
                try:
                    self._cancel_seen = w.store.is_cancel_requested(self.rid)
                except Exception:  # a busy store must not fail the run: ask again at the next step
                    log.warning("could not read the cancel flag of %s", self.rid, exc_info=True)
            if self._cancel_seen:
                why = "cancel"
        if why is None:
            return False
        self.stop(why)
        return True

    def on_step(self, ev: Any) -> None:
        w = self.worker
        event: dict[str, Any] = {"type": "step", "step": int(ev.step), "total": int(ev.total)}
        if ev.preview is not None:
            try:
                event["preview"] = preview_data_uri(ev.preview, max_side=256)
            except Exception:
                log.debug("preview encoding failed", exc_info=True)
        if w.hub is not None:
            w.hub.publish(self.rid, event)
        try:
            w.store.append_log(self.rid, f"step {int(ev.step)}/{int(ev.total)}")
        except Exception:  # progress is best effort; the result is what must not be lost
            log.warning("could not log step %d of %s", int(ev.step), self.rid, exc_info=True)
        metrics.observe_step()


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
