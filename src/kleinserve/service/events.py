"""Per-request event fan-out for the SSE routes (status stream, /stream, and the sync run's wait).

Two sources, one consumer API (`watch`):
- in-process pub/sub (`EventHub`): the store's listener publishes every committed change of a job
  ("status" events carrying the Job), the worker publishes "step" events (step, total, and a small
  preview data URI every few steps). Publishers may be any thread; subscribers are asyncio tasks.
- store polling: `watch` re-reads the job from the store at least every `poll_interval` seconds and
  turns new "step i/N" log lines into step events, so a job run by a worker in ANOTHER process (a
  later multi-worker deployment) is followed just the same, only without previews.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from starlette.concurrency import run_in_threadpool

from .jobs import Job
from .store import JobStore

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step (\d+)/(\d+)$")


class Subscription:
    def __init__(self, hub: "EventHub", request_id: str, loop: asyncio.AbstractEventLoop, maxsize: int):
        self.hub = hub
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def _put(self, event: dict[str, Any]) -> None:  # runs on the subscriber's loop
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Keep the stream moving: drop the oldest event (a step/preview; status is re-read anyway).
            try:
                self.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self.dropped += 1
            self.queue.put_nowait(event)

    async def get(self, timeout: float) -> Optional[dict[str, Any]]:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    def __init__(self, queue_size: int = 256):
        self._subs: dict[str, set[Subscription]] = {}
        self._lock = threading.Lock()
        self._queue_size = queue_size

    def subscribe(self, request_id: str) -> Subscription:
        """Must be called from a running event loop."""
        sub = Subscription(self, request_id, asyncio.get_running_loop(), self._queue_size)
        with self._lock:
            self._subs.setdefault(request_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.request_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.request_id]

    def subscriber_count(self, request_id: str) -> int:
        with self._lock:
            return len(self._subs.get(request_id, ()))

    def publish(self, request_id: str, event: dict[str, Any]) -> None:
        """Thread-safe; never blocks; never raises."""
        with self._lock:
            subs = list(self._subs.get(request_id, ()))
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._put, event)
            except RuntimeError:  # loop closed
                self.unsubscribe(sub)

    def store_listener(self, job: Job, event: str) -> None:
        """Register with `store.add_listener(hub.store_listener)`."""
        self.publish(job.request_id, {"type": "status", "event": event, "job": job})


@dataclass
class WatchEvent:
    kind: str  # "status" (job: the current Job) | "step" (data: {step, total, preview?})
    job: Optional[Job] = None
    data: Optional[dict[str, Any]] = None
    position: Optional[int] = None  # a status event's queue position (None unless queued)


async def watch(
    store: JobStore,
    hub: Optional[EventHub],
    request_id: str,
    owner: Optional[str] = None,
    *,
    poll_interval: float = 0.5,
    with_logs: bool = False,
    steps: bool = True,
    subscription: Optional[Subscription] = None,
) -> AsyncIterator[WatchEvent]:
    """Yields the job's current state first, then every change (status, queue position, new logs when
    `with_logs`) and, when `steps`, step events; ends right after yielding the COMPLETED job.
    `subscription`: one opened earlier (e.g. before submitting, so no event can be missed)."""
    sub = subscription if subscription is not None else (hub.subscribe(request_id) if hub else None)
    last_sig: Any = None
    last_step = 0
    log_count = 0
    logs: list[dict[str, Any]] = []
    try:
        while True:
            job = await run_in_threadpool(store.get, request_id, owner)
            position = await run_in_threadpool(store.queue_position, request_id) if job.status == "IN_QUEUE" else None
            new_logs = await run_in_threadpool(store.get_logs, request_id, log_count)
            if new_logs:
                log_count += len(new_logs)
                if with_logs:
                    logs.extend(new_logs)
                if steps:  # the polling fallback for steps published by another process
                    for line in new_logs:
                        m = STEP_RE.match(str(line.get("message", "")))
                        if m and int(m.group(1)) > last_step:
                            last_step = int(m.group(1))
                            yield WatchEvent("step", data={"step": last_step, "total": int(m.group(2))})
            job.logs = list(logs) if with_logs else []
            sig = (job.status, position, log_count if with_logs else 0, job.cancel_requested)
            if sig != last_sig:
                last_sig = sig
                yield WatchEvent("status", job=job, position=position)
            if job.is_terminal:
                return
            # wait for something to happen (or the poll interval)
            deadline = time.monotonic() + poll_interval
            while True:
                remaining = deadline - time.monotonic()
                if sub is None:
                    await asyncio.sleep(max(0.0, remaining))
                    break
                ev = await sub.get(max(0.0, remaining))
                if ev is None:
                    break
                if ev.get("type") == "step":
                    step = int(ev.get("step", 0))
                    if steps and step > last_step:
                        last_step = step
                        yield WatchEvent("step", data={k: v for k, v in ev.items() if k != "type"})
                    elif steps and ev.get("preview") and step == last_step:
                        yield WatchEvent("step", data={k: v for k, v in ev.items() if k != "type"})
                    continue
                break  # a status change: re-read the job
    finally:
        if sub is not None:
            sub.close()
