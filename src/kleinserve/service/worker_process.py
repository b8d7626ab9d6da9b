"""`kleinserve worker`: one worker process on one device — for a fleet, on any host.

    kleinserve worker --store postgresql://ks@db:5432/ks --storage s3://bucket/prefix --device cuda:0
    kleinserve worker ... --model 9b-base=black-forest-labs/FLUX.2-klein-base-9B --model 9b=/models/klein-9b

It loads the model(s) — `--model` as `serve` takes it: one spec (the 9B base family) or FAMILY=SPEC per
klein family, all on this device under `--model-memory` — registers one worker per family in the store
(so /ready of every API replica counts each endpoint's workers), claims jobs of its families' endpoints
only, and runs them. It serves no API; with `--metrics-port` it serves its Prometheus metrics (jobs,
steps, inference time, GPU memory: what only the process that generates can count) on `--host`.
`kleinserve serve --devices ...` starts these same processes as children (service/supervisor.py).

SIGTERM or SIGINT: it stops claiming, lets the running request finish within --shutdown-grace, then
releases it to the queue (no attempt counted) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Optional

from .logging import configure_logging
from .runtime import Runtime, build_services
from .settings import Settings, add_arguments

log = logging.getLogger("kleinserve.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kleinserve worker",
                                     description="Run one worker process: claims jobs from --store and runs them "
                                                 "on --device.")
    add_arguments(parser, command="worker")
    parser.add_argument("--name", default="w0", help="A name for this worker in logs and its worker id.")
    return parser


def run_worker(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_args(args, command="worker")
    except ValueError as exc:
        print(f"kleinserve worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(fmt=settings.log_format, level=settings.log_level.upper())
    if settings.threads:
        from kleinserve.engine.models import set_threads

        set_threads(settings.threads)
    from kleinserve.endpoints import default_registry

    try:
        services = build_services(settings, default_registry(settings.model_specs))
    except Exception as exc:  # the store or storage cannot be opened: say which and why
        print(f"kleinserve worker: cannot open the store or storage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    metrics_server = None
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from . import metrics

        try:  # the same registry as the API's /metrics
            metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host,
                                                  registry=metrics.REGISTRY)
            log.info("worker %s: Prometheus metrics on http://%s:%d/metrics", args.name, settings.host,
                     settings.metrics_port)
        except OSError as exc:  # a busy port must not take the device out of service: run without
            log.error("worker %s: --metrics-port %d: cannot listen on %s:%d (%s): this worker serves no "
                      "metrics", args.name, settings.metrics_port, settings.host, settings.metrics_port,
                      exc.strerror or exc)
    runtime = Runtime(services, role="worker", load_engine=True, worker_name=args.name)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        log.info("worker %s: %s received, stopping", args.name, signal.Signals(signum).name)
        runtime.begin_shutdown()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s: store %s, device %s, model %s", args.name, services.store.describe(),
             settings.device or "auto", settings.model)
    runtime.start()
    try:
        while not stop.wait(0.5):
            if runtime.engine_error:
                log.error("worker %s: the model could not be loaded: %s", args.name, runtime.engine_error)
                return 1
    finally:
        runtime.stop()
        services.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0
