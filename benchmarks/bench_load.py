#!/usr/bin/env python
"""Tails and leaks under load (issue 10, item 10): submit latency at 50 concurrent clients, the
history page with thousands of queued requests, and the server's RSS over a 5,000-request soak.
RELIABILITY.md holds its figures. Everything runs on 127.0.0.1; every loop is bounded.

- submit: `kleinserve serve --model tiny` in a subprocess (the embedded SQLite store, one worker
  thread generating meanwhile, so submits contend with its per-step progress, log and event writes);
  `--clients` clients, each on its own keep-alive connection, submit back to back (closed loop: a
  flood); submit_paced: the same clients each submit once every `--interval` seconds (a steady
  offered load). The load generator is raw HTTP/1.1 on asyncio streams (see `RawConnection`).
- history: the API role without a worker (requests stay queued); `--queued` requests submitted by
  `--clients` clients back to back (the API's own submit latency, no generation competing for the
  CPU), then `GET /api/requests?limit=200` timed `--history-reads` times.
- soak: the tiny-model server again; `--soak` HTTP requests from 16 clients, a mix of what a client
  does (submit, status, result, the history page, cancel, a status stream); the server's RSS is read
  from /proc after a warm-up of `--warmup` requests (the model's first generations, caches filling)
  and every 500 requests of the `--soak` that follow, which come in bursts separated by `--gaps`
  quiet spells of 11 s (traffic is bursty: the server's thread pool retires idle threads meanwhile).

    python benchmarks/bench_load.py                  # this checkout, ~5 min on 2 shared cores
    python benchmarks/bench_load.py --src before=/path/to/old/src --src after=src --json out.json

It speaks HTTP only and starts the server from a src/ folder (default: this checkout's), so one run
can compare two trees on the same machine at the same time (submit rounds alternate between them):
on a shared CPU, compare figures of one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EP = "fal-ai/flux-2/klein/9b/base"
KEY = "load-key"
H = {"Authorization": f"Key {KEY}"}
BODY = {"prompt": "a red fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`kleinserve serve` from this checkout in a subprocess (its RSS is the server's alone)."""

    def __init__(self, data_dir: Path, *args: str, src: Path = ROOT / "src", ready: str = "/ready"):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = data_dir.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "kleinserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(data_dir), "--api-key", KEY, "--max-queue-depth", "0",
               "--max-queued-per-key", "0", "--log-level", "warning", *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log.read_text()[-3000:])
            try:
                if httpx.get(self.base + ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def _ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(_pct(xs, 50) * 1000, 1), "p90_ms": round(_pct(xs, 90) * 1000, 1),
            "p99_ms": round(_pct(xs, 99) * 1000, 1), "max_ms": round(max(xs) * 1000, 1),
            "mean_ms": round(statistics.fmean(xs) * 1000, 1)}


# ---------------------------------------------------------------------------------- load generator

