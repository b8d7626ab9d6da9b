"""`kleinserve serve`: the flags and the uvicorn startup.

    kleinserve serve --model auto --api-key "$KEY" --ssl-certfile cert.pem --ssl-keyfile key.pem
    python -m kleinserve.api.server ...        (the same, without the CLI wrapper)

The HTTP server comes up at once (/health answers); the model loads in the background and /ready
turns 200 when it is in memory. Every flag has a KLEINSERVE_* env var fallback (see settings.py).
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any, Optional

import uvicorn

from kleinserve.service.auth import AuthConfigError, FileKeyStore, KeyStore, first_start_key
from kleinserve.service.logging import configure_logging, uvicorn_log_config
from kleinserve.service.settings import Settings, add_arguments
from kleinserve.service.store import redact_url
from kleinserve.service.tls import SelfSignedCert, ensure_self_signed

log = logging.getLogger("kleinserve.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `serve` flags (each with a KLEINSERVE_* env fallback)."""
    add_arguments(parser)


def _configure_logging(settings: Settings) -> dict:
    """Configures our log format; returns the matching uvicorn log_config."""
    configure_logging(fmt=settings.log_format, level=settings.log_level.upper())
    return uvicorn_log_config(settings.log_format, settings.log_level.upper())


def _auth_lines(settings: Settings, store: Optional[KeyStore], new_key: Optional[str], base: str) -> list[str]:
    """The banner's auth part: what a user needs to make the first request."""
    if settings.no_auth:
        return ["  auth      : OFF (--no-auth): anyone who can reach this port can use it"]
    stored = store.list() if store is not None else []
    if new_key:
        return [
            f"  auth      : created an API key (only its hash is kept, in {store.location if store else '?'}):",
            "",
            f"                {new_key}",
            "",
            "              It is shown only now. Use it as",
            f"                playground : paste it into the key field of {base}/",
            f"                clients    : export FAL_KEY={new_key}",
            f"                curl       : -H 'Authorization: Key {new_key}'",
            "              More keys: kleinserve keys create | list | revoke ID",
        ]
    parts = []
    if settings.api_keys:
        parts.append(f"{len(settings.api_keys)} from --api-key/KLEINSERVE_API_KEYS")
    if stored:
        hints = ", ".join(r.hint for r in stored[:3]) + (", ..." if len(stored) > 3 else "")
        parts.append(f"{len(stored)} stored ({hints}) in {store.location if store else '?'}")
    lines = ["  auth      : API keys: " + "; ".join(parts)]
    if stored and not settings.api_keys:
        lines.append("              lost the key? `kleinserve keys create` makes a new one (and "
                     "`kleinserve keys revoke ID` retires the old)")
    return lines


def _banner(settings: Settings, store: Optional[KeyStore] = None, new_key: Optional[str] = None,
            cert: Optional[SelfSignedCert] = None) -> str:
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
        f"  playground: {base}/",
        f"  queue API : {base}/queue/<endpoint id>     run API: {base}/<endpoint id>",
        f"  docs      : {base}/docs                    ready: {base}/ready",
        f"  store     : {redact_url(settings.store_url)}",
        f"  workers   : {workers}",
    ]
    if settings.role != "api":
        lines.append(f"  model     : {settings.model} (loading in the background)")
    lines += [
        *_auth_lines(settings, store, new_key, base),
    ]
    if cert is not None:
        path = cert.cert_path.resolve()
        lines += [
            f"  TLS       : self-signed certificate {'made' if cert.created else 'reused'}: {path}",
            f"              for {', '.join(cert.hosts)}. Trust it in the clients:",
            f"                Python (fal-client, openai, httpx): export SSL_CERT_FILE={path}",
            f"                Node (@fal-ai/client)            : export NODE_EXTRA_CA_CERTS={path}",
        ]
    if not settings.tls:
        lines.append("  note      : no TLS. The fal clients only speak https: pass --tls-self-signed (or "
                     "--ssl-certfile/--ssl-keyfile) or put a TLS proxy in front.")
    return "\n".join(lines)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now, so a busy port is reported before anything claims to serve.
    Raises OSError with a message that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"port {port} on {host} is already in use (another kleinserve?): stop "
                                     f"that process or pass --port N") from None
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


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
    store: Optional[KeyStore] = None
    new_key: Optional[str] = None
    cert: Optional[SelfSignedCert] = None
    try:
        if settings.tls_self_signed:
            cert = ensure_self_signed(settings.data_dir, settings.host)
            settings.ssl_certfile, settings.ssl_keyfile = str(cert.cert_path), str(cert.key_path)
        if not settings.no_auth:
            store = FileKeyStore.in_data_dir(settings.data_dir)
            if not settings.api_keys:  # neither keys nor --no-auth: make one on the first start
                new_key = first_start_key(store)
        from .app import create_app

        app = create_app(settings, load_engine=True)
    except (AuthConfigError, ValueError, OSError) as exc:
        print(f"kleinserve serve: {exc}", file=sys.stderr)
        return 2

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"kleinserve serve: {exc.strerror}", file=sys.stderr)
        return 1
    print(_banner(settings, store, new_key, cert), file=sys.stderr, flush=True)
    # uvicorn waits for open requests this long: the shutdown grace, plus time for the waiting sync
    # runs and streams to answer once it is over.
    kwargs: dict[str, Any] = dict(host=settings.host, port=settings.port, ssl_certfile=settings.ssl_certfile,
                                  ssl_keyfile=settings.ssl_keyfile, proxy_headers=True,
                                  timeout_graceful_shutdown=int(settings.shutdown_grace) + 10,
                                  lifespan="on", log_level=settings.log_level.lower())
    kwargs["log_config"] = log_config
    server = GracefulServer(uvicorn.Config(app, **kwargs))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kleinserve serve", description="Run the HTTP service.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
