#!/usr/bin/env python3
"""Container health probe: exit 0 when the service's /readyz answers 200, else 1 (stdlib only, no curl).

Docker's HEALTHCHECK and compose's healthcheck run it inside the container. It reads the same IDEMBED_HOST /
IDEMBED_PORT the service reads, so changing the port by environment needs no second edit.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe_url() -> str:
    host = os.environ.get("IDEMBED_HOST", "127.0.0.1")
    # A wildcard bind address is not something to connect to; loopback reaches it.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = os.environ.get("IDEMBED_PORT", "8000")
    return os.environ.get("IDEMBED_HEALTHCHECK_URL", f"http://{host}:{port}/readyz")


def main() -> int:
    url = probe_url()
    timeout = float(os.environ.get("IDEMBED_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
