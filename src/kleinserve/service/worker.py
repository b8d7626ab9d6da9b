"""The worker: claims jobs from the store and runs them on the engine, one engine run at a time per device.

It runs as threads inside the server process (`kleinserve serve`) or in a worker process of its own
(`kleinserve worker`, one per GPU, on any host) and relies on nothing in-process for correctness:
- a job comes from `store.claim_next`, which takes a lease on the database clock; the monitor thread's
  heartbeats extend it; every write about the job carries the lease (`Lease`), so a worker that lost
  its job (its lease expired and the sweeper gave it to another worker) can change nothing;
- cancellation is the store's flag: its event reaches the worker through the EventFeed before the
  next step (the monitor also polls it);
- progress is typed (`store.record_progress(step, total)`), previews only while someone watches; a
  thread of its own writes it (`_Run.on_step` only leaves it there), so a slow or stalled store never
  holds up the denoising loop.

Every claimed job ends in `Worker._finish`, from one outcome value (the engine's result or an
exception; GenerationCancelled with the run's `stop_reason`): complete_ok, complete_error or release.
Any exception — a validation error, running out of memory, a decode crash, a cancellation, the
run-time limit — ends THAT job with a clear error and the worker goes on with the next one.

With `batch_images > 1` (`--batch-images`) one engine run may hold several jobs: after a claim the
worker also claims queued jobs with the same `Engine.batch_key` (the store's `claim_next(match=...)`)
and runs them through one `engine.generate_batch`; each job still ends on its own (a cancelled one at
once), and a batch whose shared run fails is re-run one job at a time.

`Maintenance` is the companion loop any process may run (the store serialises it): it expires queued
jobs whose X-Fal-Request-Timeout passed (504), sweeps jobs whose lease expired or whose worker died
(re-queued, or failed as crashed after --max-attempts), and purges old results.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from pydantic import ValidationError

from kleinserve.engine.types import (
    GenerationCancelled,
    GenerationResult,
    GenerationTask,
    LoraFormatError,
    ModelUnavailable,
    StepEvent,
)

from ..engine.imageio import data_uri, preview_data_uri
from . import jobs as J
from . import metrics
from .events import EventFeed
from .inputs import InputError, RequestFiles, RequestInputs
from .jobs import Job, job_error
from .lifecycle import Loop
from .logging import request_context
from .settings import Settings
from .storage import FileStorage, StorageUnavailable
from .store import EV_STATUS, JobEvent, JobStore, Lease, LeaseLost

if TYPE_CHECKING:
    from PIL import Image

    from kleinserve.endpoints import EndpointRegistry, EndpointSpec
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.pool import FamilyEngine
    from kleinserve.schema import FluxKleinInput

log = logging.getLogger(__name__)

T = TypeVar("T")
PATIENCE = 120.0  # seconds a finished request waits for an unreachable job store or storage before failing
PROGRESS_LOG_LINES = 4  # "step i/N" log lines per run (at each quarter), not one per step
PROGRESS_FLUSH_SECONDS = 10.0  # the longest a batch's outcomes wait for its progress to be written
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
    """Claims jobs and runs them on one engine (one device), one engine run at a time.

    Threads: the claim loop (runs the engine), a monitor (heartbeats that extend the leases, the
    worker's registration, whether someone watches a running request, a fallback poll of the cancel
    flags), and the process's EventFeed, which wakes the claim loop on new work and relays cancels.
    """

    def __init__(
        self,
        store: JobStore,
        engine: Optional[Engine | FamilyEngine] = None,
        *,
        registry: EndpointRegistry,
        settings: Settings,
        storage: Optional[FileStorage] = None,
        feed: Optional[EventFeed] = None,
        name: str = "w0",
        on_complete: Optional[Callable[[Job], None]] = None,
        idle_poll: float = 0.5,
        monitor_every: float = 0.25,
    ):
        self.store = store
        self.engine = engine
        self.registry = registry
        self.storage = storage
        self.feed = feed
        self.settings = settings
        self.name = name
        self.worker_id = make_worker_id(name)
        self.on_complete = on_complete
        self.preview_every = int(settings.preview_every or 0)
        self.max_run_seconds = float(settings.max_run_seconds or 0)
        self.batch_images = int(settings.batch_images or 1)
        self.lease_seconds = float(settings.worker_stale_after)
        # Heartbeats well inside the lease: three can be lost before another worker may take over.
        self.heartbeat_every = max(0.05, self.lease_seconds / 4)
        self.running: list[_Run] = []
        self.jobs_done = 0
        self.last_error: Optional[str] = None
        self.draining = threading.Event()  # stop claiming (graceful shutdown)
        self.abort = threading.Event()  # stop the running generation at its next step (released)
        self._claims = Loop(f"worker-{name}", self._claim_pass, interval=idle_poll)
        self._monitor = Loop(f"monitor-{name}", self._monitor_pass, interval=monitor_every)
        self._progress = Loop(f"progress-{name}", self._progress_pass, interval=0.5)
        self._flush_deadline: Optional[float] = None  # of the running batch (see _Run.finish_progress)
        self._next_registration = 0.0
        self.inputs = RequestInputs(settings, storage)  # image_urls and loras -> decoded images, LoRA files

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Worker:
        with _LIVE_LOCK:
            _LIVE_WORKERS.add(self.worker_id)
        if self.feed is not None:
            self.feed.add_listener(self._on_event)
        self.draining.clear()
        self.abort.clear()
        self._monitor.start()
        self._progress.start()
        self._claims.start()
        return self

    def stop_claiming(self) -> None:
        """Shutdown begins: no new job is claimed; the running ones go on (then `stop`)."""
        self.draining.set()

    def stop(self, grace: float = 0.0, timeout: float = 30.0) -> None:
        """Stops claiming; gives running jobs `grace` seconds to finish (heartbeats go on meanwhile),
        then stops them at their next step and releases them to the queue (no attempt counted)."""
        self.stop_claiming()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.abort.set()
        self._claims.stop(timeout)
        self._monitor.stop(timeout)
        self._progress.stop(timeout)
        if self.feed is not None:
            self.feed.remove_listener(self._on_event)
        with contextlib.suppress(Exception):
            self.store.deregister_worker(self.worker_id)
        with _LIVE_LOCK:
            _LIVE_WORKERS.discard(self.worker_id)

    @property
    def alive(self) -> bool:
        return self._claims.alive

    def set_engine(self, engine: Engine | FamilyEngine) -> None:
        self.engine = engine
        self._next_registration = 0.0
        self._claims.wake()
        self._monitor.wake()

    def wake(self) -> None:
        self._claims.wake()

    def _on_event(self, ev: JobEvent) -> None:
        """On the feed's thread: new work wakes the claim loop; a cancel reaches the running job."""
        if ev.kind != EV_STATUS:
            return
        if ev.event in ("submit", "requeue", "release"):
            self._claims.wake()
        elif ev.event == "request_cancel":
            for run in list(self.running):
                if run.rid == ev.request_id:
                    run.cancel_seen.set()

    # ------------------------------------------------------------------ loops
    def _claim_pass(self) -> None:
        if self.engine is None or self.draining.is_set():
            return
        # An engine pool's family (engine/pool.py): claim and run only in the device's turn, so a
        # claimed job never waits behind another family's run.
        turn = getattr(self.engine, "turn", None)
        with (turn(give_up=self.draining.is_set) if turn is not None else contextlib.nullcontext(True)) as mine:
            if mine:
                self._claim_and_run()

    def _claim_and_run(self) -> None:
        assert self.engine is not None
        job = self.store.claim_next(self.worker_id, endpoint_ids=self.registry.ids(),
                                    lease_seconds=self.lease_seconds)
        if job is None:
            return
        runs = [_Run(self, j) for j in self._fill_batch(job)]
        self.running = runs
        try:
            self._process(runs)
        finally:
            self.running = []
            self.jobs_done += len(runs)
        self._claims.wake()  # look for the next job at once

    def _monitor_pass(self) -> None:
        now = time.monotonic()
        if self.engine is not None and now >= self._next_registration:
            self._next_registration = now + self.lease_seconds / 3
            try:
                self.store.register_worker(self.worker_id, self.registry.ids(), ttl=self.lease_seconds,
                                           info={"name": self.name, "device": self.engine.info.device,
                                                 "model": self.engine.info.source})
            except Exception:
                log.warning("could not register worker %s in the store", self.worker_id, exc_info=True)
        for run in list(self.running):
            run.monitor(now)

    def _progress_pass(self) -> None:
        for run in list(self.running):
            run.write_progress()

    @property
    def progress_running(self) -> bool:
        return self._progress.alive

    def progress_deadline(self) -> float:
        """When the running batch's outcomes stop waiting for its progress (set by the first wait)."""
        if self._flush_deadline is None:
            self._flush_deadline = time.monotonic() + PROGRESS_FLUSH_SECONDS
        return self._flush_deadline

    # ------------------------------------------------------------------ batches
    def _batch_key(self, job: Job) -> tuple[Optional[tuple], int]:
        """(the engine's batch key of the job's request or None, its number of images)."""
        assert self.engine is not None
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
                return other == key and n <= room  # noqa: B023 - used within this iteration only

            try:
                more = self.store.claim_next(self.worker_id, endpoint_ids=self.registry.ids(), match=fits,
                                             lookahead=BATCH_LOOKAHEAD, lease_seconds=self.lease_seconds)
            except Exception:  # the jobs claimed so far are ours now: run them
                log.exception("claiming more jobs for a batch failed; running %d", len(batch))
                break
            if more is None:
                break
            batch.append(more)
            images += self._batch_key(more)[1]
        return batch

    # ------------------------------------------------------------------ running jobs
    def _process(self, runs: list[_Run]) -> None:
        """Runs claimed jobs through one `engine.generate_batch`; each ends in `_finish`."""
        self._flush_deadline = None
        for run in runs:
            metrics.observe_job_started(run.job.queue_time)
        metrics.observe_batch(len(runs))
        try:
            ready = [run for run in runs if run.prepare()]
            if ready and self._load_model(ready):
                self._generate(ready)
        finally:
            for run in runs:
                if not run.finished:  # never leave a claimed job behind
                    self._finish(run, RuntimeError("the worker lost track of this request"))

    def _load_model(self, runs: list[_Run]) -> bool:
        """An engine pool's family that is not resident loads now (the jobs are claimed: their log says
        so, and their run-time limit starts after the load); False (the jobs ended) when it fails."""
        engine = self.engine
        assert engine is not None
        ensure = getattr(engine, "ensure_loaded", None)
        if ensure is None or getattr(engine, "state", "resident") == "resident":
            return True
        for run in runs:
            with contextlib.suppress(Exception):
                self.store.append_log(run.rid, f"Loading the model {engine.info.spec!r}: it is not resident "
                                               "on this device", source="service", lease=run.lease)
        t0 = time.monotonic()
        try:
            ensure()
        except Exception as exc:  # noqa: BLE001 - each job ends with why
            log.error("worker %s: loading its model failed: %s: %s", self.name, type(exc).__name__, exc)
            for run in runs:
                self._finish(run, exc)
            return False
        for run in runs:
            run.started = time.monotonic()
            with contextlib.suppress(Exception):
                self.store.append_log(run.rid, f"Model loaded in {time.monotonic() - t0:.1f}s", source="service",
                                      lease=run.lease)
        return True

    def _generate(self, runs: list[_Run]) -> None:
        assert self.engine is not None
        tasks = []
        for run in runs:
            assert run.files is not None and run.request is not None  # prepare() set them
            tasks.append(GenerationTask(run.request, on_step=run.on_step, should_cancel=run.should_cancel,
                                        wants_preview=run.wants_preview, on_done=functools.partial(self._finish, run),
                                        reference_images=run.files.images, loras=run.files.loras))
        # Engine log lines carry the request id when there is one request to name.
        context = request_context(runs[0].rid) if len(runs) == 1 else contextlib.nullcontext()
        try:
            with context:
                self.engine.generate_batch(tasks, preview_every=self.preview_every)
            return
        except (KeyboardInterrupt, SystemExit) as exc:
            for run in runs:
                self._finish(run, exc)
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure ends the job(s) in _finish
            failure = exc
            # Its traceback holds the failed run's frames and their tensors: free them before re-running.
            traceback.clear_frames(exc.__traceback__)
        live = [run for run in runs if not run.finished]
        if len(live) > 1:
            # A failure of the shared run (most likely memory): each request gets its own chance.
            log.warning("a batch of %d requests failed (%s: %s); running them one by one",
                        len(live), type(failure).__name__, failure)
            _free_accelerator_memory()
            for run in live:
                if self.abort.is_set():
                    self._finish(run, GenerationCancelled("stopped: shutdown"))
                else:
                    run.restart("the batch it ran in failed; running it alone")
                    self._generate([run])
            return
        for run in live:
            self._finish(run, GenerationCancelled("stopped: shutdown") if self.abort.is_set() else failure)

    def _finish(self, run: _Run, outcome: GenerationResult | BaseException) -> None:
        """THE place a claimed job ends: its outcome becomes one fenced store write (complete_ok,
        complete_error or release). A write the store refuses (LeaseLost: the job was taken back
        and is someone else's now) changes nothing, and this attempt's stored files are deleted."""
        if run.finished:
            return
        run.finish_progress()  # its last steps are in the store before its outcome
        run.finished = True
        metrics.observe_job_finished_running()
        stored: list[str] = []
        done: Optional[Job] = None
        with request_context(run.rid):
            try:
                verdict = self._verdict(run, outcome, stored)
                # LeaseLost (another worker owns the job now) and state errors are final
                done = self._patiently(f"recording the outcome of {run.rid}",
                                       lambda: self._commit(run, verdict, stored),
                                       retry=(Exception,), final=(LeaseLost, J.InvalidTransition))
            except LeaseLost as exc:
                log.warning("%s; its result is dropped", exc)
                self._delete_files(stored)
            except Exception:
                log.exception("could not record the outcome of %s", run.rid)
        if done is not None and self.on_complete is not None:
            try:
                self.on_complete(done)
            except Exception:
                log.exception("on_complete hook failed")

    def _verdict(self, run: _Run, outcome: GenerationResult | BaseException, stored: list[str]) -> _Verdict:
        """What the outcome means for the job: its output, its error, a release, or nothing (lost)."""
        if isinstance(outcome, GenerationCancelled):
            reason = run.stop_reason() or "cancel"
            if reason == "shutdown":
                return _Verdict("release")
            if reason == "lost":
                return _Verdict("lost")
            if reason == "timeout":
                return _Verdict("error", error=job_error(
                    f"Generation exceeded the server's run-time limit of {self.max_run_seconds:.0f}s and was "
                    "stopped.", J.ERR_TIMEOUT, 504))
            return _Verdict("error", error=job_error(
                "Request was cancelled while running; it stopped at the next step.", J.ERR_CANCELLED,
                J.CANCELLED_STATUS_CODE))
        if isinstance(outcome, BaseException):
            return _Verdict("error", error=self._classify(run, outcome))
        assert run.spec is not None and run.request is not None  # a result: prepare() set them
        try:
            for line in outcome.logs:
                try:
                    self.store.append_log(run.rid, str(line), source="engine", lease=run.lease)
                except LeaseLost:
                    raise
                except Exception:  # the log lines are best effort: a store hiccup must not fail the result
                    log.warning("could not store the engine's log lines of %s", run.rid, exc_info=True)
                    break
            files = self._store_images(run.job, run.request, outcome, stored)
            output = run.spec.build_output(run.job, run.request, outcome, files)
        except LeaseLost:
            raise
        except Exception as exc:  # storing or building the output failed
            self._delete_files(stored)
            return _Verdict("error", error=self._classify(run, exc))
        # Metrics first: once the job reads COMPLETED, /metrics already counts it.
        metrics.observe_result(outcome, getattr(run.request, "output_format", "png"))
        return _Verdict("ok", output=output)

    def _patiently(self, what: str, call: Callable[[], T], *, retry: tuple[type[Exception], ...],
                   final: tuple[type[Exception], ...] = ()) -> T:
        """`call()`, retried with backoff (0.5 s doubling to 8 s) while it raises one of `retry` (and
        none of `final`), for up to PATIENCE seconds and unless shutting down: a finished request's
        outcome or images are not lost to a store or storage restarting. The monitor keeps the lease
        alive meanwhile; past PATIENCE the error stands (the sweeper takes back a job never completed)."""
        deadline = time.monotonic() + PATIENCE
        delay = 0.5
        while True:
            try:
                return call()
            except final:
                raise
            except retry as exc:
                if time.monotonic() + delay > deadline or self.abort.is_set():
                    raise
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _commit(self, run: _Run, verdict: _Verdict, stored: list[str]) -> Optional[Job]:
        lease = run.lease
        if verdict.kind == "ok":
            assert verdict.output is not None
            done = self.store.complete_ok(lease, verdict.output)
            if done.error is not None:  # a cancel was recorded first: the result is not referenced
                self._delete_files(stored)
                log.info("request was cancelled before its result was recorded; result dropped")
            else:
                log.info("request completed in %.2fs", time.monotonic() - run.started)
            return done
        if verdict.kind == "error":
            assert verdict.error is not None
            error = verdict.error
            with contextlib.suppress(LeaseLost, Exception):
                self.store.append_log(run.rid, error["error"], level="ERROR", source="service", lease=lease)
            done = self.store.complete_error(lease, error)
            self.last_error = error["error"]
            metrics.observe_job_failed(error["error_type"])
            return done
        if verdict.kind == "release":
            self.store.release(lease)
            log.info("request %s released back to the queue (shutdown)", run.rid)
            return None
        log.warning("request %s: this worker's lease on attempt %d was lost; another worker owns it now",
                    run.rid, lease.attempt)
        return None

    def _classify(self, run: _Run, exc: BaseException) -> dict[str, Any]:
        error = classify_exception(exc)
        if error["error_type"] in (J.ERR_INTERNAL, J.ERR_MODEL):
            log.error("request %s failed: %s", run.rid, error["error"], exc_info=exc)
            _free_accelerator_memory()
        return error

    # ------------------------------------------------------------------ outputs
    def _public_base(self, job: Job) -> str:
        base = self.settings.public_url or job.public_base
        if not base:
            scheme = "https" if self.settings.tls else "http"
            base = f"{scheme}://{self.settings.host}:{self.settings.port}"
        return str(base).rstrip("/")

    def _store_images(self, job: Job, request: FluxKleinInput, result: GenerationResult,
                      stored: list[str]) -> list[dict[str, Any]]:
        """The output's file entries; the ids of files written are appended to `stored` as they are."""
        files: list[dict[str, Any]] = []
        sync = bool(getattr(request, "sync_mode", False))
        for k, im in enumerate(result.images):
            file_name = f"{job.request_id[:8]}-{k}.{im.extension}"
            if sync or self.storage is None:
                files.append({"url": data_uri(im.data, im.content_type), "file_name": file_name,
                              "file_size": len(im.data)})
                continue
            f = self._patiently(f"storing {file_name}",
                                functools.partial(self.storage.put, im.data, im.content_type, file_name,
                                                  owner=job.owner),
                                retry=(StorageUnavailable,))
            stored.append(f.id)
            files.append({"url": f.url(self._public_base(job)), "file_name": f.file_name, "file_size": f.size})
        return files

    def _delete_files(self, file_ids: list[str]) -> None:
        if self.storage is None:
            return
        for fid in file_ids:
            try:
                self.storage.delete(fid)
            except Exception:
                log.debug("could not delete file %s", fid, exc_info=True)


