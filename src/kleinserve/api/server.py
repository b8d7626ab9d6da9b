"""`kleinserve serve`: the flags and the uvicorn startup.

    kleinserve serve --model auto --api-key "$KEY" --ssl-certfile cert.pem --ssl-keyfile key.pem
    python -m kleinserve.api.server ...        (the same, without the CLI wrapper)

The HTTP server comes up at once (/health answers); the model loads in the background and /ready
turns 200 when it is in memory. Every flag has a KLEINSERVE_* env var fallback (see settings.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import uvicorn

from kleinserve.service.auth import AuthConfigError
from kleinserve.service.logging import configure_logging, uvicorn_log_config
from kleinserve.service.settings import Settings, add_arguments
from kleinserve.service.store import redact_url

log = logging.getLogger("kleinserve.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `serve` flags (each with a KLEINSERVE_* env fallback)."""
    add_arguments(parser)


def _configure_logging(settings: Settings) -> dict:
    """Configures our log format; returns the matching uvicorn log_config."""
    configure_logging(fmt=settings.log_format, level=settings.log_level.upper())
    return uvicorn_log_config(settings.log_format, settings.log_level.upper())


def _banner(settings: Settings) -> str:
    scheme = "https" if settings.tls else "http"
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = settings.public_url or f"{scheme}://{host}:{settings.port}"
    if settings.role == "api":
        workers = "none here (role api): run `kleinserve worker --store ...` on the GPU hosts"
    elif settings.devices:
        workers = f"one process per device: {', '.join(settings.devices)}"
    else:
        workers = "one, in this process"
    lines = [
        f"kleinserve: serving on {scheme}://{settings.host}:{settings.port}  (data: {settings.data_dir})",
        f"  queue API : {base}/queue/<endpoint id>     run API: {base}/<endpoint id>",
        f"  docs      : {base}/docs                    ready: {base}/ready",
        f"  store     : {redact_url(settings.store_url)}",
        f"  workers   : {workers}",
    ]
    if settings.role != "api":
        lines.append(f"  model     : {settings.model} (loading in the background)")
    lines += [
        "  auth      : " + ("OFF (--no-auth): anyone who can reach this port can use it"
                            if settings.no_auth else f"{len(settings.api_keys)} API key(s)"),
    ]
    if not settings.tls:
        lines.append("  note      : no TLS. The fal clients only speak https: pass --ssl-certfile/--ssl-keyfile "
                     "or put a TLS proxy in front.")
    return "\n".join(lines)


TINY_BANNER = "\n".join([
    "#" * 78,
    "#  WARNING: --model tiny serves a TINY RANDOM MODEL. Its images are NOISE.",
    "#  It exists for tests and demos of the API; it is NOT FLUX.2 [klein].",
    "#" * 78,
])


class GracefulServer(uvicorn.Server):
    """uvicorn's Server that tells the app's runtime when a stop signal arrives, before uvicorn starts
    draining connections (ServiceRuntime.begin_shutdown: claim nothing new, give running requests
    --shutdown-grace, then answer waiting sync runs and streams)."""

    def handle_exit(self, sig, frame) -> None:
        runtime = getattr(getattr(self.config.app, "state", None), "runtime", None)
        if runtime is not None:
            runtime.begin_shutdown()
        super().handle_exit(sig, frame)


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        print(f"kleinserve serve: {exc}", file=sys.stderr)
        return 2
    log_config = _configure_logging(settings)
    try:
        from .app import create_app

        app = create_app(settings, load_engine=True)
    except AuthConfigError as exc:
        print(f"kleinserve serve: {exc}", file=sys.stderr)
        return 2

    if settings.model.strip().lower() == "tiny":
        print(TINY_BANNER, file=sys.stderr, flush=True)
    print(_banner(settings), file=sys.stderr, flush=True)
    # uvicorn waits for open requests this long: the shutdown grace, plus time for the waiting sync
    # runs and streams to answer once it is over.
    kwargs = dict(host=settings.host, port=settings.port, ssl_certfile=settings.ssl_certfile,
                  ssl_keyfile=settings.ssl_keyfile, proxy_headers=True,
                  timeout_graceful_shutdown=int(settings.shutdown_grace) + 10,
                  lifespan="on", log_level=settings.log_level.lower())
    kwargs["log_config"] = log_config
    server = GracefulServer(uvicorn.Config(app, **kwargs))
    server.run()
    return 0 if server.started else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kleinserve serve", description="Run the HTTP service.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
