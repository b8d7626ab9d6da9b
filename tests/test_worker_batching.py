"""The worker batching queued requests (`--batch-images`): which jobs share an engine run, that each still
gets its own images, progress and outcome, and that cancelling or a failing batch never costs the others.

The worker runs on a real SQLite store with the tiny engine; jobs are queued before it starts, so what
shares a run is decided, not raced."""

from __future__ import annotations

import base64
import io
import sqlite3
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.endpoints import default_registry
from kleinserve.schema import ENDPOINT_ID, FluxKleinInput
from kleinserve.service import jobs as J
from kleinserve.service import metrics
from kleinserve.service.jobs import Job
from kleinserve.service.settings import Settings
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.worker import Worker

BASE = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4,
        "guidance_scale": 3.0, "enable_safety_checker": False, "seed": 1}


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore.in_data_dir(tmp_path)
    yield s
    s.close()


def submit(store, **kw) -> str:
    data = FluxKleinInput(**{**BASE, **kw}).model_dump(mode="json")
    job = Job(request_id=J.new_request_id(), endpoint_id=ENDPOINT_ID, owner="k", input=data)
    return store.submit(job).request_id


def run_worker(store, engine, batch_images: int, rids: list[str], timeout: float = 120.0) -> list[Job]:
    settings = Settings(batch_images=batch_images, preview_every=0)
    worker = Worker(store, engine, registry=default_registry(), settings=settings, idle_poll=0.05).start()
    try:
        return wait_all(store, rids, timeout)
    finally:
        worker.stop()


def wait_all(store, rids, timeout=120.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get(r, with_logs=True) for r in rids]
        if all(j.status == J.COMPLETED for j in jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError("requests did not complete")


def messages(job: Job) -> list[str]:
    return [line["message"] for line in job.logs]


def batched_with(job: Job) -> int:
    """How many other requests shared this job's run (from its log)."""
    for m in messages(job):
        if m.startswith("batched with "):
            return int(m.split()[2])
    return 0


def image(job: Job) -> np.ndarray:
    url = job.result["images"][0]["url"]
    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int16)


def test_compatible_requests_share_a_run_and_keep_their_own_images(store, tiny_engine):
    a = submit(store, prompt="a red fox", seed=11)
    other_size = submit(store, image_size={"width": 96, "height": 64})
    b = submit(store, prompt="two cats", seed=22, guidance_scale=5.0)
    c = submit(store, prompt="a barn", seed=33, output_format="jpeg")
    high = submit(store, acceleration="high")  # never batched
    jobs = dict(zip([a, other_size, b, c, high], run_worker(store, tiny_engine, 4, [a, other_size, b, c, high]),
                    strict=True))
    assert all(j.succeeded for j in jobs.values()), [j.error for j in jobs.values()]
    assert [batched_with(jobs[r]) for r in (a, b, c)] == [2, 2, 2]
    assert batched_with(jobs[other_size]) == 0 and batched_with(jobs[high]) == 0
    # The size-96 request was passed over, not pushed back behind the whole queue: it ran right after.
    assert jobs[other_size].started_at <= jobs[high].started_at
    for rid in (a, b, c):
        alone = tiny_engine.generate(FluxKleinInput(**jobs[rid].input))
        expected = np.asarray(Image.open(io.BytesIO(alone.images[0].data)).convert("RGB")).astype(np.int16)
        assert np.abs(image(jobs[rid]) - expected).max() <= 2
        assert [m for m in messages(jobs[rid]) if m.startswith("step ")] == [f"step {i}/4" for i in (1, 2, 3, 4)]


def test_a_batch_holds_at_most_batch_images_images(store, tiny_engine):
    rids = [submit(store, num_images=2, seed=k) for k in range(3)]
    jobs = run_worker(store, tiny_engine, 4, rids)
    assert all(j.succeeded and len(j.result["images"]) == 2 for j in jobs)
    assert [batched_with(j) for j in jobs] == [1, 1, 0]


def test_batching_is_off_by_default(store, tiny_engine):
    rids = [submit(store, seed=k) for k in range(2)]
    jobs = run_worker(store, tiny_engine, 1, rids)
    assert all(j.succeeded for j in jobs) and [batched_with(j) for j in jobs] == [0, 0]


