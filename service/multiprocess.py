"""Several server processes on one port, for hosts with many cores: `idembed-serve serve --processes N`.

One Python process serves requests on one event loop, so on a many-core host its request work (HTTP, JSON,
base64, decode) saturates one core long before onnxruntime saturates the rest. With `--processes N` uvicorn
binds the port once and runs N worker processes that accept on it; each is a complete service (its own
model session, batcher and in-memory gallery index) built from the same settings.

The processes must share the identity store and see each other's writes: every store with a change feed
gives that (each process follows it, `service/gallery/follower.py`). They must also keep the erasure
guarantee: a deleted identity's vector bytes are overwritten while the other processes run. PostgreSQL keeps
it; SQLite does not (the WAL checkpoint that clears a deleted vector's old pages cannot finish while another
process reads the file), so a SQLite store is refused (`erases_with_other_processes`; no backend is named
here). Use `IDEMBED_STORE_URL=postgresql://...` (docs/service.md, Replicas).

Unless IDEMBED_ORT_INTRA_OP_THREADS is set, each process's onnxruntime calls get an equal share of the cores
(cores / processes / inference workers, at least one), so N processes do not oversubscribe the CPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.core.config import Settings

WORKER_APP = "service.multiprocess:worker_app"


class MultiProcessRefused(ValueError):
    """The settings cannot be served by several processes (the message says why and what to do)."""


def check_shared_store(settings: Settings) -> None:
    """Refuse a store the processes could not share: open it once and ask it (no backend is named here)."""
    from bundle.errors import BundleError
    from bundle.files import read_manifest
    from service.gallery.store import ChangeFeedStore, StoreError, open_store

    try:
        store = open_store(settings.store_url, read_manifest(settings.bundle_path).embedding.dim)
    except (BundleError, StoreError) as exc:
        raise MultiProcessRefused(str(exc)) from exc
    try:
        shared = isinstance(store, ChangeFeedStore) and getattr(store, "erases_with_other_processes", False)
    finally:
        store.close()
    if not shared:
        raise MultiProcessRefused(
            f"--processes needs a store that several server processes share and still erase from; "
            f"{settings.store_url} cannot overwrite a deleted identity's vector while other processes read "
            "it. Use a PostgreSQL store (IDEMBED_STORE_URL=postgresql://...), or run one process (omit "
            "--processes)"
        )


def child_environment(settings: Settings, overrides: dict[str, Any], processes: int) -> dict[str, str]:
    """IDEMBED_* variables that make every worker build the same settings as this process did from its
    command-line options, plus an onnxruntime thread share per process unless one is set."""
    env = {f"IDEMBED_{k.upper()}": str(v) for k, v in overrides.items() if v is not None}
    if settings.ort_intra_op_threads == 0:
        cores = len(os.sched_getaffinity(0))
        env["IDEMBED_ORT_INTRA_OP_THREADS"] = str(max(1, cores // (processes * settings.inference_workers)))
    return env


def serve_processes(settings: Settings, overrides: dict[str, Any], processes: int) -> None:
    """Run `processes` uvicorn workers of the service on settings.host:settings.port until stopped (SIGTERM or
    SIGINT to this process stops them all gracefully); raises `MultiProcessRefused` before starting any."""
    import uvicorn

    if processes < 2:
        raise MultiProcessRefused(f"--processes must be >= 2 to start several processes, got {processes}")
    check_shared_store(settings)
    os.environ.update(child_environment(settings, overrides, processes))
    uvicorn.run(
        WORKER_APP,
        factory=True,
        workers=processes,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment the parent set."""
    from threadpoolctl import threadpool_limits

    from service.app import create_app
    from service.core.config import Settings

    # As in a single-process server (service/cli.py): gallery queries are matrix-vector products, where BLAS
    # threads only spin; the cores belong to onnxruntime and the event loop.
    threadpool_limits(limits=1, user_api="blas")
    return create_app(Settings())


__all__ = ["MultiProcessRefused", "serve_processes", "worker_app"]
