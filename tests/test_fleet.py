"""The kill matrix: two API replicas and two worker processes (real `kleinserve serve --role api` and
`kleinserve worker` subprocesses, tiny model, one thread each) on a real PostgreSQL and a real S3
server (Ceph RGW), killed in the ways a fleet dies. After every case every accepted request has exactly
one terminal state, COMPLETED with its result, and its images download through either replica.

Lease: 4 s (--worker-stale-after), so a worker that stops answering loses its job within seconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx
import pytest
from fastapi import FastAPI, Request

from fleet import (
    EP,
    QUICK,
    SLOW,
    Fleet,
    H,
    check_exactly_once,
    pid_of_connection,
    status,
    submit,
    wait_done,
    wait_progress,
)
from kleinserve.service.store import EV_STATUS, open_store
from s3_server import BUCKET
from service_helpers import serve_app

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def fleet(pg_cluster, s3_server, tmp_path_factory):
    if pg_cluster.proc is None or pg_cluster.proc.poll() is not None:
        pg_cluster.start()
    if not s3_server.rgw_answers():
        s3_server.start_rgw()
    name = pg_cluster.create_database()
    url = pg_cluster.url(name)
    # AWS_* (endpoint, keys, region) reach the processes through the environment, as in a deployment
    f = Fleet(tmp_path_factory.mktemp("fleet"), url, storage_url=f"s3://{BUCKET}/fleet-{uuid.uuid4().hex[:8]}")
    store = open_store(url)
    try:
        f.add_api("api-a")
        f.add_api("api-b")
        f.add_worker("w1")
        f.add_worker("w2")
        f.wait_workers(2)
        f.store = store
        yield f
    finally:
        f.stop()
        store.close()
        pg_cluster.drop_database(name)


def bases(fleet) -> list[str]:
    return [a.base_url for a in fleet.apis if a.alive()]


def completions(store, rid: str) -> int:
    """How many times the store's event log says `rid` became COMPLETED."""
    n, cursor = 0, 0
    while True:
        events = store.wait_events(cursor, 0.0)
        if not events:
            return n
        cursor = events[-1].seq
        n += sum(1 for e in events if e.request_id == rid and e.kind == EV_STATUS and e.status == "COMPLETED")


def running_on(fleet, rid: str):
    """The worker process running `rid` (from the job's worker id: host:pid:...)."""
    job = fleet.store.get(rid)
    pid = int(job.worker_id.split(":")[1])
    return next(w for w in fleet.workers if w.alive() and w.pid == pid), job


def test_sigkill_a_worker_mid_step_the_other_finishes_the_job(fleet):
    a, b = bases(fleet)
    rid = submit(a, SLOW)
    quick = [submit(b, QUICK) for _ in range(2)]
    wait_progress(b, rid, 2)
    victim, job = running_on(fleet, rid)
    assert job.attempts == 1
    victim.kill()
    done = wait_done([a, b], [rid, *quick])
    job = fleet.store.get(rid)
    assert job.attempts == 2 and job.error is None, job
    assert completions(fleet.store, rid) == 1
    check_exactly_once(fleet.store, [a, b], [rid, *quick])
    assert all(st["status"] == "COMPLETED" for st in done.values())
    fleet.restart(victim)
    fleet.wait_workers(2)


def test_a_paused_worker_loses_its_lease_and_its_late_writes_change_nothing(fleet):
    """SIGSTOP past the lease: the sweeper re-queues the job, the other worker runs it (attempt 2);
    SIGCONT: the first worker's late progress and completion are refused (fenced)."""
    a, b = bases(fleet)
    rid = submit(a, SLOW)
    wait_progress(a, rid, 2)
    victim, job = running_on(fleet, rid)
    victim.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while fleet.store.get(rid).attempts < 2:  # re-queued after 4 s, then claimed by the other
            assert time.monotonic() < deadline, fleet.logs()
            time.sleep(0.1)
    finally:
        victim.signal(signal.SIGCONT)
    wait_done([a, b], [rid])
    job = fleet.store.get(rid)
    assert job.attempts == 2 and job.error is None
    deadline = time.monotonic() + 60
    while "no longer holds it" not in victim.log_text():
        assert time.monotonic() < deadline, victim.log_text()[-3000:]
        time.sleep(0.2)
    assert completions(fleet.store, rid) == 1
    check_exactly_once(fleet.store, [a, b], [rid])