def test_cancelling_one_request_of_a_batch_completes_it_at_once_and_the_others_finish(store, tiny_engine):
    slow = {"image_size": {"width": 256, "height": 256}, "num_inference_steps": 40}
    rids = [submit(store, seed=k, **slow) for k in range(3)]
    running_before = metrics.JOBS_IN_PROGRESS._value.get()
    completed: list[str] = []  # on_complete (webhooks hang off it): once per job, the cancelled one first
    settings = Settings(batch_images=4, preview_every=0)
    worker = Worker(store, tiny_engine, registry=default_registry(), settings=settings, idle_poll=0.05,
                    on_complete=lambda job: completed.append(job.request_id)).start()
    try:
        deadline = time.monotonic() + 60
        while store.get(rids[1]).progress_step < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert store.request_cancel(rids[1]).outcome == "cancel_requested"
        cancelled_at = time.monotonic()
        while store.get(rids[1]).status != J.COMPLETED:
            assert time.monotonic() - cancelled_at < 30
            time.sleep(0.02)
        assert store.get(rids[0]).status == J.IN_PROGRESS  # the others are still running
        assert metrics.JOBS_IN_PROGRESS._value.get() == running_before + 2
        assert completed == [rids[1]]
        jobs = wait_all(store, rids)
    finally:
        worker.stop()
    assert sorted(completed) == sorted(rids) and completed[0] == rids[1]
    assert jobs[1].error_type == J.ERR_CANCELLED and jobs[1].finished_at < jobs[0].finished_at
    assert jobs[0].succeeded and jobs[2].succeeded
    assert [batched_with(j) for j in (jobs[0], jobs[2])] == [2, 2]


class _OutOfMemoryOnBatches:
    """The tiny engine, except that a run of several requests fails the way a GPU out of memory does."""

    def __init__(self, engine):
        self._engine = engine
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, tasks, **kw):
        self.batches.append(len(tasks))
        if len(tasks) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self._engine.generate_batch(tasks, **kw)


def test_a_failing_batch_runs_its_requests_one_by_one(store, tiny_engine):
    engine = _OutOfMemoryOnBatches(tiny_engine)
    rids = [submit(store, seed=k) for k in range(3)]
    jobs = run_worker(store, engine, 4, rids)
    assert engine.batches == [3, 1, 1, 1]
    assert all(j.succeeded for j in jobs)
    assert all(any("running it alone" in m for m in messages(j)) for j in jobs)


def test_invalid_input_fails_alone_and_the_batch_goes_on(store, tiny_engine):
    good = submit(store, seed=3)
    bad = store.submit(Job(request_id=J.new_request_id(), endpoint_id=ENDPOINT_ID, owner="k",
                           input={**FluxKleinInput(**BASE).model_dump(mode="json"), "num_images": 99})).request_id
    also_good = submit(store, seed=4)
    jobs = run_worker(store, tiny_engine, 4, [good, bad, also_good])
    assert jobs[1].error_type == J.ERR_VALIDATION and jobs[1].error["status_code"] == 422
    assert jobs[0].succeeded and jobs[2].succeeded and batched_with(jobs[0]) == 1


def test_batch_sizes_are_a_metric(store, tiny_engine):
    def runs_of(size: int) -> float:  # engine runs of at most `size` requests so far
        return metrics.REGISTRY.get_sample_value("kleinserve_batch_requests_bucket", {"le": f"{size:.1f}"})

    alone, pairs = runs_of(1), runs_of(2)
    run_worker(store, tiny_engine, 4, [submit(store, seed=k) for k in range(2)])
    assert (runs_of(1), runs_of(2)) == (alone, pairs + 1)


class _FlakyStore(SQLiteJobStore):
    """The SQLite store, except that the worker monitor's reads (cancel flag, watchers) fail as a
    locked database does."""

    failures = 0

    def is_cancel_requested(self, request_id: str) -> bool:
        self.failures += 1
        raise sqlite3.OperationalError("database is locked")

    def is_watched(self, request_id: str) -> bool:
        self.failures += 1
        raise sqlite3.OperationalError("database is locked")


def test_failing_monitor_reads_neither_fail_nor_restart_the_batch(tmp_path, tiny_engine):
    store = _FlakyStore.in_data_dir(tmp_path)
    try:
        rids = [submit(store, seed=k, num_inference_steps=12) for k in range(2)]
        jobs = run_worker(store, tiny_engine, 2, rids)
    finally:
        store.close()
    assert store.failures > 0
    for job in jobs:
        assert job.succeeded and batched_with(job) == 1
        assert not [m for m in messages(job) if m.startswith("Restarting")]
        assert [m for m in messages(job) if m.startswith("step ")] == [f"step {i}/12" for i in (3, 6, 9, 12)]
