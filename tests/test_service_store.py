"""The job state machine and the SQLite job store (no model needed)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from kleinserve.service import jobs as J
from kleinserve.service.jobs import InvalidTransition, Job, job_error
from kleinserve.service.sqlite_store import SQLiteJobStore
from kleinserve.service.store import JobNotFound

EP = "fal-ai/flux-2/klein/9b/base"


def mk(owner="k_a", priority="normal", deadline=None, webhook_url=None, **kw) -> Job:
    return Job(request_id=J.new_request_id(), endpoint_id=EP, owner=owner, input={"prompt": "x", "seed": 1},
               priority=priority, deadline=deadline, webhook_url=webhook_url, **kw)


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore.in_data_dir(tmp_path)
    yield s
    s.close()


# ----------------------------------------------------------------------------- state machine

def test_state_machine_happy_path():
    j = mk()
    j = J.apply(j, "claim", worker_id="w")
    assert (j.status, j.attempts, j.worker_id) == (J.IN_PROGRESS, 1, "w")
    assert j.started_at is not None
    j = J.apply(j, "complete_ok", result={"images": []})
    assert j.status == J.COMPLETED and j.succeeded and j.finished_at >= j.started_at
    assert j.metrics()["inference_time"] >= 0
    for event in ("claim", "cancel", "complete_ok", "requeue", "expire", "request_cancel"):
        with pytest.raises(InvalidTransition):
            J.apply(j, event, result={}, error=job_error("x", "internal", 500))


def test_state_machine_invalid_transitions_from_queue():
    j = mk()
    for event in ("complete_ok", "complete_error", "requeue", "release", "crash_fail", "request_cancel"):
        with pytest.raises(InvalidTransition):
            J.apply(j, event, result={}, error=job_error("x", "internal", 500))


def test_state_machine_cancel_expire_crash():
    q = mk()
    c = J.apply(q, "cancel")
    assert c.status == J.COMPLETED and c.error_type == J.ERR_CANCELLED and c.started_at is None
    e = J.apply(mk(), "expire")
    assert e.error["status_code"] == 504 and e.error["timeout_type"] == "user" and e.error_type == "timeout"
    r = J.apply(mk(deadline=time.time() + 5), "claim", worker_id="w")
    rq = J.apply(r, "requeue")
    assert rq.status == J.IN_QUEUE and rq.attempts == 1 and rq.deadline is None and rq.worker_id is None
    rel = J.apply(r, "release")
    assert rel.status == J.IN_QUEUE and rel.attempts == 0
    f = J.apply(r, "crash_fail")
    assert f.status == J.COMPLETED and f.error_type == J.ERR_CRASHED and "attempt" in f.error["error"]
    # a running job asked to cancel is not run again after a crash
    rc = J.apply(J.apply(r, "request_cancel"), "requeue")
    assert rc.status == J.COMPLETED and rc.error_type == J.ERR_CANCELLED


def test_job_error_rejects_unknown_type():
    with pytest.raises(ValueError):
        job_error("x", "nope", 500)


def test_webhook_state_on_completion():
    j = J.apply(J.apply(mk(webhook_url="https://example.com/hook"), "claim", worker_id="w"),
                "complete_ok", result={})
    assert j.webhook_state == J.WEBHOOK_PENDING and j.webhook_next_at is not None
    j2 = J.apply_webhook_attempt(j, delivered=False, next_attempt_at=time.time() + 10, error="boom")
    assert (j2.webhook_state, j2.webhook_attempts, j2.webhook_last_error) == (J.WEBHOOK_PENDING, 1, "boom")
    j3 = J.apply_webhook_attempt(j2, delivered=True, next_attempt_at=None, error=None)
    assert (j3.webhook_state, j3.webhook_attempts) == (J.WEBHOOK_DELIVERED, 2)
    j4 = J.apply_webhook_attempt(j2, delivered=False, next_attempt_at=None, error="gave up")
    assert j4.webhook_state == J.WEBHOOK_FAILED
    assert J.apply(J.apply(mk(), "claim", worker_id="w"), "complete_ok", result={}).webhook_state == J.WEBHOOK_NONE


# ----------------------------------------------------------------------------- store

def test_submit_get_owner_isolation(store):
    j = store.submit(mk(owner="k_a"))
    assert j.seq > 0
    assert store.get(j.request_id).input == {"prompt": "x", "seed": 1}
    assert store.get(j.request_id, "k_a").owner == "k_a"
    with pytest.raises(JobNotFound):
        store.get(j.request_id, "k_b")
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_submit_is_durable_across_reopen(tmp_path):
    s1 = SQLiteJobStore.in_data_dir(tmp_path)
    j = s1.submit(mk())
    s1.close()
    s2 = SQLiteJobStore.in_data_dir(tmp_path)
    assert s2.get(j.request_id).status == J.IN_QUEUE
    s2.close()


def test_claim_priority_then_fifo_and_positions(store):
    low1 = store.submit(mk(priority="low"))
    n1 = store.submit(mk())
    low2 = store.submit(mk(priority="low"))
    n2 = store.submit(mk())
    assert [store.queue_position(x.request_id) for x in (n1, n2, low1, low2)] == [0, 1, 2, 3]
    assert store.queue_depth() == {"IN_QUEUE": 4, "IN_PROGRESS": 0}
    order = [store.claim_next("w").request_id for _ in range(4)]
    assert order == [n1.request_id, n2.request_id, low1.request_id, low2.request_id]
    assert store.claim_next("w") is None
    assert store.queue_position(n1.request_id) is None
    assert store.queue_depth() == {"IN_QUEUE": 0, "IN_PROGRESS": 4}


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


def test_claim_skips_and_expires_past_deadline(store):
    expired = store.submit(mk(deadline=time.time() - 1))
    ok = store.submit(mk(deadline=time.time() + 60))
    got = store.claim_next("w")
    assert got.request_id == ok.request_id
    e = store.get(expired.request_id)
    assert e.status == J.COMPLETED and e.error["status_code"] == 504 and e.error_type == "timeout"


def test_expire_due(store):
    a = store.submit(mk(deadline=time.time() + 0.2))
    b = store.submit(mk())
    assert store.expire_due() == []
    time.sleep(0.3)
    assert [j.request_id for j in store.expire_due()] == [a.request_id]
    assert store.get(b.request_id).status == J.IN_QUEUE


def test_logs_complete_and_list(store):
    a = store.submit(mk(owner="k_a"))
    store.submit(mk(owner="k_b"))
    c = store.submit(mk(owner="k_a"))
    store.claim_next("w")
    store.append_log(a.request_id, "step 1/4")
    store.append_log(a.request_id, "step 2/4")
    logs = store.get(a.request_id, with_logs=True).logs
    assert [l["message"] for l in logs] == ["step 1/4", "step 2/4"]
    assert set(logs[0]) == {"message", "level", "source", "timestamp"}
    assert logs[0]["timestamp"].endswith("Z")
    assert [l["message"] for l in store.get_logs(a.request_id, since=1)] == ["step 2/4"]
    done = store.complete_ok(a.request_id, {"images": [], "seed": 1})
    assert done.result == {"images": [], "seed": 1}
    with pytest.raises(InvalidTransition):
        store.complete_error(a.request_id, job_error("late", "internal", 500))
    assert [j.request_id for j in store.list_requests("k_a", 10)] == [c.request_id, a.request_id]
    assert len(store.list_requests(None, 10)) == 3


def test_cancel_in_each_state(store):
    q = store.submit(mk())
    out = store.request_cancel(q.request_id)
    assert out.outcome == "cancelled" and out.job.status == J.COMPLETED
    assert store.request_cancel(q.request_id).outcome == "already_completed"
    r = store.submit(mk())
    store.claim_next("w")
    assert store.request_cancel(r.request_id).outcome == "cancel_requested"
    assert store.is_cancel_requested(r.request_id)
    assert store.request_cancel(r.request_id).outcome == "already_requested"
    assert store.get(r.request_id).status == J.IN_PROGRESS
    with pytest.raises(JobNotFound):
        store.request_cancel(r.request_id, owner="someone-else")
    # the cancelled queued job is never claimed
    assert store.claim_next("w") is None


def test_recover_requeues_then_fails_after_max_attempts(store):
    j = store.submit(mk())
    dead = lambda wid: False  # noqa: E731
    for attempt in (1, 2):
        claimed = store.claim_next("host:1:dead:w0")
        assert claimed.attempts == attempt
        changed = store.recover(max_attempts=3, stale_after=3600, is_worker_alive=dead)
        assert [c.status for c in changed] == [J.IN_QUEUE]
    store.claim_next("host:1:dead:w0")
    changed = store.recover(max_attempts=3, stale_after=3600, is_worker_alive=dead)
    assert changed[0].status == J.COMPLETED and changed[0].error_type == J.ERR_CRASHED
    assert "3 time(s)" in changed[0].error["error"]
    assert any("re-queued" in l["message"] for l in store.get_logs(j.request_id))


def test_recover_fails_a_no_retry_job_at_its_first_crash(store):
    plain = store.submit(mk())
    no_retry = store.submit(mk(extra={"no_retry": True}))
    store.claim_next("host:1:dead:w0")
    store.claim_next("host:1:dead:w0")
    changed = {c.request_id: c for c in store.recover(max_attempts=3, stale_after=3600,
                                                       is_worker_alive=lambda wid: False)}
    assert changed[plain.request_id].status == J.IN_QUEUE
    failed = changed[no_retry.request_id]
    assert failed.status == J.COMPLETED and failed.error_type == J.ERR_CRASHED
    assert "x-fal-no-retry" in failed.error["error"]
    assert store.get(no_retry.request_id).extra == {"no_retry": True}  # persisted with the job


def test_recover_leaves_live_workers_and_uses_heartbeat(store):
    j = store.submit(mk())
    store.claim_next("w-live")
    assert store.recover(max_attempts=3, stale_after=3600, is_worker_alive=lambda w: True) == []
    assert store.recover(max_attempts=3, stale_after=3600, is_worker_alive=lambda w: None) == []
    # unknown liveness (another host): the heartbeat decides
    changed = store.recover(max_attempts=3, stale_after=10, is_worker_alive=lambda w: None,
                            now=time.time() + 60)
    assert [c.request_id for c in changed] == [j.request_id]


def test_purge_keeps_recent_and_pending_webhooks(store):
    old = store.submit(mk())
    hook = store.submit(mk(webhook_url="https://example.com/h"))
    fresh = store.submit(mk())
    for x in (old, hook, fresh):
        store.claim_next("w")
    store.complete_ok(old.request_id, {"images": []})
    store.complete_ok(hook.request_id, {"images": []})
    purged = store.purge(10, now=time.time() + 3600)
    assert [p.request_id for p in purged] == [old.request_id]
    with pytest.raises(JobNotFound):
        store.get(old.request_id)
    assert store.get(hook.request_id).webhook_state == J.WEBHOOK_PENDING
    assert store.get(fresh.request_id).status == J.IN_PROGRESS


def test_due_webhooks_lease_and_record(store):
    j = store.submit(mk(webhook_url="https://example.com/h"))
    store.claim_next("w")
    store.complete_error(j.request_id, job_error("boom", "internal", 500))
    due = store.due_webhooks(time.time() + 1, 10)
    assert [d.request_id for d in due] == [j.request_id]
    assert store.due_webhooks(time.time() + 1, 10) == []  # leased
    store.record_webhook_attempt(j.request_id, False, time.time() - 1, "HTTP 500")
    assert [d.request_id for d in store.due_webhooks(time.time(), 10)] == [j.request_id]
    done = store.record_webhook_attempt(j.request_id, True, None, None)
    assert done.webhook_state == J.WEBHOOK_DELIVERED and done.webhook_attempts == 2
    assert store.due_webhooks(time.time() + 1e6, 10) == []


def test_listeners_fire_after_commit(store):
    seen = []
    store.add_listener(lambda job, ev: seen.append((ev, job.status)))
    j = store.submit(mk())
    store.claim_next("w")
    store.append_log(j.request_id, "hello")
    store.complete_ok(j.request_id, {})
    assert [e for e, _ in seen] == ["submit", "claim", "log", "complete_ok"]
    assert seen[-1][1] == J.COMPLETED


def test_concurrent_claims_threads_never_double_claim(store):
    ids = {store.submit(mk()).request_id for _ in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n):
        while True:
            j = store.claim_next(f"w{n}")
            if j is None:
                return
            with lock:
                claimed.append(j.request_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def _claim_all(path, out_q):
    s = SQLiteJobStore(path)
    got = []
    while True:
        j = s.claim_next("proc")
        if j is None:
            break
        got.append(j.request_id)
    s.close()
    out_q.put(got)


def test_concurrent_claims_processes_never_double_claim(tmp_path):
    s = SQLiteJobStore.in_data_dir(tmp_path)
    ids = {s.submit(mk()).request_id for _ in range(30)}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(s.path, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [r for res in results for r in res]
    assert sorted(claimed) == sorted(ids)
    s.close()
