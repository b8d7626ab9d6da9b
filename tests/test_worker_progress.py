"""The worker writes progress on a thread of its own: a store that is slow to take a step's progress
never holds up the denoising loop. The store is the real SQLite store; only its `record_progress` is
made to stall (as a database under a long lock or a failover would) until the test lets it go."""

from __future__ import annotations

import threading
import time

from kleinserve.endpoints import default_registry
from kleinserve.schema import ENDPOINT_ID, FluxKleinInput
from kleinserve.service import jobs as J
from kleinserve.service import metrics
from kleinserve.service.jobs import Job
from kleinserve.service.settings import Settings
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.worker import Worker


class StalledProgressStore(SQLiteJobStore):
    """Its first `record_progress` blocks until `go` is set."""

    entered: threading.Event
    go: threading.Event

    def record_progress(self, lease, step, total, preview=None):
        if not self.entered.is_set():
            self.entered.set()
            assert self.go.wait(60), "the test never released the store"
        return super().record_progress(lease, step, total, preview)


def steps_run() -> float:
    return metrics.REGISTRY.get_sample_value("kleinserve_denoising_steps_total") or 0.0


def test_a_stalled_progress_write_does_not_stop_the_steps_and_no_log_line_is_lost(tmp_path, tiny_engine):
    store = StalledProgressStore.in_data_dir(tmp_path)
    store.entered, store.go = threading.Event(), threading.Event()
    settings = Settings(preview_every=0)
    data = FluxKleinInput(prompt="a lighthouse", image_size={"width": 64, "height": 64}, num_inference_steps=8,
                          enable_safety_checker=False).model_dump(mode="json")
    rid = store.submit(Job(request_id=J.new_request_id(), endpoint_id=ENDPOINT_ID, owner="k", input=data)).request_id
    steps_before = steps_run()
    worker = Worker(store, tiny_engine, registry=default_registry(), settings=settings, idle_poll=0.05)
    worker.start()
    try:
        assert store.entered.wait(120), "no progress was written"
        # The first step's write is stuck in the store; the engine goes on to the last step meanwhile.
        deadline = time.monotonic() + 60
        while steps_run() < steps_before + 8:
            assert time.monotonic() < deadline, f"the steps stopped while the store was stalled: {steps_run()}"
            time.sleep(0.02)
        assert store.get(rid).status == J.IN_PROGRESS  # its outcome waits for its progress to be written
        store.go.set()
        deadline = time.monotonic() + 60
        while (job := store.get(rid, with_logs=True)).status != J.COMPLETED:
            assert time.monotonic() < deadline, "the request did not complete once the store recovered"
            time.sleep(0.05)
    finally:
        store.go.set()
        worker.stop()
        store.close()
    assert job.succeeded, job.error
    assert job.progress_step == 8
    # the steps in between were skipped in the store's progress, but every quarter's log line is there, in order
    assert [line["message"] for line in job.logs if line["message"].startswith("step ")] == \
        ["step 2/8", "step 4/8", "step 6/8", "step 8/8"]


def test_a_store_that_stays_stalled_delays_the_outcome_by_the_flush_deadline_only(tmp_path, tiny_engine, monkeypatch):
    from kleinserve.service import worker as worker_module

    monkeypatch.setattr(worker_module, "PROGRESS_FLUSH_SECONDS", 0.5)
    store = StalledProgressStore.in_data_dir(tmp_path)
    store.entered, store.go = threading.Event(), threading.Event()
    data = FluxKleinInput(prompt="a lighthouse", image_size={"width": 64, "height": 64}, num_inference_steps=8,
                          enable_safety_checker=False).model_dump(mode="json")
    rid = store.submit(Job(request_id=J.new_request_id(), endpoint_id=ENDPOINT_ID, owner="k", input=data)).request_id
    worker = Worker(store, tiny_engine, registry=default_registry(), settings=Settings(preview_every=0),
                    idle_poll=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while (job := store.get(rid)).status != J.COMPLETED:  # while the progress write is still stuck
            assert time.monotonic() < deadline, "the outcome waited for a stalled progress write"
            time.sleep(0.05)
        assert store.entered.is_set() and not store.go.is_set()
        assert job.succeeded, job.error
    finally:
        store.go.set()  # the stuck write goes on now: the lease refuses it, nothing changes
        worker.stop()
    assert store.get(rid).succeeded
    store.close()
