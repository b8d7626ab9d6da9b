"""The job state machine, `jobs.apply` (no store, no model). The stores are checked on SQLite and
PostgreSQL by tests/test_store_conformance.py."""

from __future__ import annotations

import time

import pytest

from kleinserve.service import jobs as J
from kleinserve.service.jobs import InvalidTransition, Job, job_error

EP = "fal-ai/flux-2/klein/9b/base"


def mk(owner="k_a", priority="normal", deadline=None, webhook_url=None, **kw) -> Job:
    return Job(request_id=J.new_request_id(), endpoint_id=EP, owner=owner, input={"prompt": "x", "seed": 1},
               priority=priority, deadline=deadline, webhook_url=webhook_url, **kw)


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


def test_claim_takes_a_lease_and_resets_the_attempts_progress():
    j = mk()
    j.progress_step, j.progress_total = 3, 4  # left over from an attempt that crashed
    c = J.apply(j, "claim", worker_id="w", lease_seconds=30, now=1000.0)
    assert (c.started_at, c.heartbeat_at, c.lease_expires_at) == (1000.0, 1000.0, 1030.0)
    assert (c.progress_step, c.progress_total, c.attempts) == (0, 0, 1)
    assert J.apply(mk(), "claim", worker_id="w", now=0.0).lease_expires_at == 120.0  # the default lease
    done = J.apply(c, "complete_ok", result={}, now=1010.0)
    assert done.lease_expires_at is None and done.worker_id is None
    for event in ("requeue", "release"):
        back = J.apply(c, event, now=1010.0)
        assert back.lease_expires_at is None and back.worker_id is None and back.status == J.IN_QUEUE


def test_complete_ok_after_a_recorded_cancel_finishes_cancelled():
    running = J.apply(mk(webhook_url="https://example.com/h"), "claim", worker_id="w")
    asked = J.apply(running, "request_cancel")
    done = J.apply(asked, "complete_ok", result={"images": [{"url": "x"}]})
    assert done.status == J.COMPLETED and done.result is None and done.error_type == J.ERR_CANCELLED
    assert done.error["status_code"] == J.CANCELLED_STATUS_CODE and done.webhook_state == J.WEBHOOK_PENDING
    # an error outcome stays what the worker said it was
    err = J.apply(asked, "complete_error", error=job_error("oom", "internal", 500))
    assert err.error_type == "internal"
    # without a cancel the result is kept
    assert J.apply(running, "complete_ok", result={"images": []}).result == {"images": []}
    # a released job that was asked to cancel is not queued again
    rel = J.apply(asked, "release")
    assert rel.status == J.COMPLETED and rel.error_type == J.ERR_CANCELLED