@dataclass(frozen=True)
class _Verdict:
    kind: str  # ok | error | release | lost
    output: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None


class _Run:
    """One claimed job on its way through the engine: its lease, validated request, progress hooks
    and the flags that say whether (and why) it must stop."""

    def __init__(self, worker: Worker, job: Job):
        self.worker = worker
        self.job = job
        self.rid = job.request_id
        self.lease = Lease.of(job)
        self.started = time.monotonic()
        self.spec: Optional[EndpointSpec] = None
        self.request: Optional[FluxKleinInput] = None
        self.files: Optional[RequestFiles] = None  # its decoded input images and LoRA files
        self.finished = False
        self.cancel_seen = threading.Event()  # set by the event feed or the monitor's poll
        self.lost = False  # the store refused our lease: someone else owns the job now
        self.watched = False  # someone follows it (previews are worth making)
        self._next_heartbeat = time.monotonic() + worker.heartbeat_every
        self._next_poll = 0.0
        # Progress handed from the engine's thread to the worker's progress writer (on_step ->
        # write_progress): the latest step, the latest preview with its own step, the log lines due.
        self._progress_lock = threading.Lock()  # guards the three below
        self._pending: Optional[tuple[int, int]] = None
        self._pending_preview: Optional[tuple[int, int, Image.Image]] = None
        self._pending_logs: list[str] = []
        self._writing = threading.Lock()  # one write_progress at a time for this run
        self._written = threading.Event()  # nothing pending: every step handed over is in the store
        self._written.set()

    def prepare(self) -> bool:
        """Validates the input and logs the start; False (and the job ended) when it cannot run."""
        w = self.worker
        assert w.engine is not None
        with request_context(self.rid):
            try:
                self.spec = w.registry.get(self.job.endpoint_id)
                self.request = self.spec.validate_input(self.job.input)
                with contextlib.suppress(Exception):  # best effort: the monitor asks again
                    self.watched = w.store.is_watched(self.rid)
                self.files = w.inputs.resolve(
                    self.request, public_base=w._public_base(self.job),
                    log=lambda line: w.store.append_log(self.rid, line, source="service", lease=self.lease))
                info = w.engine.info
                note = " (TINY RANDOM MODEL)" if info.is_tiny else ""
                w.store.append_log(self.rid, f"Generating with {info.source}{note}, attempt {self.job.attempts}",
                                   source="service", lease=self.lease)
            except LeaseLost:
                self.lost = True
                w._finish(self, GenerationCancelled("lost"))
                return False
            except Exception as exc:
                w._finish(self, exc)
                return False
        return True

    def restart(self, why: str) -> None:
        """Before running this job again on its own: its run-time limit starts over."""
        self.started = time.monotonic()
        with contextlib.suppress(Exception):
            self.worker.store.append_log(self.rid, f"Restarting: {why}", level="WARNING", source="service",
                                         lease=self.lease)

    # --------------------------------------------------------------- asked by the engine (pure)
    def stop_reason(self) -> Optional[str]:
        """Why this run must stop now, or None: shutdown | lost | timeout | cancel."""
        w = self.worker
        if w.abort.is_set():
            return "shutdown"
        if self.lost:
            return "lost"
        if w.max_run_seconds and time.monotonic() - self.started > w.max_run_seconds:
            return "timeout"
        if self.cancel_seen.is_set():
            return "cancel"
        return None

    def should_cancel(self) -> bool:
        return self.stop_reason() is not None

    def wants_preview(self) -> bool:
        return self.watched

    # --------------------------------------------------------------- the monitor's pass
    def monitor(self, now: float) -> None:
        """On the worker's monitor thread: extends the lease, reads whether someone watches, polls
        the cancel flag (the event feed normally brings it first)."""
        store = self.worker.store
        if self.finished:
            return
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.worker.heartbeat_every
            try:
                store.heartbeat(self.lease, self.worker.lease_seconds)
            except LeaseLost as exc:
                log.warning("%s: stopping it", exc)
                self.lost = True
            except Exception:
                log.warning("heartbeat of %s failed; retrying", self.rid, exc_info=True)
        if now >= self._next_poll:
            self._next_poll = now + 0.5
            try:
                self.watched = store.is_watched(self.rid)
                if store.is_cancel_requested(self.rid):
                    self.cancel_seen.set()
            except Exception:
                log.debug("could not read the watch/cancel state of %s", self.rid, exc_info=True)

    # --------------------------------------------------------------- progress
    def on_step(self, ev: StepEvent) -> None:
        """On the engine's thread: hands the step to the progress writer and returns at once. When the
        store is slower than the steps, the writer skips to the latest step (and the latest preview,
        stored with its own step); the "step i/N" log lines at each quarter are all written, in order."""
        step, total = int(ev.step), int(ev.total)
        with self._progress_lock:
            self._pending = (step, total)
            if ev.preview is not None:
                self._pending_preview = (step, total, ev.preview)
            if (step * PROGRESS_LOG_LINES) // total != ((step - 1) * PROGRESS_LOG_LINES) // total:
                # A few lines for the humans reading the logs (fal's clients print them); the typed
                # progress is what the streams and the playground use.
                self._pending_logs.append(f"step {step}/{total}")
            self._written.clear()
        self.worker._progress.wake()
        metrics.observe_step()

    def write_progress(self, timeout: float = -1) -> None:
        """On the progress writer's thread: stores what on_step handed over (fenced by the lease).
        `timeout`: how long to wait for a write of this run already under way (-1: as long as it takes)."""
        if not self._writing.acquire(timeout=timeout):
            return
        try:
            with self._progress_lock:
                latest, self._pending = self._pending, None
                shown, self._pending_preview = self._pending_preview, None
                lines, self._pending_logs = self._pending_logs, []
            store = self.worker.store
            try:
                if shown is not None:
                    try:
                        preview: Optional[str] = preview_data_uri(shown[2], max_side=256)
                    except Exception:
                        log.debug("preview encoding failed", exc_info=True)
                        preview = None
                    store.record_progress(self.lease, shown[0], shown[1], preview)
                if latest is not None and (shown is None or latest[0] > shown[0]):
                    store.record_progress(self.lease, latest[0], latest[1])
            except LeaseLost:
                raise
            except Exception:  # progress is best effort: the next step's write brings it up to date
                log.warning("could not record the progress of %s", self.rid, exc_info=True)
            for i, line in enumerate(lines):
                try:
                    store.append_log(self.rid, line, lease=self.lease)
                except LeaseLost:
                    raise
                except Exception:  # kept, in order, for the next pass
                    log.warning("could not store a log line of %s; retrying", self.rid, exc_info=True)
                    with self._progress_lock:
                        self._pending_logs[:0] = lines[i:]
                    break
        except LeaseLost as exc:
            if not self.finished:
                log.warning("%s: stopping it", exc)
                self.lost = True
            with self._progress_lock:  # fenced: nothing more of this run can be written
                self._pending, self._pending_preview, self._pending_logs = None, None, []
        finally:
            with self._progress_lock:
                if self._pending is None and self._pending_preview is None and not self._pending_logs:
                    self._written.set()
            self._writing.release()

    def finish_progress(self) -> None:
        """Before the outcome is committed: waits until the progress handed over is written, so the
        job's last steps and log lines come before its result. Not when the run is released or lost
        (what it wrote no longer matters), and not past the worker's progress deadline: a store that
        stalls delays each batch by at most PROGRESS_FLUSH_SECONDS in all; a later write is then
        refused by the lease."""
        w = self.worker
        if self.lost or w.abort.is_set() or self._written.is_set():
            return
        if not w.progress_running:  # a worker driven by hand (never started): write it here
            self.write_progress(timeout=PROGRESS_FLUSH_SECONDS)
            return
        w._progress.wake()
        if not self._written.wait(max(0.0, w.progress_deadline() - time.monotonic())):
            log.warning("the progress of %s is not written yet (the store is slow?): recording its outcome",
                        self.rid)


