"""The JobStore conformance suite: every test runs on SQLite and on a real PostgreSQL 15 server
(a throwaway cluster started by tests/pg_server.py; a fresh database per test).

"Two processes' view" is two store objects on the same database (SQLite: two sets of connections to
the file; PostgreSQL: two pools and two LISTEN connections); the claim and schema races use real
processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kleinserve.service import jobs as J
from kleinserve.service.jobs import Job, job_error
from kleinserve.service.store import EV_LOG, EV_PROGRESS, EV_STATUS, JobNotFound, JobStore, Lease, LeaseLost, open_store

EP = "fal-ai/flux-2/klein/9b/base"
EP2 = "fal-ai/flux-2/klein/4b/base"


def mk(owner="k_a", priority="normal", deadline=None, webhook_url=None, endpoint_id=EP, **kw) -> Job:
    return Job(request_id=J.new_request_id(), endpoint_id=endpoint_id, owner=owner,
               input={"prompt": "x", "seed": 1}, priority=priority, deadline=deadline, webhook_url=webhook_url, **kw)


@dataclass
class Backend:
    name: str
    url: str
    _open: Callable[[], JobStore]

    def open(self) -> JobStore:
        return self._open()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/jobs.sqlite3"
    else:
        url = request.getfixturevalue("pg_url")
    opened: list[JobStore] = []

    def open_() -> JobStore:
        s = open_store(url)
        opened.append(s)
        return s

    yield Backend(request.param, url, open_)
    for s in opened:
        s.close()


@pytest.fixture
def store(backend) -> JobStore:
    return backend.open()


def claim(store: JobStore, worker="w", **kw) -> tuple[Job, Lease]:
    job = store.claim_next(worker, **kw)
    assert job is not None
    return job, Lease.of(job)


def statuses(events) -> list[tuple[str, str]]:
    return [(e.event, e.status) for e in events if e.kind == EV_STATUS]


# ----------------------------------------------------------------------------- submit / read

def test_submit_get_owner_isolation(store):
    j = store.submit(mk(owner="k_a", extra={"size": 64}))
    assert j.seq > 0
    got = store.get(j.request_id)
    assert got.input == {"prompt": "x", "seed": 1} and got.extra == {"size": 64} and got.status == J.IN_QUEUE
    assert store.get(j.request_id, "k_a").owner == "k_a"
    with pytest.raises(JobNotFound):
        store.get(j.request_id, "k_b")
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.request_cancel(j.request_id, owner="k_b")
    with pytest.raises(ValueError):
        store.submit(mk(priority="urgent"))
    store.ping()


def test_any_json_round_trips(store):
    odd = {"prompt": "nul \x00 tab \t emoji \U0001F600 quote \" backslash \\ \u2028", "seed": 2**53,
           "loras": [{"scale": 0.1, "path": None}], "nested": {"a": [1, 2.5, True, False]}}
    j = store.submit(Job(request_id=J.new_request_id(), endpoint_id=EP, owner="k_a", input=odd,
                         extra={"no_retry": True, "note": "\x00"}))
    got = store.get(j.request_id)
    assert got.input == odd and got.extra == {"no_retry": True, "note": "\x00"}
    _, lease = claim(store)
    store.append_log(j.request_id, "a log line with \x00 in it", lease=lease)
    assert store.get_logs(j.request_id)[0]["message"] == "a log line with \ufffd in it"  # same on both
    assert store.complete_ok(lease, {"images": [], "text": "\x00\U0001F600"}).result["text"] == "\x00\U0001F600"
    assert store.get(j.request_id).result == {"images": [], "text": "\x00\U0001F600"}


def test_submit_is_durable_across_reopen(backend):
    s1 = backend.open()
    j = s1.submit(mk())
    s1.close()
    s2 = backend.open()
    assert s2.get(j.request_id).status == J.IN_QUEUE


def test_claim_priority_then_fifo_positions_and_counts(store):
    low1 = store.submit(mk(priority="low", owner="k_b"))
    n1 = store.submit(mk())
    low2 = store.submit(mk(priority="low"))
    n2 = store.submit(mk(owner="k_b"))
    assert [store.queue_position(x.request_id) for x in (n1, n2, low1, low2)] == [0, 1, 2, 3]
    assert store.queue_depth() == {"IN_QUEUE": 4, "IN_PROGRESS": 0}
    assert (store.queued_count(), store.queued_count("k_a"), store.queued_count("k_b"),
            store.queued_count("k_c")) == (4, 2, 2, 0)
    order = [store.claim_next("w").request_id for _ in range(4)]
    assert order == [n1.request_id, n2.request_id, low1.request_id, low2.request_id]
    assert store.claim_next("w") is None
    assert store.queue_position(n1.request_id) is None
    assert store.queue_position("nope") is None
    assert store.queue_depth() == {"IN_QUEUE": 0, "IN_PROGRESS": 4}
    assert store.queued_count() == 0


def test_queue_positions_of_many_requests_agree_with_queue_position(store):
    jobs = [store.submit(mk(priority="low" if i % 3 == 0 else "normal", owner=f"k_{i % 2}")) for i in range(9)]
    running = store.claim_next("w")  # the first normal-priority job
    done = store.submit(mk())
    store.request_cancel(done.request_id)  # COMPLETED (cancelled while queued)
    ids = [j.request_id for j in jobs] + [done.request_id, "nope", jobs[4].request_id]
    expected = {rid: store.queue_position(rid) for rid in ids}
    expected = {rid: pos for rid, pos in expected.items() if pos is not None}
    assert len(expected) == 8 and running.request_id not in expected and done.request_id not in expected
    assert sorted(expected.values()) == list(range(8))
    assert store.queue_positions(ids) == expected
    assert store.queue_positions([jobs[6].request_id]) == {jobs[6].request_id: expected[jobs[6].request_id]}
    assert store.queue_positions([]) == {} and store.queue_positions(["nope"]) == {}


def test_claim_by_endpoint(store):
    a = store.submit(mk(endpoint_id=EP))
    b = store.submit(mk(endpoint_id=EP2))
    assert store.claim_next("w", endpoint_ids=[]) is None
    assert store.claim_next("w", endpoint_ids=[EP2]).request_id == b.request_id
    assert store.claim_next("w", endpoint_ids=[EP2]) is None
    assert store.claim_next("w", endpoint_ids=[EP, EP2]).request_id == a.request_id


def test_claim_with_match_passes_over_others_and_they_keep_their_place(store):
    jobs = [store.submit(mk(priority=p, extra={"size": size}))
            for p, size in [("normal", 64), ("normal", 96), ("low", 64), ("normal", 64)]]
    wants_64 = lambda job: job.extra["size"] == 64  # noqa: E731
    got = [store.claim_next("w", match=wants_64).request_id for _ in range(3)]
    assert got == [jobs[0].request_id, jobs[3].request_id, jobs[2].request_id]  # priority, then FIFO
    assert store.claim_next("w", match=wants_64) is None
    assert store.queue_position(jobs[1].request_id) == 0 and store.get(jobs[1].request_id).status == J.IN_QUEUE
    assert store.claim_next("w").request_id == jobs[1].request_id


def test_claim_with_match_looks_only_so_far_and_survives_a_failing_predicate(store):
    first, second = store.submit(mk()), store.submit(mk())
    assert store.claim_next("w", match=lambda job: job.request_id == second.request_id, lookahead=1) is None

    def broken(job):
        raise KeyError("no such field")

    assert store.claim_next("w", match=broken) is None
    assert store.queue_depth() == {"IN_QUEUE": 2, "IN_PROGRESS": 0}
    got = store.claim_next("w", match=lambda job: job.request_id == second.request_id, lookahead=2)
    assert got.request_id == second.request_id and got.status == J.IN_PROGRESS
    assert store.queue_position(first.request_id) == 0


def test_claim_takes_a_lease_and_counts_the_attempt(store):
    j = store.submit(mk())
    t0 = time.time()
    got, lease = claim(store, "w1", lease_seconds=30)
    assert lease == Lease(j.request_id, "w1", 1)
    assert got.attempts == 1 and got.worker_id == "w1"
    assert t0 + 29 <= got.lease_expires_at <= time.time() + 31  # the database clock: this machine's here
    stored = store.get(j.request_id)
    assert stored.lease_expires_at == pytest.approx(got.lease_expires_at)
    store.heartbeat(lease, lease_seconds=300)
    assert store.get(j.request_id).lease_expires_at >= t0 + 299


def test_claim_skips_and_expires_past_deadline(store):
    expired = store.submit(mk(deadline=time.time() - 1))
    ok = store.submit(mk(deadline=time.time() + 60))
    got = store.claim_next("w")
    assert got.request_id == ok.request_id
    e = store.get(expired.request_id)
    assert e.status == J.COMPLETED and e.error["status_code"] == 504 and e.error_type == "timeout"


def test_expire_due(store):
    a = store.submit(mk(deadline=time.time() + 0.3))
    b = store.submit(mk())
    assert store.expire_due() == []
    assert [j.request_id for j in store.expire_due(now=time.time() + 5)] == [a.request_id]
    assert store.get(a.request_id).error_type == J.ERR_TIMEOUT
    assert store.get(b.request_id).status == J.IN_QUEUE
    c = store.submit(mk(deadline=time.time() + 0.2))
    time.sleep(0.4)  # on the database's own clock
    assert [j.request_id for j in store.expire_due()] == [c.request_id]


def test_logs_complete_and_list(store):
    a = store.submit(mk(owner="k_a"))
    store.submit(mk(owner="k_b"))
    c = store.submit(mk(owner="k_a"))
    _, lease = claim(store)
    store.append_log(a.request_id, "step 1/4", lease=lease)
    store.append_log(a.request_id, "step 2/4", level="DEBUG", source="engine")
    logs = store.get(a.request_id, with_logs=True).logs
    assert [entry["message"] for entry in logs] == ["step 1/4", "step 2/4"]
    assert set(logs[0]) == {"message", "level", "source", "timestamp"}
    assert (logs[1]["level"], logs[1]["source"]) == ("DEBUG", "engine")
    assert logs[0]["timestamp"].endswith("Z")
    assert [entry["message"] for entry in store.get_logs(a.request_id, since=1)] == ["step 2/4"]
    assert store.get(a.request_id).logs == []  # without with_logs
    done = store.complete_ok(lease, {"images": [], "seed": 1})
    assert done.result == {"images": [], "seed": 1} and done.status == J.COMPLETED
    with pytest.raises(LeaseLost):
        store.complete_error(lease, job_error("late", "internal", 500))
    assert store.get(a.request_id).result == {"images": [], "seed": 1}
    assert [j.request_id for j in store.list_requests("k_a", 10)] == [c.request_id, a.request_id]
    assert len(store.list_requests(None, 10)) == 3


# ----------------------------------------------------------------------------- events

def test_progress_and_events_in_order(store):
    start = store.last_event_seq()
    j = store.submit(mk())
    _, lease = claim(store)
    store.record_progress(lease, 1, 4)
    store.append_log(j.request_id, "step 1/4", lease=lease)
    store.record_progress(lease, 2, 4, preview="data:image/jpeg;base64,AAAA")
    got = store.get(j.request_id)
    assert (got.progress_step, got.progress_total) == (2, 4)
    store.complete_ok(lease, {"images": []})
    events = store.wait_events(start, 1.0)
    assert [e.seq for e in events] == sorted(e.seq for e in events) and len({e.seq for e in events}) == len(events)
    assert all(e.request_id == j.request_id for e in events)
    assert [(e.kind, e.event, e.status, e.step, e.total, e.preview) for e in events] == [
        (EV_STATUS, "submit", J.IN_QUEUE, 0, 0, False),
        (EV_STATUS, "claim", J.IN_PROGRESS, 0, 0, False),
        (EV_PROGRESS, "", "", 1, 4, False),
        (EV_LOG, "", "", 0, 0, False),
        (EV_PROGRESS, "", "", 2, 4, True),
        (EV_STATUS, "complete_ok", J.COMPLETED, 0, 0, False),
    ]
    assert store.last_event_seq() == events[-1].seq
    assert store.wait_events(events[2].seq, 0.5) == events[3:]


def test_wait_events_blocks_then_wakes_on_another_processes_commit(backend):
    reader, writer = backend.open(), backend.open()
    j = writer.submit(mk())
    cursor = reader.last_event_seq()
    t0 = time.monotonic()
    assert reader.wait_events(cursor, 0.3) == []
    assert time.monotonic() - t0 >= 0.25  # it blocked for the timeout
    _, lease = claim(writer)
    after_claim = writer.last_event_seq()
    woke: list = []

    def follow():
        t = time.monotonic()
        evs = reader.wait_events(after_claim, 10.0)
        woke.append((time.monotonic() - t, evs))

    th = threading.Thread(target=follow)
    th.start()
    time.sleep(0.3)
    assert not woke  # still waiting: nothing after the claim's event yet
    t_commit = time.monotonic()
    writer.record_progress(lease, 3, 8)
    th.join(10)
    waited, evs = woke[0]
    assert [(e.kind, e.step, e.total, e.request_id) for e in evs] == [(EV_PROGRESS, 3, 8, j.request_id)]
    assert time.monotonic() - t_commit < 1.0 and waited < 5.0  # woken by the commit, not the timeout


def test_wait_events_sees_a_burst_from_several_writers_without_gaps(backend):
    reader = backend.open()
    writers = [backend.open() for _ in range(3)]
    start = reader.last_event_seq()

    def burst(s):
        for _ in range(15):
            s.submit(mk())

    threads = [threading.Thread(target=burst, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    seen: list = []
    cursor = start
    deadline = time.monotonic() + 30
    while len(seen) < 45 and time.monotonic() < deadline:
        evs = reader.wait_events(cursor, 1.0)
        if evs:
            cursor = evs[-1].seq
            seen += evs
    for t in threads:
        t.join()
    assert len(seen) == 45
    assert [e.seq for e in seen] == list(range(start + 1, start + 46))  # gap-free and in order


def test_previews_latest_per_job_and_cleared_with_the_attempt(backend):
    store, other = backend.open(), backend.open()
    j = store.submit(mk())
    _, lease = claim(store)
    assert store.get_preview(j.request_id) is None
    store.record_progress(lease, 1, 4, preview="data:image/jpeg;base64,AAAA")
    store.record_progress(lease, 2, 4)  # no preview this step: the latest one stays
    p = other.get_preview(j.request_id)
    assert (p.step, p.data_uri) == (1, "data:image/jpeg;base64,AAAA")
    store.record_progress(lease, 3, 4, preview="data:image/jpeg;base64,BBBB")
    assert other.get_preview(j.request_id).step == 3
    store.complete_ok(lease, {"images": []})
    assert other.get_preview(j.request_id) is None


def test_watchers_ttl(backend):
    api, worker = backend.open(), backend.open()
    j = api.submit(mk())
    assert not worker.is_watched(j.request_id)
    api.watch(j.request_id, "api-1", ttl=0.4)
    api.watch(j.request_id, "api-2", ttl=30)
    assert worker.is_watched(j.request_id)
    api.unwatch(j.request_id, "api-2")
    assert worker.is_watched(j.request_id)  # api-1 still follows
    time.sleep(0.6)
    assert not worker.is_watched(j.request_id)  # expired
    api.watch(j.request_id, "api-1", ttl=30)  # refreshed
    assert worker.is_watched(j.request_id)
    api.unwatch(j.request_id, "api-1")
    assert not worker.is_watched(j.request_id)


# ----------------------------------------------------------------------------- cancel

def test_cancel_in_each_state(store):
    q = store.submit(mk())
    out = store.request_cancel(q.request_id)
    assert out.outcome == "cancelled" and out.job.status == J.COMPLETED and out.job.error_type == J.ERR_CANCELLED
    again = store.request_cancel(q.request_id)
    assert again.outcome == "already_completed" and again.job.error_type == J.ERR_CANCELLED
    r = store.submit(mk())
    _, lease = claim(store)
    assert r.request_id == lease.request_id  # the cancelled queued job is never claimed
    assert not store.is_cancel_requested(r.request_id)
    assert store.request_cancel(r.request_id).outcome == "cancel_requested"
    assert store.is_cancel_requested(r.request_id)
    assert store.request_cancel(r.request_id).outcome == "already_requested"
    assert store.get(r.request_id).status == J.IN_PROGRESS
    with pytest.raises(JobNotFound):
        store.request_cancel(r.request_id, owner="someone-else")
    assert store.claim_next("w") is None
    # the worker's writes still hold until it completes: the cancel does not take its lease
    store.record_progress(lease, 1, 4)
    fin = store.complete_error(lease, job_error("stopped", J.ERR_CANCELLED, J.CANCELLED_STATUS_CODE))
    assert fin.error_type == J.ERR_CANCELLED


def test_cancel_recorded_before_complete_ok_finishes_cancelled(store):
    j = store.submit(mk(webhook_url="https://example.com/h"))
    _, lease = claim(store)
    store.request_cancel(j.request_id)
    done = store.complete_ok(lease, {"images": [{"url": "x"}]})
    assert done.status == J.COMPLETED and done.result is None and done.error_type == J.ERR_CANCELLED
    stored = store.get(j.request_id)
    assert stored.result is None and stored.error_type == J.ERR_CANCELLED
    assert stored.webhook_state == J.WEBHOOK_PENDING  # the client still hears about it


def test_a_running_job_asked_to_cancel_is_not_queued_again(store):
    # a running job asked to stop is not queued again when its worker releases it or dies
    a, b = store.submit(mk()), store.submit(mk())
    _, la = claim(store)
    _, lb = claim(store, "w-dead", lease_seconds=0.2)
    store.request_cancel(a.request_id)
    store.request_cancel(b.request_id)
    assert store.release(la).error_type == J.ERR_CANCELLED
    time.sleep(0.4)
    changed = store.recover(max_attempts=3)
    assert [(c.request_id, c.status, c.error_type) for c in changed] == [(b.request_id, J.COMPLETED, J.ERR_CANCELLED)]
    assert store.queue_depth() == {"IN_QUEUE": 0, "IN_PROGRESS": 0}


# ----------------------------------------------------------------------------- leases and fencing

def test_expired_lease_is_fenced_after_another_worker_reclaims(backend):
    w1, w2 = backend.open(), backend.open()
    j = w1.submit(mk())
    _, lease1 = claim(w1, "w1", lease_seconds=0.3)
    w1.append_log(j.request_id, "step 1/4", lease=lease1)
    w1.record_progress(lease1, 1, 4, preview="data:image/jpeg;base64,ONE")
    time.sleep(0.5)  # w1 stalls past its lease (database clock)
    sweeper = backend.open()
    changed = sweeper.recover(max_attempts=3)
    assert [(c.request_id, c.status, c.attempts) for c in changed] == [(j.request_id, J.IN_QUEUE, 1)]
    got, lease2 = claim(w2, "w2")
    assert lease2 == Lease(j.request_id, "w2", 2) and got.progress_step == 0
    w2.record_progress(lease2, 1, 4)
    before = w2.get(j.request_id, with_logs=True)
    events_before = w2.last_event_seq()
    late = [
        lambda: w1.append_log(j.request_id, "late step 2/4", lease=lease1),
        lambda: w1.record_progress(lease1, 2, 4, preview="data:image/jpeg;base64,LATE"),
        lambda: w1.heartbeat(lease1),
        lambda: w1.complete_ok(lease1, {"images": [{"url": "stale"}]}),
        lambda: w1.complete_error(lease1, job_error("late", "internal", 500)),
        lambda: w1.release(lease1),
    ]
    for write in late:
        with pytest.raises(LeaseLost) as info:
            write()
        assert info.value.lease == lease1
    after = w2.get(j.request_id, with_logs=True)
    assert after == before  # nothing changed: status, worker, attempt, progress, logs
    assert (after.status, after.worker_id, after.attempts, after.progress_step) == (J.IN_PROGRESS, "w2", 2, 1)
    assert w2.get_preview(j.request_id) is None
    assert w2.last_event_seq() == events_before
    done = w2.complete_ok(lease2, {"images": [{"url": "good"}]})
    assert done.result == {"images": [{"url": "good"}]}
    with pytest.raises(LeaseLost):
        w1.complete_ok(lease1, {"images": []})
    assert w2.get(j.request_id).result == {"images": [{"url": "good"}]}


def test_heartbeat_keeps_the_lease(store):
    j = store.submit(mk())
    _, lease = claim(store, lease_seconds=0.3)
    store.heartbeat(lease, lease_seconds=60)
    time.sleep(0.5)
    assert store.recover(max_attempts=3) == []
    assert store.recover(max_attempts=3, now=time.time() + 120)[0].request_id == j.request_id
    with pytest.raises(LeaseLost):
        store.heartbeat(lease)


def test_release_gives_the_attempt_back(store):
    j = store.submit(mk(deadline=time.time() + 60))
    _, lease = claim(store)
    rel = store.release(lease)
    assert (rel.status, rel.attempts, rel.worker_id, rel.lease_expires_at) == (J.IN_QUEUE, 0, None, None)
    assert store.queue_position(j.request_id) == 0
    with pytest.raises(LeaseLost):
        store.release(lease)
    again, lease2 = claim(store, "w2")
    assert lease2.attempt == 1 and again.attempts == 1


def test_recover_requeues_then_fails_after_max_attempts(store):
    j = store.submit(mk())
    dead = lambda wid: False  # noqa: E731
    for attempt in (1, 2):
        claimed = store.claim_next("host:1:dead:w0")
        assert claimed.attempts == attempt
        changed = store.recover(max_attempts=3, is_worker_alive=dead)
        assert [c.status for c in changed] == [J.IN_QUEUE]
    store.claim_next("host:1:dead:w0")
    changed = store.recover(max_attempts=3, is_worker_alive=dead)
    assert changed[0].status == J.COMPLETED and changed[0].error_type == J.ERR_CRASHED
    assert "3 time(s)" in changed[0].error["error"]
    assert any("re-queued" in entry["message"] for entry in store.get_logs(j.request_id))


def test_recover_fails_a_no_retry_job_at_its_first_crash(store):
    plain = store.submit(mk())
    no_retry = store.submit(mk(extra={"no_retry": True}))
    store.claim_next("host:1:dead:w0")
    store.claim_next("host:1:dead:w0")
    changed = {c.request_id: c for c in store.recover(max_attempts=3, is_worker_alive=lambda wid: False)}
    assert changed[plain.request_id].status == J.IN_QUEUE
    failed = changed[no_retry.request_id]
    assert failed.status == J.COMPLETED and failed.error_type == J.ERR_CRASHED
    assert "x-fal-no-retry" in failed.error["error"]
    assert store.get(no_retry.request_id).extra == {"no_retry": True}


def test_recover_uses_the_lease_and_liveness(store):
    j = store.submit(mk())
    store.claim_next("w-live", lease_seconds=60)
    assert store.recover(max_attempts=3) == []
    assert store.recover(max_attempts=3, is_worker_alive=lambda w: True) == []
    assert store.recover(max_attempts=3, is_worker_alive=lambda w: None) == []
    # the lease expired (database clock overridden here): taken back whatever liveness says
    changed = store.recover(max_attempts=3, is_worker_alive=lambda w: None, now=time.time() + 120)
    assert [c.request_id for c in changed] == [j.request_id]


# ----------------------------------------------------------------------------- retention, webhooks

def test_purge_jobs_logs_previews_events_but_never_pending_webhooks(store):
    old = store.submit(mk())
    hook = store.submit(mk(webhook_url="https://example.com/h"))
    fresh = store.submit(mk())
    _, l_old = claim(store)
    _, l_hook = claim(store)
    claim(store)
    store.append_log(old.request_id, "hello", lease=l_old)
    store.record_progress(l_old, 1, 2, preview="data:x")
    store.complete_ok(l_old, {"images": []})
    store.complete_ok(l_hook, {"images": []})
    assert store.last_event_seq() > 0
    purged = store.purge(10, now=time.time() + 3600)
    assert [(p.request_id, p.result) for p in purged] == [(old.request_id, {"images": []})]
    with pytest.raises(JobNotFound):
        store.get(old.request_id)
    assert store.get_logs(old.request_id) == [] and store.get_preview(old.request_id) is None
    assert store.get(hook.request_id).webhook_state == J.WEBHOOK_PENDING
    assert store.get(fresh.request_id).status == J.IN_PROGRESS
    assert store.wait_events(0, 0) == []  # events older than the cutoff are gone
    assert store.purge(10) == []  # nothing is old on the real clock


def test_due_webhooks_lease_and_record(backend):
    store, other = backend.open(), backend.open()
    j = store.submit(mk(webhook_url="https://example.com/h"))
    _, lease = claim(store)
    store.complete_error(lease, job_error("boom", "internal", 500))
    due = store.due_webhooks(time.time() + 1, 10)
    assert [d.request_id for d in due] == [j.request_id]
    assert other.due_webhooks(time.time() + 1, 10) == []  # leased to the first dispatcher
    store.record_webhook_attempt(j.request_id, False, time.time() - 1, "HTTP 500")
    assert [d.request_id for d in other.due_webhooks(time.time(), 10)] == [j.request_id]
    done = other.record_webhook_attempt(j.request_id, True, None, None)
    assert done.webhook_state == J.WEBHOOK_DELIVERED and done.webhook_attempts == 2
    assert store.due_webhooks(time.time() + 1e6, 10) == []


# ----------------------------------------------------------------------------- fleet

def test_shared_secret_race_from_threads(backend):
    stores = [backend.open() for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    got: list[bytes] = [b""] * len(stores)

    def run(i):
        barrier.wait()
        got[i] = stores[i].shared_secret("webhook-key", lambda: os.urandom(32))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(got)) == 1 and len(got[0]) == 32
    assert stores[0].shared_secret("webhook-key", lambda: b"other") == got[0]
    assert stores[1].shared_secret("upload-key", lambda: b"u" * 16) == b"u" * 16


def test_a_rotated_secret_keeps_one_previous_version(backend):
    from kleinserve.service.store import SecretNotCreated, SecretVersions

    a, b = backend.open(), backend.open()
    assert a.secret_versions("upload-key") == SecretVersions()
    with pytest.raises(SecretNotCreated):
        a.rotate_secret("upload-key", b"0" * 32)  # nothing to rotate yet
    first = a.shared_secret("upload-key", lambda: b"1" * 32)
    b.rotate_secret("upload-key", b"2" * 32)
    assert a.secret_versions("upload-key") == SecretVersions(current=b"2" * 32, previous=first)
    assert a.shared_secret("upload-key", lambda: b"x" * 32) == b"2" * 32  # the current version
    a.rotate_secret("upload-key", b"3" * 32)
    assert b.secret_versions("upload-key") == SecretVersions(b"3" * 32, b"2" * 32)  # the first one is gone
    b.rotate_secret("upload-key", b"4" * 32, drop_previous=True)
    assert a.secret_versions("upload-key") == SecretVersions(current=b"4" * 32)
    assert b.secret_versions("webhook-key") == SecretVersions()  # other secrets untouched


def test_a_staged_secret_becomes_current_once_due_in_one_process_only(backend):
    from kleinserve.service.store import SecretVersions

    stores = [backend.open() for _ in range(4)]
    stores[0].shared_secret("hook", lambda: b"A" * 32)
    t = time.time()
    stores[1].rotate_secret("hook", b"B" * 32, active_from=t + 100)
    staged = SecretVersions(current=b"A" * 32, next=b"B" * 32, next_from=pytest.approx(t + 100))
    assert stores[0].secret_versions("hook") == staged
    assert not stores[2].promote_due_secret("hook", now=t + 50)  # not due: unchanged
    assert stores[3].secret_versions("hook") == staged
    barrier = threading.Barrier(len(stores))
    promoted: list[bool] = []

    def promote(store):
        barrier.wait()
        promoted.append(store.promote_due_secret("hook", now=t + 101))

    threads = [threading.Thread(target=promote, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(promoted) == [False, False, False, True]
    assert stores[1].secret_versions("hook") == SecretVersions(current=b"B" * 32, previous=b"A" * 32)


def test_worker_registry_expires(backend):
    a, b = backend.open(), backend.open()
    assert a.live_workers() == {}
    a.register_worker("w1", [EP, EP2], ttl=0.4, info={"device": "cpu"})
    b.register_worker("w2", [EP], ttl=30)
    assert b.live_workers() == {EP: 2, EP2: 1}
    time.sleep(0.6)
    assert b.live_workers() == {EP: 1}
    a.register_worker("w1", [EP2], ttl=30)  # refreshed, now serving one endpoint
    assert a.live_workers() == {EP: 1, EP2: 1}
    b.deregister_worker("w2")
    assert a.live_workers() == {EP2: 1}


# ----------------------------------------------------------------------------- processes

def _claim_all(url: str, out_q) -> None:
    s = open_store(url)
    got = []
    while True:
        j = s.claim_next(f"proc-{os.getpid()}")
        if j is None:
            break
        got.append(j.request_id)
        s.complete_ok(Lease.of(j), {"by": os.getpid()})
    s.close()
    out_q.put(got)


def test_concurrent_claims_from_processes_never_double_claim(backend):
    s = backend.open()
    ids = {s.submit(mk()).request_id for _ in range(60)}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(backend.url, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [r for res in results for r in res]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert all(s.get(i).attempts == 1 and s.get(i).succeeded for i in ids)


def _open_and_submit(url: str, barrier, out_q) -> None:
    try:
        barrier.wait(60)
        s = open_store(url)
        j = s.submit(mk())
        s.close()
        out_q.put(("ok", j.request_id))
    except Exception as e:  # reported to the test
        out_q.put(("error", repr(e)))


def test_concurrent_schema_creation_on_an_empty_database(request, tmp_path, backend):
    if backend.name == "sqlite":
        url = f"sqlite://{tmp_path}/fresh/jobs.sqlite3"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.create_database()
        request.addfinalizer(lambda: cluster.drop_database(name))
        url = cluster.url(name)
    ctx = mp.get_context("spawn")
    n = 4
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_submit, args=(url, barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(kind == "ok" for kind, _ in results), results
    s = open_store(url)
    try:
        assert sorted(j.request_id for j in s.list_requests(None)) == sorted(r for _, r in results)
    finally:
        s.close()


# ----------------------------------------------------------------------------- schema versions

def test_a_newer_schema_is_refused(backend):
    s = backend.open()
    s.close()
    if backend.name == "sqlite":
        con = sqlite3.connect(backend.url[len("sqlite://"):])
        con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        con.commit()
        con.close()
    else:
        import psycopg

        with psycopg.connect(backend.url, autocommit=True) as c:
            c.execute("UPDATE kleinserve_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(RuntimeError, match="newer"):
        open_store(backend.url)


# The schema of kleinserve before the fleet work (schema 1), as its databases exist on disk.
_SCHEMA_1 = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE,
  endpoint_id TEXT NOT NULL, owner TEXT NOT NULL, input TEXT NOT NULL, status TEXT NOT NULL,
  priority TEXT NOT NULL, prio INTEGER NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
  deadline REAL, attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, worker_id TEXT,
  heartbeat_at REAL, result TEXT, error TEXT, mode TEXT NOT NULL DEFAULT 'queue', public_base TEXT,
  webhook_url TEXT, webhook_state TEXT NOT NULL DEFAULT 'none', webhook_attempts INTEGER NOT NULL DEFAULT 0,
  webhook_next_at REAL, webhook_last_error TEXT, extra TEXT NOT NULL DEFAULT '{}');
CREATE INDEX jobs_queue ON jobs(status, prio, seq);
CREATE TABLE job_logs (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, timestamp REAL NOT NULL,
  level TEXT NOT NULL, source TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_sqlite_schema_1_database_keeps_working(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA_1)
    now = time.time()
    con.execute("INSERT INTO jobs (request_id, endpoint_id, owner, input, status, priority, prio, created_at) "
                "VALUES ('queued', ?, 'k_a', '{\"prompt\": \"q\"}', 'IN_QUEUE', 'normal', 0, ?)", (EP, now - 5))
    con.execute("INSERT INTO jobs (request_id, endpoint_id, owner, input, status, priority, prio, created_at, "
                "started_at, attempts, worker_id, heartbeat_at) VALUES ('running', ?, 'k_a', '{}', 'IN_PROGRESS', "
                "'normal', 0, ?, ?, 1, 'old-worker', ?)", (EP, now - 500, now - 400, now - 300))
    con.execute("INSERT INTO job_logs (request_id, timestamp, level, source, message) "
                "VALUES ('running', ?, 'INFO', 'worker', 'step 1/4')", (now - 300,))
    con.commit()
    con.close()
    os.chmod(path, 0o644)
    s = open_store(f"sqlite:{path}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # tightened
        assert s.get("queued").input == {"prompt": "q"}
        running = s.get("running", with_logs=True)
        assert running.lease_expires_at == pytest.approx(now - 300 + 120) and running.progress_step == 0
        assert [entry["message"] for entry in running.logs] == ["step 1/4"]
        # the old worker's lease (from its last heartbeat) has expired: the sweeper takes the job back
        assert [c.request_id for c in s.recover(max_attempts=3)] == ["running"]
        got, lease = claim(s, match=lambda job: job.request_id == "running")
        assert got.request_id == "running" and lease.attempt == 2
        s.complete_ok(lease, {"images": []})
        assert s.last_event_seq() > 0
    finally:
        s.close()
    con = sqlite3.connect(path)
    from kleinserve.service.sqlite_store import SCHEMA_VERSION

    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert "active_from" in [row[1] for row in con.execute("PRAGMA table_info(secrets)")]
    con.close()


def test_sqlite_files_are_private(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/d/jobs.sqlite3")
    try:
        s.submit(mk())
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{tmp_path}/d/jobs.sqlite3{suffix}")
            assert p.exists() and stat.S_IMODE(p.stat().st_mode) == 0o600, suffix
    finally:
        s.close()


# ----------------------------------------------------------------------------- open_store

def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("sqlite:data/jobs.sqlite3")
    try:
        assert (tmp_path / "data" / "jobs.sqlite3").exists() and rel.describe() == "sqlite:data/jobs.sqlite3"
    finally:
        rel.close()
    absolute = open_store(f"sqlite://{tmp_path}/abs.sqlite3")
    try:
        assert absolute.describe() == f"sqlite://{tmp_path}/abs.sqlite3"
    finally:
        absolute.close()
    for bad in ("", "redis://localhost/0", "jobs.sqlite3", "sqlite://host/jobs.sqlite3", "sqlite:",
                "mysql://u:hunter2@h/db", "postgresql:db"):
        with pytest.raises(ValueError) as info:
            open_store(bad)
        assert "hunter2" not in str(info.value) and "sqlite:///" in str(info.value)


def test_postgres_describe_never_shows_the_password(pg_cluster):
    from kleinserve.service.pg_store import describe_conninfo

    assert describe_conninfo("postgresql://ks:hunter2@db.example:5433/jobs?sslmode=require") == \
        "postgresql://ks@db.example:5433/jobs"
    s = open_store(pg_cluster.url().replace("postgresql://postgres@", "postgres://postgres:hunter2@"))
    try:  # trust auth: the password is not checked, it only must not show
        assert "hunter2" not in s.describe() and s.describe().startswith("postgresql://postgres@127.0.0.1:")
    finally:
        s.close()


# ----------------------------------------------------------------------------- PostgreSQL restarts

def test_postgres_store_reconnects_after_the_server_is_killed(pg_cluster, pg_url):
    s, reader = open_store(pg_url), open_store(pg_url)
    try:
        before = s.submit(mk())
        cursor = reader.last_event_seq()
        assert reader.wait_events(cursor, 0.2) == []  # the LISTEN connection is up
        pg_cluster.kill_all()
        pg_cluster.start()
        after = s.submit(mk())  # the pool replaces its dead connections
        assert s.get(before.request_id).status == J.IN_QUEUE  # acknowledged before the kill: kept
        evs = reader.wait_events(cursor, 10.0)
        assert [e.request_id for e in evs] == [after.request_id]
        _, lease = claim(s)
        # by then (the listener retries every <= 0.5 s) the reader LISTENs again: the NOTIFY wakes it at
        # once (its safety re-read runs 1 s into the wait and then at 2 s: 0.8 s after this commit)
        committed: list[float] = []
        t = threading.Thread(target=lambda: (time.sleep(1.2), s.record_progress(lease, 1, 2),
                                             committed.append(time.monotonic())))
        t.start()
        evs = reader.wait_events(evs[-1].seq + 1, 10.0)  # after the claim's event
        received = time.monotonic()
        t.join()
        assert [(e.kind, e.step) for e in evs] == [(EV_PROGRESS, 1)]
        assert received - committed[0] < 0.4
    finally:
        s.close()
        reader.close()


def test_postgres_unreachable_or_missing_database_is_a_clear_error(pg_cluster):
    t0 = time.monotonic()
    with socket_free_port() as port, pytest.raises(ConnectionError, match="cannot connect to the job store"):
        open_store(f"postgresql://postgres:hunter2@127.0.0.1:{port}/jobs")
    assert time.monotonic() - t0 < 20
    with pytest.raises(ConnectionError, match="does not exist") as info:
        open_store(pg_cluster.url("no_such_database"))
    assert "hunter2" not in str(info.value)


class socket_free_port:
    """A loopback port nothing listens on (held bound, not listening, for the duration)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_postgres_no_acknowledged_submit_is_lost_when_every_server_process_is_killed(pg_cluster, pg_url):
    s = open_store(pg_url)
    acked: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def submit_loop():
        while not stop.is_set():
            job = mk()
            try:
                s.submit(job)
            except Exception as e:  # the server is down: not acknowledged, the client would retry
                errors.append(type(e).__name__)
                time.sleep(0.05)
            else:
                acked.append(job.request_id)

    threads = [threading.Thread(target=submit_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        killed = pg_cluster.kill_all()
        assert len(killed) >= 3  # the postmaster and its helpers
        n_at_kill = len(acked)
        pg_cluster.start()
        time.sleep(1.0)  # submits go on after the restart
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert n_at_kill > 10 and len(acked) > n_at_kill
    import psycopg

    with psycopg.connect(pg_url) as c:
        stored = {row[0] for row in c.execute("SELECT request_id FROM jobs")}
    missing = [i for i in acked if i not in stored]
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged submits lost"
    s.close()
