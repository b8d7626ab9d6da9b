"""One start/stop lifecycle for the service's background threads (worker, its monitor, maintenance,
the event feed, the webhook dispatcher).

A `Loop` runs `body()` every `interval` seconds (or sooner after `wake()`) on a daemon thread until
`stop()`. A body that raises is logged and the loop goes on: a background part never dies of one
bad pass (a store that is briefly unreachable, say). The first failure is logged with its traceback;
while the same failure repeats, one line every `quiet_for` seconds; and one line when it recovers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Optional

log = logging.getLogger(__name__)


class Loop:
    def __init__(self, name: str, body: Callable[[], object], *, interval: float,
                 error_backoff: float = 1.0, quiet_for: float = 30.0):
        self.name = name
        self.quiet_for = quiet_for
        self._failing: Optional[str] = None  # the repeating failure, while it repeats
        self._failures = 0
        self._next_report = 0.0
        self.body = body
        self.interval = interval
        self.error_backoff = error_backoff
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> Loop:
        if self._thread is None:
            self.stopping.clear()
            self._thread = threading.Thread(target=self._run, name=f"kleinserve-{self.name}", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Asks the loop to stop and waits up to `timeout`; False when it is still running then."""
        self.stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s did not stop within %.0fs", self.name, timeout)
            return False
        return True

    def _report(self, exc: Exception) -> None:
        what = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        now = time.monotonic()
        self._failures += 1
        if self._failing is None:
            log.exception("%s: pass failed; retrying", self.name)
            self._next_report = now + self.quiet_for
        elif now >= self._next_report:
            log.warning("%s: still failing (%d passes so far): %s; retrying", self.name, self._failures, what)
            self._next_report = now + self.quiet_for
        self._failing = what

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self.stopping.is_set():
            wait = self.interval
            try:
                self.body()
            except Exception as exc:
                self._report(exc)
                wait = max(wait, self.error_backoff)
            else:
                if self._failing is not None:
                    log.warning("%s: recovered after %d failed pass(es)", self.name, self._failures)
                    self._failing, self._failures = None, 0
            if self.stopping.is_set():
                break
            self._wake.wait(wait)
            self._wake.clear()