class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams, sending prebuilt requests.

    The load generator must not be what is measured. httpx's AsyncClient spends about 2.4 ms of CPU
    per request with 50 connections in its pool: a 50-client flood kept the client process at 100 %
    of a core, and the tail it reported (GET /health p99 ~800 ms at ~420 requests/s) was its own
    event loop's queue, while the server was 90 % idle. This client costs ~0.05 ms per request, so
    on a shared 2-core machine the figures are the server's (GET /health: ~7,000 requests/s, p99
    ~14 ms). `--client httpx` measures with httpx instead, to show the difference."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base: str) -> RawConnection:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    def build(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in H.items())
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        return (head + "\r\n").encode() + data

    async def send(self, request: bytes) -> int:
        """Send one prebuilt request and read its whole response; return the status code."""
        self.writer.write(request)
        line = await self.reader.readline()
        if not line:  # the server closed the keep-alive connection
            raise ConnectionResetError("connection closed by the server")
        status = int(line.split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
        if chunked:
            while (size := int((await self.reader.readline()).split(b";")[0], 16)):
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        elif length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _load(base: str, method: str, path: str, body: dict | None, clients: int, total: int,
                interval: float = 0.0, client: str = "raw") -> tuple[list[float], dict, float]:
    """`clients` clients send `total` requests in all, each on its own keep-alive connection: back to
    back (closed loop: a flood), or each one every `interval` seconds (paced: a steady offered load
    of clients / interval per second). Returns the latencies, the statuses and the seconds taken."""
    lat: list[float] = []
    statuses: dict[str, int] = {}
    todo = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pooled = httpx.AsyncClient(base_url=base, headers=H, timeout=60, limits=limits) if client == "httpx" else None
    async with pooled if pooled is not None else contextlib.nullcontext() as hx:
        async def one(k: int) -> None:
            conn = await RawConnection.open(base) if client == "raw" else None
            request = conn.build(method, path, body) if conn else b""
            if interval:
                await asyncio.sleep(interval * k / clients)  # spread the clients' phases
            try:
                for _ in todo:
                    t = time.perf_counter()
                    try:
                        if conn:
                            key = str(await conn.send(request))
                        else:
                            key = str((await hx.request(method, path, json=body)).status_code)
                    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
                        key = type(exc).__name__
                        if conn:  # a connection in an unknown state: the next request gets a fresh one
                            conn.close()
                            conn = await RawConnection.open(base)
                    lat.append(time.perf_counter() - t)
                    statuses[key] = statuses.get(key, 0) + 1
                    if interval:
                        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t)))
            finally:
                if conn:
                    conn.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        took = time.perf_counter() - t0
    return lat, statuses, took


# ------------------------------------------------------------------------------------------- submit

SUBMIT = ("POST", f"/queue/{EP}", BODY)


def submit_latency(tmp: Path, clients: int, total: int, src: Path, interval: float, client: str) -> dict:
    with Serve(tmp / "submit", "--model", "tiny", src=src) as srv:
        asyncio.run(_load(srv.base, *SUBMIT, 4, 40))  # warm-up (first requests import, compile, cache)
        lat, statuses, took = asyncio.run(_load(srv.base, *SUBMIT, clients, total, interval, client))
        done = httpx.get(srv.base + "/metrics").text
    completed = sum(float(line.rsplit(" ", 1)[1]) for line in done.splitlines()
                    if line.startswith("kleinserve_jobs_completed_total{"))
    return {"clients": clients, "submits": total, "interval_s": interval, "seconds": round(took, 2),
            "submits_per_s": round(total / took, 1), "statuses": statuses, "latency": _ms(lat),
            "jobs_completed_meanwhile": int(completed), "_latencies": lat}


# ------------------------------------------------------------------------------------------ history

def history(tmp: Path, queued: int, reads: int, src: Path, clients: int, client: str) -> dict:
    # A model that cannot load would make submits answer 503: run the API role with no worker
    # instead (requests stay queued in the shared store).
    with Serve(tmp / "history", "--role", "api", src=src, ready="/health") as srv:
        lat, statuses, took = asyncio.run(_load(srv.base, *SUBMIT, clients, queued, 0.0, client))  # the API alone
        health, _, health_took = asyncio.run(_load(srv.base, "GET", "/health", None, clients, queued, 0.0, client))
        times = []
        with httpx.Client(base_url=srv.base, headers=H, timeout=60) as c:
            c.get("/api/requests", params={"limit": 200}).raise_for_status()
            for _ in range(reads):
                t = time.perf_counter()
                r = c.get("/api/requests", params={"limit": 200})
                times.append(time.perf_counter() - t)
                r.raise_for_status()
            rows = r.json()["requests"]
    return {"queued": queued, "submit_statuses": statuses,
            "api_only_submit": {"clients": clients, "submits_per_s": round(queued / took, 1), "latency": _ms(lat)},
            "health_reference": {"clients": clients, "requests_per_s": round(queued / health_took, 1),
                                 "latency": _ms(health)},
            "page_rows": len(rows),
            "positions": [rows[0].get("queue_position"), rows[-1].get("queue_position")],
            "history_limit_200": _ms(times)}


# --------------------------------------------------------------------------------------------- soak

