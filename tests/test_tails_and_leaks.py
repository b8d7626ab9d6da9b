"""Issue 10, item 10: what load and time must not grow. The history page costs a fixed number of
store queries whatever the number of queued requests on it; the embedded store does not keep the
connections of threads that ended; the HTTP metrics keep a bounded set of labels. (The submit tail and
the RSS over a soak are benchmark figures: benchmarks/bench_load.py, RELIABILITY.md.)"""

from __future__ import annotations

import os
import sqlite3
import threading

from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.endpoints import default_registry
from kleinserve.service.runtime import build_services
from kleinserve.service.settings import Settings
from kleinserve.service.sqlite_store import SQLiteJobStore

EP = "fal-ai/flux-2/klein/9b/base"
KEY = "key-a-secret"
A = {"Authorization": f"Key {KEY}"}
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}


class CountingStore(SQLiteJobStore):
    """The real SQLite store, with every SQL statement its connections run recorded (thread name, SQL)."""

    def __init__(self, *a, **kw):
        self.statements: list[tuple[str, str]] = []
        super().__init__(*a, **kw)

    def _conn(self) -> sqlite3.Connection:
        con = super()._conn()
        con.set_trace_callback(lambda sql: self.statements.append((threading.current_thread().name, sql)))
        return con

    def requests_statements(self) -> list[str]:
        """Statements run for HTTP requests (not by the background loops, threads named kleinserve-*)."""
        return [sql for name, sql in self.statements if not name.startswith("kleinserve-")]


def _history_cost(client: TestClient, store: CountingStore) -> tuple[int, list[dict]]:
    store.statements.clear()
    r = client.get("/api/requests", params={"limit": 200}, headers=A)
    assert r.status_code == 200
    return len(store.requests_statements()), r.json()["requests"]


def test_the_history_page_costs_the_same_queries_whatever_the_number_of_queued_rows(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", api_keys=[KEY], max_queue_depth=0, max_queued_per_key=0)
    store = CountingStore(tmp_path / "data" / "jobs.sqlite3")
    app = create_app(services=build_services(settings, default_registry(), store=store), start_worker=False)
    with TestClient(app) as c:
        def submit(n: int) -> list[str]:
            return [c.post(f"/queue/{EP}", json=BODY, headers=A).json()["request_id"] for _ in range(n)]

        first = submit(3)
        c.put(f"/queue/fal-ai/flux-2/requests/{first[0]}/cancel", headers=A)  # one COMPLETED row too
        few, rows_few = _history_cost(c, store)
        submit(40)
        many, rows_many = _history_cost(c, store)
        assert len(rows_few) == 3 and len(rows_many) == 43
        assert many == few, f"the history page ran {few} statements with 2 queued rows, {many} with 42"
        assert few == 2, few  # the page, then the positions of its queued rows
        # ... and the positions are still each row's own, in claim order.
        positions = {row["request_id"]: row.get("queue_position") for row in rows_many}
        assert positions[first[0]] is None  # cancelled: not queued
        for rid, pos in positions.items():
            assert pos == store.queue_position(rid)
        assert sorted(p for p in positions.values() if p is not None) == list(range(42))


def _fds_on(path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


def test_the_sqlite_store_closes_the_connections_of_threads_that_ended(tmp_path):
    """The API's thread pool retires threads idle for 10 s and starts new ones for the next burst:
    each thread's connection (a file descriptor, a page cache) must not outlive it."""
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    try:
        for _ in range(40):  # 40 short-lived threads, one store call each
            t = threading.Thread(target=store.queue_depth)
            t.start()
            t.join()
        store.queue_depth()  # one more, on a live thread
        assert _fds_on(path) <= 3, f"{_fds_on(path)} open descriptors on {path.name} after 40 threads ended"
        assert store.queue_depth() == {"IN_QUEUE": 0, "IN_PROGRESS": 0}  # this thread's connection still works
    finally:
        store.close()
    assert _fds_on(path) == 0


def test_http_metrics_keep_a_bounded_set_of_method_labels(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", api_keys=[KEY])
    with TestClient(create_app(settings, start_worker=False)) as c:
        for i in range(30):
            c.request(f"X-METHOD-{i}", "/no/such/route")
        text = c.get("/metrics").text
    assert "X-METHOD-" not in text
    assert 'method="OTHER"' in text


def test_submits_that_arrive_together_share_one_commit_and_fail_alone(tmp_path):
    """Group commit: while a write holds the store, the submits that arrive wait, then one commit (one
    fsync) stores all of them; each returns its own job, and one that cannot be stored (a duplicate
    request id) fails alone."""
    import time

    from kleinserve.service import jobs as J

    store = CountingStore(tmp_path / "jobs.sqlite3")
    try:
        first = store.submit(J.Job(request_id=J.new_request_id(), endpoint_id=EP, owner="o", input={}))
        jobs = [J.Job(request_id=J.new_request_id(), endpoint_id=EP, owner="o", input={"i": i}) for i in range(20)]
        jobs[7] = J.Job(request_id=first.request_id, endpoint_id=EP, owner="o", input={})  # a duplicate
        results: dict[int, object] = {}

        def submit(i: int) -> None:
            try:
                results[i] = store.submit(jobs[i])
            except Exception as exc:  # noqa: BLE001 - recorded for the assertions
                results[i] = exc

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
        with store._write_lock:  # another write in progress: the submits queue up behind it
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while len(store._pending) < 20:
                assert time.monotonic() < deadline, "the submits did not queue up"
                time.sleep(0.01)
            store.statements.clear()
        for t in threads:
            t.join(10)
        assert [sql for _, sql in store.statements].count("COMMIT") == 1
        assert isinstance(results[7], sqlite3.IntegrityError)
        stored = [results[i] for i in range(20) if i != 7]
        assert all(isinstance(j, J.Job) for j in stored)
        assert [j.request_id for j in stored] == [jobs[i].request_id for i in range(20) if i != 7]
        assert len({j.seq for j in stored}) == 19
        for j in stored:
            got = store.get(j.request_id)
            assert got.status == J.IN_QUEUE and got.seq == j.seq and got.input == j.input
        assert store.queue_depth() == {"IN_QUEUE": 20, "IN_PROGRESS": 0}
    finally:
        store.close()