# ------------------------------------------------------------------------------ maintenance

class Maintenance:
    """Background upkeep, safe to run in every process: deadline expiry (every `expire_every`), the
    lease sweeper (every `recover_every`), purge (every `purge_every`)."""

    def __init__(self, store: JobStore, *, settings: Settings, storage: Optional[FileStorage] = None,
                 expire_every: float = 0.25, recover_every: float = 5.0, purge_every: float = 3600.0):
        self.store = store
        self.settings = settings
        self.storage = storage
        self.purge_every = purge_every
        self.max_attempts = int(settings.max_attempts)
        # A lease that expired is noticed within a quarter of the lease (and at most 5 s late).
        self.recover_every = min(recover_every, max(0.5, float(settings.worker_stale_after) / 4))
        self.retention = float(settings.result_retention or 0)
        self._next_recover = time.monotonic() + self.recover_every
        self._next_purge = time.monotonic() + 5.0
        self._loop = Loop("maintenance", self._pass, interval=expire_every)

    def recover_now(self) -> list[Job]:
        changed = self.store.recover(max_attempts=self.max_attempts, is_worker_alive=is_worker_alive)
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

    def start(self) -> Maintenance:
        self._loop.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.stop(timeout)

    def _pass(self) -> None:
        for j in self.store.expire_due():
            log.info("request %s expired in the queue (X-Fal-Request-Timeout)", j.request_id)
            metrics.observe_job_failed(J.ERR_TIMEOUT)
        now = time.monotonic()
        if now >= self._next_recover:
            self._next_recover = now + self.recover_every
            self.recover_now()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_every
            self.purge_now()


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