async def _soak(srv: Serve, total: int, warmup: int, clients: int, gaps: int, gap_s: float) -> dict:
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    ids: list[str] = []
    rss: dict[str, float] = {"start": srv.rss_mb()}
    n = 0
    samples: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=srv.base, headers=H, timeout=60) as c:
        async def one(i: int) -> None:
            kind = ("submit", "status", "result", "status", "history", "submit", "status", "cancel",
                    "stream", "result")[i % 10]
            if kind != "submit" and not ids:
                kind = "submit"
            rid = ids[(i * 7919) % len(ids)] if ids else ""
            q = f"/queue/fal-ai/flux-2/requests/{rid}"
            try:
                if kind == "submit":
                    r = await c.post(f"/queue/{EP}", json=BODY)
                    if r.status_code == 200:
                        ids.append(r.json()["request_id"])
                elif kind == "status":
                    r = await c.get(q + "/status", params={"logs": "1"})
                elif kind == "result":
                    r = await c.get(q)
                elif kind == "history":
                    r = await c.get("/api/requests", params={"limit": 50})
                elif kind == "cancel":
                    r = await c.put(q + "/cancel")
                else:  # a status stream, read to its end or for at most 2 s
                    async with c.stream("GET", q + "/status/stream") as r:
                        try:
                            async with asyncio.timeout(2.0):
                                async for _ in r.aiter_lines():
                                    pass
                        except TimeoutError:
                            pass
                key = f"{kind} {r.status_code}"
                if r.status_code >= 500:
                    errors[key] = errors.get(key, 0) + 1
            except httpx.HTTPError as exc:
                key = f"{kind} {type(exc).__name__}"
                errors[key] = errors.get(key, 0) + 1
            counts[key] = counts.get(key, 0) + 1

        async def client() -> None:
            nonlocal n
            for i in it:
                await one(i)
                n += 1
                if n % 500 == 0:
                    samples.append((n - warmup, round(srv.rss_mb(), 1)))

        it = iter(range(warmup))
        await asyncio.gather(*(client() for _ in range(clients)))
        rss["after_warmup"] = srv.rss_mb()
        bounds = [warmup + total * k // (gaps + 1) for k in range(gaps + 2)]
        for k in range(gaps + 1):
            if k:  # a quiet spell: the server's thread pool retires its idle threads (after 10 s)
                await asyncio.sleep(gap_s)
            it = iter(range(bounds[k], bounds[k + 1]))
            await asyncio.gather(*(client() for _ in range(clients)))
    rss["end"] = srv.rss_mb()
    return {"counts": dict(sorted(counts.items())), "server_errors": errors, "rss_samples_mb": samples,
            "rss_mb": {k: round(v, 1) for k, v in rss.items()}}


def soak(tmp: Path, total: int, warmup: int, gaps: int, src: Path, gap_s: float = 11.0) -> dict:
    with Serve(tmp / "soak", "--model", "tiny", src=src) as srv:
        t0 = time.perf_counter()
        out = asyncio.run(_soak(srv, total, warmup, 16, gaps, gap_s))
        out["warmup_requests"] = warmup
        out["idle_gaps"] = f"{gaps} x {gap_s:g} s"
        out["requests"] = total
        out["seconds"] = round(time.perf_counter() - t0, 1)
    r = out["rss_mb"]
    out["rss_growth_after_warmup_pct"] = round(100 * (r["end"] - r["after_warmup"]) / r["after_warmup"], 1)
    return out


# --------------------------------------------------------------------------------------------- main

def _table(label: str, results: dict) -> str:
    rows = []
    for name in ("submit", "submit_paced"):
        if name not in results:
            continue
        s = results[name]
        lt = s["latency"]
        how = f"each every {s['interval_s']:g} s" if s["interval_s"] else "back to back"
        rows.append(f"[{label}] {name} ({s['clients']} clients {how}, {s['submits']} submits x {len(s['rounds'])} "
                    f"rounds, tiny model generating): p50 {lt['p50_ms']} ms, p99 {lt['p99_ms']} ms, max "
                    f"{lt['max_ms']} ms; per round p99 " + ", ".join(f"{r['latency']['p99_ms']}" for r in s["rounds"])
                    + " ms, " + ", ".join(f"{r['submits_per_s']}" for r in s["rounds"]) + " submits/s, jobs done "
                    + ", ".join(f"{r['jobs_completed_meanwhile']}" for r in s["rounds"]))
    if "history" in results:
        h = results["history"]
        lt = h["history_limit_200"]
        rows.append(f"[{label}] history limit=200 with {h['queued']} queued: p50 {lt['p50_ms']} ms, "
                    f"p99 {lt['p99_ms']} ms ({lt['n']} reads)")
        a = h["api_only_submit"]
        rows.append(f"[{label}] API-only submits ({a['clients']} clients back to back, no model): p50 "
                    f"{a['latency']['p50_ms']} ms, p99 {a['latency']['p99_ms']} ms, max {a['latency']['max_ms']} ms, "
                    f"{a['submits_per_s']} submits/s")
        a = h["health_reference"]
        rows.append(f"[{label}] reference: GET /health ({a['clients']} clients back to back): p50 "
                    f"{a['latency']['p50_ms']} ms, p99 {a['latency']['p99_ms']} ms, max {a['latency']['max_ms']} ms, "
                    f"{a['requests_per_s']} requests/s")
    if "soak" in results:
        k = results["soak"]
        rows.append(f"[{label}] soak {k['requests']} requests (+{k['warmup_requests']} warm-up, {k['idle_gaps']} "
                    f"quiet) in {k['seconds']} s: RSS {k['rss_mb']} MB, growth after warm-up "
                    f"{k['rss_growth_after_warmup_pct']}%, 5xx/transport errors {k['server_errors']}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="submit runs per source tree (alternating)")
    ap.add_argument("--queued", type=int, default=3000)
    ap.add_argument("--history-reads", type=int, default=20)
    ap.add_argument("--soak", type=int, default=5000, help="requests measured (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1000, help="soak requests before the first RSS reading")
    ap.add_argument("--gaps", type=int, default=4, help="quiet spells of 11 s during the soak")
    ap.add_argument("--src", action="append", metavar="LABEL=DIR",
                    help="run the server from this src/ folder (repeat to compare trees in one run, "
                         "alternating; default: this checkout's)")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="submit_paced: each client submits once every this many seconds")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator for the submit and /health floods: raw keep-alive HTTP/1.1 on "
                         "asyncio streams (default; ~0.05 ms of CPU per request) or httpx's AsyncClient "
                         "(~2.4 ms per request: with 50 clients it saturates a core and its own queue "
                         "becomes the measured tail)")
    ap.add_argument("--only", choices=["submit", "submit_paced", "history", "soak"], action="append")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only or ["submit", "submit_paced", "history", "soak"])
    trees = [(x.split("=", 1)[0], Path(x.split("=", 1)[1]).resolve()) for x in (args.src or [f"this={ROOT / 'src'}"])]
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg_at_start": os.getloadavg()}, "client": args.client,
                     "trees": {label: str(src) for label, src in trees}}
    per: dict = {label: {} for label, _ in trees}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, interval in (("submit", 0.0), ("submit_paced", args.interval)):
            if name not in only:
                continue
            runs: dict = {label: [] for label, _ in trees}
            for _ in range(args.rounds):
                for label, src in trees:
                    runs[label].append(submit_latency(tmp / label, args.clients, args.submits, src, interval,
                                                     args.client))
            for label, rs in runs.items():
                pooled = [x for r in rs for x in r.pop("_latencies")]
                per[label][name] = {"clients": args.clients, "submits": args.submits, "interval_s": interval,
                                    "latency": _ms(pooled), "rounds": rs}
        for label, src in trees:
            if "history" in only:
                per[label]["history"] = history(tmp / label, args.queued, args.history_reads, src, args.clients,
                                                args.client)
        for label, src in trees:
            if "soak" in only:
                per[label]["soak"] = soak(tmp / label, args.soak, args.warmup, args.gaps, src)
    results.update(per)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    print()
    for label in per:
        print(_table(label, per[label]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
