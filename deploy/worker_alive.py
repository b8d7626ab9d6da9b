#!/usr/bin/env python3
"""Liveness check of a `kleinserve worker` (which serves no API), for an exec probe / healthcheck.

    kleinserve-worker-alive [STORE_URL]        (default: $KLEINSERVE_STORE)

A worker registers itself in the job store's `workers` table once its model is loaded, and renews
that registration (a TTL of --worker-stale-after) from its monitor thread while it runs. This asks
the store whether a worker of this host (the worker id starts with the host name: the pod or
container name) holds a live registration.

Exit 0: it does; or the store is not PostgreSQL (one-box shapes: nothing to check here); or the store
cannot be reached (a database outage is not this worker's fault: restarting every worker would not
help). Exit 1: the store answers and no live registration of this host is there (not loaded yet,
or stuck: its monitor stopped renewing). Use it as a startupProbe too, with room for the model
download and load.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("KLEINSERVE_STORE", "")
    if not url.startswith(("postgresql://", "postgres://")):
        print(f"store {url.split(':', 1)[0] or 'default'}: nothing to check")
        return 0
    import psycopg

    host = socket.gethostname()
    try:
        with psycopg.connect(url, connect_timeout=5, application_name="kleinserve-worker-alive") as conn:
            row = conn.execute(
                "SELECT count(*) FROM workers WHERE worker_id LIKE %s "
                "AND expires_at > extract(epoch FROM clock_timestamp())",
                (host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%",)).fetchone()
    except psycopg.OperationalError as exc:
        print(f"the store cannot be reached ({type(exc).__name__}); not failing the worker for it")
        return 0
    except psycopg.errors.UndefinedTable:
        print("the store has no workers table yet (schema not created)")
        return 1
    live = int(row[0]) if row else 0
    print(f"{live} live worker registration(s) of host {host}")
    return 0 if live else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
