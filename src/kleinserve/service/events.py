"""Cross-process events: the store's event log, fanned out inside one process.

Every committed change of a job appends a typed `JobEvent` to the store's event log (status changes,
and progress as step/total from the worker's `record_progress`). One `EventFeed` per process reads
that log (`store.wait_events`: SQLite polls its table, PostgreSQL is woken by LISTEN/NOTIFY) and hands
each event to
- this process's subscribers: SSE streams and waiting sync runs (asyncio queues, one per client), and
- listeners: the worker's wake-up on new work and its cancel notices.

So a client connected to any API replica follows a job run by a worker on any host. While a request
has a subscriber here, the feed keeps a watch on it in the store; workers make previews only for
watched requests, and the preview itself travels through the store (`get_preview`), never the log.

`watch()` turns a request's events into what the routes send: its current state first, then each
status change (re-read from the store, which stays the truth; it also polls, so a missed event only
costs latency) and each progress step, until the job is COMPLETED.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Optional

from starlette.concurrency import run_in_threadpool

from . import jobs as J
from .jobs import Job
from .lifecycle import Loop
from .store import EV_LOG, EV_PROGRESS, EV_STATUS, WATCH_TTL_SECONDS, JobEvent, JobStore

log = logging.getLogger(__name__)

EventListener = Callable[[JobEvent], None]


class Subscription:
    """One client's view of one request's events (an asyncio queue on the client's loop)."""

    def __init__(self, feed: EventFeed, request_id: str, loop: asyncio.AbstractEventLoop, maxsize: int):
        self.feed = feed
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def _put(self, event: JobEvent) -> None:  # runs on the subscriber's loop
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Keep the stream moving: drop the oldest event (progress; the status is re-read anyway).
            try:
                self.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self.dropped += 1
            self.queue.put_nowait(event)

    async def get(self, timeout: float) -> Optional[JobEvent]:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        self.feed.unsubscribe(self)


class EventFeed:
    """Reads the store's event log on one thread and fans events out in this process."""

    def __init__(self, store: JobStore, watcher_id: str, *, wait_timeout: float = 0.25,
                 queue_size: int = 256, watch_ttl: float = WATCH_TTL_SECONDS):
        self.store = store
        self.watcher_id = watcher_id
        self.wait_timeout = wait_timeout
        self.watch_ttl = watch_ttl
        self._queue_size = queue_size
        self._subs: dict[str, set[Subscription]] = {}
        self._listeners: list[EventListener] = []
        self._lock = threading.Lock()
        self._cursor: Optional[int] = None
        self._watch_due = 0.0  # monotonic time of the next refresh of our watches
        self._unwatch: set[str] = set()
        self._loop = Loop("event-feed", self._pass, interval=0.0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EventFeed:
        if self._cursor is None:
            self._cursor = self.store.last_event_seq()
        self._loop.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.stop(timeout)

    @property
    def alive(self) -> bool:
        return self._loop.alive

    # ------------------------------------------------------------------ subscribers and listeners
    def subscribe(self, request_id: str) -> Subscription:
        """Must be called from a running event loop. The request counts as watched from the feed's
        next pass on (within `wait_timeout`)."""
        sub = Subscription(self, request_id, asyncio.get_running_loop(), self._queue_size)
        with self._lock:
            self._subs.setdefault(request_id, set()).add(sub)
            self._unwatch.discard(request_id)
            self._watch_due = 0.0
        return sub

    async def follow(self, request_id: str) -> Subscription:
        """`subscribe`, with the watch recorded in the store before it returns (so a worker that
        claims the request next already knows someone follows it and makes previews)."""
        sub = self.subscribe(request_id)
        try:
            await run_in_threadpool(self.store.watch, request_id, self.watcher_id, self.watch_ttl)
        except Exception:  # the feed's next pass records it
            log.debug("could not record the watch of %s", request_id, exc_info=True)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.request_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.request_id]
                    self._unwatch.add(sub.request_id)

    def subscriber_count(self, request_id: str) -> int:
        with self._lock:
            return len(self._subs.get(request_id, ()))

    def add_listener(self, fn: EventListener) -> None:
        """`fn(event)` runs on the feed's thread for every event: keep it quick."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: EventListener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # ------------------------------------------------------------------ the loop
    def _pass(self) -> None:
        self._refresh_watches()
        assert self._cursor is not None
        events = self.store.wait_events(self._cursor, self.wait_timeout)
        for ev in events:
            self._cursor = max(self._cursor, ev.seq)
            self._dispatch(ev)

    def _dispatch(self, ev: JobEvent) -> None:
        with self._lock:
            subs = list(self._subs.get(ev.request_id, ()))
            listeners = list(self._listeners)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._put, ev)
            except RuntimeError:  # its loop is closed
                self.unsubscribe(sub)
        for fn in listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed")

    def _refresh_watches(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone, self._unwatch = self._unwatch, set()
            due = now >= self._watch_due
            watched = list(self._subs) if due else []
            if due:
                self._watch_due = now + self.watch_ttl / 3
        for rid in gone:
            self.store.unwatch(rid, self.watcher_id)
        for rid in watched:
            self.store.watch(rid, self.watcher_id, self.watch_ttl)


# ------------------------------------------------------------------------------ what routes consume

@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    preview: Optional[str] = None  # a data URI, when one was made for this step


@dataclass
class WatchEvent:
    kind: str  # "status" (job: the current Job, position) | "progress" (progress)
    job: Optional[Job] = None
    position: Optional[int] = None  # a status event's queue position (None unless queued)
    progress: Optional[Progress] = None


async def watch(
    store: JobStore,
    feed: EventFeed,
    request_id: str,
    owner: Optional[str] = None,
    *,
    poll_interval: float = 0.5,
    with_logs: bool = False,
    steps: bool = True,
    subscription: Optional[Subscription] = None,
) -> AsyncIterator[WatchEvent]:
    """Yields the job's current state first, then every change (status, queue position, new logs when
    `with_logs`) and, when `steps`, its progress; ends right after yielding the COMPLETED job.
    `subscription`: one opened earlier (e.g. before submitting, so no event can be missed)."""
    sub = subscription if subscription is not None else await feed.follow(request_id)
    last_sig: object = None
    last_step = 0
    logs: list[dict] = []
    try:
        while True:
            job = await run_in_threadpool(store.get, request_id, owner)
            position = await run_in_threadpool(store.queue_position, request_id) \
                if job.status == J.IN_QUEUE else None
            if with_logs:
                logs.extend(await run_in_threadpool(store.get_logs, request_id, len(logs)))
                job.logs = list(logs)
            if steps and job.status == J.IN_PROGRESS and job.progress_step > last_step:
                # Progress made before we looked (or an event we missed): say where it is now.
                last_step = job.progress_step
                yield WatchEvent("progress", progress=Progress(job.progress_step, job.progress_total))
            sig = (job.status, position, len(logs), job.cancel_requested)
            if sig != last_sig:
                last_sig = sig
                yield WatchEvent("status", job=job, position=position)
            if job.is_terminal:
                return
            deadline = time.monotonic() + poll_interval
            while True:  # wait for a status change (or the poll interval), relaying progress
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ev = await sub.get(remaining)
                if ev is None:
                    break
                if ev.kind == EV_PROGRESS:
                    if steps and ev.step > last_step:
                        last_step = ev.step
                        preview = None
                        if ev.preview:
                            stored = await run_in_threadpool(store.get_preview, request_id)
                            preview = stored.data_uri if stored is not None and stored.step == ev.step else None
                        yield WatchEvent("progress", progress=Progress(ev.step, ev.total, preview))
                    continue
                if ev.kind == EV_STATUS or (ev.kind == EV_LOG and with_logs):
                    break  # re-read the job (and its new log lines)
    finally:
        if subscription is None:
            sub.close()