def test_sigterm_a_worker_releases_its_job_without_counting_an_attempt(fleet):
    a, b = bases(fleet)
    w1, w2 = fleet.workers
    rid = submit(a, {**SLOW, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50})
    wait_progress(a, rid, 2)
    victim, job = running_on(fleet, rid)
    other = w2 if victim is w1 else w1
    other.signal(signal.SIGSTOP)  # so the released job waits in the queue where we can see it
    try:
        victim.proc.send_signal(signal.SIGTERM)
        # --shutdown-grace 0s (the fleet's): the job (50 steps at 512x512, seconds) goes back to the
        # queue at its next step
        assert victim.proc.wait(90) == 0, victim.log_text()[-3000:]
        job = fleet.store.get(rid)
        assert job.status == "IN_QUEUE" and job.attempts == 0, job  # given back, not counted
        assert "released back to the queue" in victim.log_text()
    finally:
        other.signal(signal.SIGCONT)
        if not victim.alive():
            fleet.restart(victim)
    wait_done([a, b], [rid])
    assert fleet.store.get(rid).attempts == 1
    check_exactly_once(fleet.store, [a, b], [rid])
    fleet.wait_workers(2)


def test_sigkill_the_replica_holding_a_stream_the_client_finishes_on_the_other(fleet):
    a_proc, b_proc = fleet.apis
    a, b = a_proc.base_url, b_proc.base_url
    seen: list[dict] = []
    rid_box: dict[str, str] = {}

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{a}/{EP}/stream", json=SLOW, headers=H, timeout=60) as r:
                rid_box["rid"] = r.headers["x-fal-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        seen.append(json.loads(line[5:]))
        except httpx.HTTPError:
            pass  # the replica died under us

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not any(e.get("step") for e in seen):
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(0.05)
    a_proc.kill()
    t.join(30)
    rid = rid_box["rid"]
    # The client carries on with the request id on the other replica: its status stream to the end.
    final = None
    with httpx.stream("GET", f"{b}/queue/fal-ai/flux-2/requests/{rid}/status/stream", headers=H,
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                final = json.loads(line[5:])
    assert final is not None and final["status"] == "COMPLETED"
    # The job was not cancelled by the dying replica: it completed with its images.
    fleet.restart(a_proc)
    check_exactly_once(fleet.store, bases(fleet), [rid])


def test_sigkill_all_of_postgres_no_acknowledged_submit_is_lost(fleet, pg_cluster):
    a, b = bases(fleet)
    acked: list[str] = []
    acked += [submit(a, QUICK) for _ in range(3)]
    acked.append(submit(b, SLOW))
    wait_progress(b, acked[-1], 1)
    pg_cluster.kill_all()
    # while it is down, submits fail cleanly (an error status, never an acknowledged id that is lost)
    r = httpx.post(f"{a}/queue/{EP}", json=QUICK, headers=H, timeout=60)
    assert r.status_code >= 500 and "request_id" not in r.json()
    pg_cluster.restart_after_kill()
    deadline = time.monotonic() + 120
    while True:  # every process reconnects: both replicas accept submits again
        try:
            acked += [submit(a, QUICK), submit(b, QUICK)]
            break
        except AssertionError:
            assert time.monotonic() < deadline, fleet.logs()
            time.sleep(0.5)
    wait_done([a, b], acked, timeout=400)
    check_exactly_once(fleet.store, [a, b], acked)
    fleet.wait_workers(2)


def test_every_status_seen_through_either_replica_agrees(fleet):
    """Queue positions and state are fleet-wide: both replicas report the same for the same id."""
    a, b = bases(fleet)
    rids = [submit(a, QUICK) for _ in range(3)]
    for rid in rids:
        sa, sb = status(a, rid), status(b, rid)
        assert sa["request_id"] == sb["request_id"] == rid
    wait_done([a, b], rids)
    for rid in rids:
        assert status(a, rid)["status"] == status(b, rid)["status"] == "COMPLETED"
    check_exactly_once(fleet.store, [a, b], rids)


def test_sigkill_during_a_webhook_delivery_it_is_delivered_again_with_the_same_body(fleet):
    """The process delivering a webhook dies mid-request: another process delivers it again after the
    delivery's lease; at least once, same signed body."""

    got: list[tuple[int, bytes, dict]] = []
    first = threading.Event()
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request):
        body = await request.body()
        got.append((request.client.port, body, dict(request.headers)))
        if len(got) == 1:
            first.set()
            await asyncio_sleep(60)  # the first delivery hangs until its sender is killed
        return {"ok": True}

    a, b = bases(fleet)
    with serve_app(app) as rx:
        rid = submit(a, QUICK, params={"fal_webhook": f"{rx.base_url}/hook"})
        assert first.wait(120), fleet.logs()
        sender = pid_of_connection(got[0][0], [*fleet.apis, *fleet.workers])
        assert sender is not None, "no fleet process holds the delivery's connection"
        sender.kill()
        deadline = time.monotonic() + 120
        while len(got) < 2:  # the delivery's lease (timeout + 10 s) runs out, then another process sends it
            assert time.monotonic() < deadline, fleet.logs()
            time.sleep(0.2)
        fleet.restart(sender)
    assert got[1][1] == got[0][1]  # the same body (and signature headers of the same content)
    assert got[1][2]["x-fal-webhook-request-id"] == rid
    job = fleet.store.get(rid)
    deadline = time.monotonic() + 30
    while job.webhook_state != "delivered":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = fleet.store.get(rid)
    check_exactly_once(fleet.store, bases(fleet), [rid])
    if sender in fleet.workers:
        fleet.wait_workers(2)


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_progress_previews_and_cancel_cross_processes(fleet):
    """A client streaming on replica B sees the typed progress and previews of a job run by a worker
    process; a cancel sent to replica A reaches that worker before its next steps; both replicas serve
    the same JWKS (the signing key is the store's)."""
    a, b = bases(fleet)
    events: list[dict] = []
    with httpx.stream("POST", f"{b}/{EP}/stream", json={**SLOW, "num_inference_steps": 12}, headers=H,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    steps = [e["step"] for e in events if e.get("step")]
    assert steps and steps[-1] == 12 and steps == sorted(steps)
    assert any(str(e.get("preview", "")).startswith("data:image/") for e in events)  # made: someone watched
    assert "images" in events[-1]

    rid = submit(b, {**SLOW, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50})
    wait_progress(b, rid, 2)
    r = httpx.put(f"{a}/queue/fal-ai/flux-2/requests/{rid}/cancel", headers=H, timeout=30)
    assert r.status_code == 202
    t0 = time.monotonic()
    done = wait_done([a, b], [rid])[rid]
    assert done["error_type"] == "cancelled" and time.monotonic() - t0 < 20
    assert fleet.store.get(rid).progress_step < 50

    jwks = [httpx.get(f"{base}/.well-known/jwks.json", timeout=10).json() for base in (a, b)]
    assert jwks[0] == jwks[1] and jwks[0]["keys"]


def test_sigkill_radosgw_downloads_answer_503_then_recover(fleet, s3_server):
    """The object store dies: downloads through either replica answer 503 with Retry-After (never a
    500 or a hang), an upload fails cleanly; once it is back, everything works again without a
    restart, and a request that finished meanwhile waited for it rather than failing."""
    a, b = bases(fleet)
    rid = submit(a, QUICK)
    wait_done([a, b], [rid])
    url = httpx.get(f"{a}/queue/fal-ai/flux-2/requests/{rid}", headers=H, timeout=30).json()["images"][0]["url"]
    path = url.split("/files/", 1)[1]
    s3_server.kill_rgw()
    try:
        for base in (a, b):
            r = httpx.get(f"{base}/files/{path}", timeout=60)
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        up = httpx.post(f"{a}/files/upload", content=b"\x89PNG\r\n\x1a\n" + b"0" * 64,
                        headers={**H, "Content-Type": "image/png", "X-Fal-File-Name": "x.png"}, timeout=60)
        assert up.status_code == 503, up.text
        during = submit(b, QUICK)  # runs while the store is down: its images wait for it
        wait_progress(b, during, 1)
    finally:
        s3_server.start_rgw()
    deadline = time.monotonic() + 60
    while httpx.get(f"{a}/files/{path}", timeout=60).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert httpx.get(f"{b}/files/{path}", timeout=60).content[:4] == b"\x89PNG"
    wait_done([a, b], [during], timeout=200)
    check_exactly_once(fleet.store, [a, b], [rid, during])
