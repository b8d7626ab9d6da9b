"""Prometheus metrics: the metric objects and the small functions the service calls to update them.

Everything lives in one `CollectorRegistry` of our own (`REGISTRY`), so several apps built in one
process (tests) share the counters without clashing with prometheus-client's global registry. The
names all start with `kleinserve_`. `GET /metrics` (api/metrics.py) renders `render()`.

Callers never touch the metric objects directly; they call the `observe_*` / `record_*` functions, so
the label sets stay consistent and this module stays the one place to read what is measured:

    record_http_request(endpoint, method, status, seconds)   # the HTTP middleware
    observe_job_submitted(endpoint_id, priority)             # submit (queue, run, stream, openai)
    observe_job_started(wait_seconds)                        # the worker claimed a job
    observe_batch(requests)                                  # the worker started an engine run
    observe_job_completed(timings, images, nsfw, ...)        # the worker finished a generation
    observe_job_failed(error_type)                           # failed / cancelled / timed out
    observe_model_loaded(info)                               # after load_engine
    set_queue_depth_source(fn)                               # fn() -> {"IN_QUEUE": n, ...}

GPU memory is read at scrape time from torch when (and only when) torch is already imported and CUDA
is available: this module never imports torch itself.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

disable_created_metrics()  # the *_created series only add noise to a scrape

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Buckets: HTTP calls are mostly milliseconds; a generation is seconds to minutes.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

STAGES = ("encode", "denoise", "decode", "safety", "total")

HTTP_REQUESTS = Counter(
    "kleinserve_http_requests",
    "HTTP requests by endpoint (route template), method and status code.",
    ("endpoint", "method", "status"),
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "kleinserve_http_request_duration_seconds",
    "Time from the request to the end of its response (for SSE streams and sync runs: the whole wait).",
    ("endpoint", "method"),
    buckets=_HTTP_BUCKETS,
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "kleinserve_jobs_submitted",
    "Generation requests accepted, by endpoint id and queue priority.",
    ("endpoint_id", "priority"),
    registry=REGISTRY,
)
JOBS_COMPLETED = Counter(
    "kleinserve_jobs_completed",
    "Generation requests finished, by outcome (ok | error) and error type (empty when ok).",
    ("outcome", "error_type"),
    registry=REGISTRY,
)
JOBS_IN_PROGRESS = Gauge(
    "kleinserve_jobs_in_progress",
    "Generations running now.",
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "kleinserve_queue_wait_seconds",
    "Time a request waited in the queue before a worker started it.",
    buckets=_LONG_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_TIME = Histogram(
    "kleinserve_inference_seconds",
    "Inference time per stage (encode, denoise, decode, safety, total) of completed generations.",
    ("stage",),
    buckets=_LONG_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "kleinserve_batch_requests",
    "Requests per engine run (1: alone; more when --batch-images lets queued requests share forwards).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
    registry=REGISTRY,
)
STEPS = Counter(
    "kleinserve_denoising_steps",
    "Denoising steps run.",
    registry=REGISTRY,
)
IMAGES_GENERATED = Counter(
    "kleinserve_images_generated",
    "Images generated, by output format.",
    ("format",),
    registry=REGISTRY,
)
NSFW_FLAGS = Counter(
    "kleinserve_nsfw_flags",
    "Images the safety checker flagged (and replaced by black images).",
    registry=REGISTRY,
)
ERRORS = Counter(
    "kleinserve_errors",
    "Errors by type (validation, auth, cancelled, timeout, internal, model, crashed, webhook, ...).",
    ("type",),
    registry=REGISTRY,
)
SUBMITS_REFUSED = Counter(
    "kleinserve_submits_refused",
    "Submits answered 429 by a backpressure limit (max_queue_depth | max_queued_per_key).",
    ("limit",),
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "kleinserve_model_load_seconds",
    "Seconds the loaded model took to load.",
    registry=REGISTRY,
)
MODEL_INFO = Gauge(
    "kleinserve_model_info",
    "The loaded model (value 1; the labels say which).",
    ("spec", "source", "device", "dtype", "is_tiny"),
    registry=REGISTRY,
)

# Pre-create the label sets that always exist, so they show up (at 0) before the first event.
for _stage in STAGES:
    INFERENCE_TIME.labels(stage=_stage)
for _fmt in ("png", "jpeg", "webp"):
    IMAGES_GENERATED.labels(format=_fmt)
for _limit in ("max_queue_depth", "max_queued_per_key"):
    SUBMITS_REFUSED.labels(limit=_limit)


# ---------------------------------------------------------------------------------------------------
# Update functions (what the service and the API call)
# ---------------------------------------------------------------------------------------------------

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def record_http_request(endpoint: str, method: str, status: int | str, seconds: float) -> None:
    """One HTTP response. `endpoint` is the route template (`/queue/{owner}/...`), never the raw path;
    a method outside HTTP's own is counted as "OTHER" (any token is a valid method on the wire: each
    would otherwise be a new label set, kept for the life of the process)."""
    method = method if method in _HTTP_METHODS else "OTHER"
    HTTP_REQUESTS.labels(endpoint=endpoint, method=method, status=str(status)).inc()
    HTTP_DURATION.labels(endpoint=endpoint, method=method).observe(max(0.0, float(seconds)))
    status_i = _int_or_none(status)
    if status_i in (401, 403):
        record_error("auth")
    elif status_i in (400, 422):
        record_error("validation")


def observe_submit_refused(limit: str) -> None:
    """A submit refused with 429 by `limit` (max_queue_depth | max_queued_per_key)."""
    SUBMITS_REFUSED.labels(limit=limit).inc()


def observe_job_submitted(endpoint_id: str = "", priority: str = "normal") -> None:
    JOBS_SUBMITTED.labels(endpoint_id=endpoint_id or "", priority=priority or "normal").inc()


def observe_job_started(wait_seconds: Optional[float] = None) -> None:
    """The worker started a job that waited `wait_seconds` in the queue."""
    JOBS_IN_PROGRESS.inc()
    if wait_seconds is not None:
        QUEUE_WAIT.observe(max(0.0, float(wait_seconds)))


def observe_batch(requests: int) -> None:
    """The worker started one engine run for `requests` jobs."""
    BATCH_SIZE.observe(requests)


def observe_job_finished_running() -> None:
    """The running job left the worker (whatever the outcome). Pairs with `observe_job_started`."""
    JOBS_IN_PROGRESS.dec()


def observe_step(n: int = 1) -> None:
    STEPS.inc(n)


def observe_job_completed(
    timings: Optional[Mapping[str, Any]] = None,
    *,
    num_images: int = 0,
    nsfw_flags: Iterable[bool] | int = (),
    output_format: str = "png",
) -> None:
    """A generation finished successfully: inference time per stage, images, NSFW flags."""
    JOBS_COMPLETED.labels(outcome="ok", error_type="").inc()
    for stage, value in (timings or {}).items():
        seconds = _float_or_none(value)
        if seconds is None or seconds < 0:
            continue
        INFERENCE_TIME.labels(stage=str(stage)).observe(seconds)
    if num_images:
        IMAGES_GENERATED.labels(format=(output_format or "png").lower()).inc(num_images)
    flagged = nsfw_flags if isinstance(nsfw_flags, int) else sum(1 for f in nsfw_flags if f)
    if flagged:
        NSFW_FLAGS.inc(flagged)


def observe_result(result: Any, output_format: str = "png") -> None:
    """`observe_job_completed` from an engine `GenerationResult` (duck-typed: images, timings)."""
    images = list(getattr(result, "images", []) or [])
    observe_job_completed(
        getattr(result, "timings", None) or {},
        num_images=len(images),
        nsfw_flags=[bool(getattr(im, "nsfw", False)) for im in images],
        output_format=(getattr(images[0], "extension", None) if images else None) or output_format,
    )


def observe_job_failed(error_type: str) -> None:
    """A generation ended without a result: cancelled, timeout, internal, model, crashed, validation."""
    error_type = error_type or "internal"
    JOBS_COMPLETED.labels(outcome="error", error_type=error_type).inc()
    record_error(error_type)


def record_error(error_type: str) -> None:
    ERRORS.labels(type=error_type or "internal").inc()


def observe_model_loaded(info: Any) -> None:
    """After `load_engine`: `info` is an `engine.types.ModelInfo` (duck-typed)."""
    MODEL_LOAD_SECONDS.set(float(getattr(info, "load_seconds", 0.0) or 0.0))
    MODEL_INFO.clear()
    MODEL_INFO.labels(
        spec=str(getattr(info, "spec", "")),
        source=str(getattr(info, "source", "")),
        device=str(getattr(info, "device", "")),
        dtype=str(getattr(info, "dtype", "")),
        is_tiny=str(bool(getattr(info, "is_tiny", False))).lower(),
    ).set(1)


# ---------------------------------------------------------------------------------------------------
# Scrape-time collectors: queue depth (from the store) and GPU memory (from torch, when on CUDA)
# ---------------------------------------------------------------------------------------------------

_queue_depth_source: Optional[Callable[[], Any]] = None
_source_lock = threading.Lock()


def set_queue_depth_source(fn: Optional[Callable[[], Any]]) -> None:
    """Register how to read the queue depth at scrape time.

    `fn()` returns either an int (jobs waiting) or a mapping status -> count (e.g.
    {"IN_QUEUE": 3, "IN_PROGRESS": 1}). The last app created wins (one server per process).
    """
    global _queue_depth_source
    with _source_lock:
        _queue_depth_source = fn


class _QueueDepthCollector(Collector):
    def collect(self):
        g = GaugeMetricFamily("kleinserve_queue_depth", "Requests by queue status right now.",
                              labels=["status"])
        fn = _queue_depth_source
        counts: dict[str, float] = {"IN_QUEUE": 0.0, "IN_PROGRESS": 0.0}
        if fn is not None:
            try:
                value = fn()
                if isinstance(value, Mapping):
                    for k, v in value.items():
                        counts[str(k)] = float(v)
                elif value is not None:
                    counts["IN_QUEUE"] = float(value)
            except Exception:  # a scrape must never fail because the store is busy
                log.debug("queue depth source failed", exc_info=True)
        for status, v in counts.items():
            g.add_metric([status], v)
        yield g

    def describe(self):
        return [GaugeMetricFamily("kleinserve_queue_depth", "Requests by queue status right now.",
                                  labels=["status"])]


class _GpuMemoryCollector(Collector):
    def collect(self):
        torch = sys.modules.get("torch")  # never import torch here: only report when it is loaded
        if torch is None:
            return
        try:
            if not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return
            allocated = GaugeMetricFamily("kleinserve_gpu_memory_allocated_bytes",
                                          "CUDA memory held by tensors.", labels=["device"])
            reserved = GaugeMetricFamily("kleinserve_gpu_memory_reserved_bytes",
                                         "CUDA memory reserved by the caching allocator.", labels=["device"])
            peak = GaugeMetricFamily("kleinserve_gpu_memory_max_allocated_bytes",
                                     "Peak CUDA memory held by tensors since start.", labels=["device"])
            total = GaugeMetricFamily("kleinserve_gpu_memory_total_bytes",
                                      "Total memory of the device.", labels=["device"])
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                allocated.add_metric([dev], float(torch.cuda.memory_allocated(i)))
                reserved.add_metric([dev], float(torch.cuda.memory_reserved(i)))
                peak.add_metric([dev], float(torch.cuda.max_memory_allocated(i)))
                total.add_metric([dev], float(torch.cuda.get_device_properties(i).total_memory))
            yield allocated
            yield reserved
            yield peak
            yield total
        except Exception:
            log.debug("GPU memory metrics unavailable", exc_info=True)

    def describe(self):
        return []


REGISTRY.register(_QueueDepthCollector())
REGISTRY.register(_GpuMemoryCollector())


def render() -> bytes:
    """The Prometheus text exposition of every kleinserve metric."""
    return generate_latest(REGISTRY)


def _float_or_none(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _int_or_none(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
