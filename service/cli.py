"""`idembed-serve`: start the HTTP service (uvicorn), or write sample images to try it with."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from service.core.config import Settings

app = typer.Typer(
    help="Serve an idembed model bundle over HTTP. Every option can also be set as IDEMBED_<NAME> "
    "(see docs/service.md); command-line options win.",
    no_args_is_help=False,
    add_completion=False,
)


def _settings(overrides: dict[str, Any]) -> Settings:
    from service.core.config import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            typer.echo(f"error: invalid setting {field} (IDEMBED_{field.upper()}): {err['msg']}", err=True)
        raise typer.Exit(2) from exc


def _run(overrides: dict[str, Any]) -> None:
    import uvicorn
    from threadpoolctl import threadpool_limits

    from service.app import create_app

    settings = _settings(overrides)
    if not (settings.bundle_path / "manifest.json").is_file():
        typer.echo(
            f"error: no bundle at {settings.bundle_path} (manifest.json missing). Train and export one "
            "(see README) or pass --bundle / IDEMBED_BUNDLE_PATH.",
            err=True,
        )
        raise typer.Exit(2)
    # One query against the gallery is a matrix-vector product: BLAS threads only add spin-waiting there
    # (2 threads doubled p50 at 100k and raised p99 at 10k from 20 to 160 ms on a busy 2-core host), and the
    # cores are needed by onnxruntime and the event loop.
    threadpool_limits(limits=1, user_api="blas")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, `serve` with settings from the environment."""
    if ctx.invoked_subcommand is None:
        _run({})


@app.command()
def serve(
    bundle: Annotated[Path | None, typer.Option(help="bundle folder (default: models/default)")] = None,
    host: Annotated[str | None, typer.Option(help="interface (default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: 8000)")] = None,
    store_url: Annotated[
        str | None,
        typer.Option(help="sqlite:///path or postgresql://... (default: sqlite:///data/identities.sqlite3)"),
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="images per onnxruntime call (default: 64)")
    ] = None,
    batch_wait_ms: Annotated[
        float | None, typer.Option(help="extra wait to fill a batch (default: 0)")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or text (default: json)")] = None,
) -> None:
    """Start the service; it is ready when GET /readyz returns 200."""
    _run(
        {
            "bundle_path": bundle,
            "host": host,
            "port": port,
            "store_url": store_url,
            "max_batch_size": max_batch_size,
            "batch_wait_ms": batch_wait_ms,
            "log_level": log_level,
            "log_format": log_format,
        }
    )


@app.command()
def samples(
    out: Annotated[Path, typer.Option(help="folder to copy the sample PNGs into")] = Path("samples"),
    bundle: Annotated[
        Path | None, typer.Option(help="bundle whose samples/ to copy (default: the served bundle)")
    ] = None,
) -> None:
    """Copy the bundle's sample images (identities the model never saw) into OUT, for the curl examples."""
    import json
    import shutil

    source = (bundle or _settings({}).bundle_path) / "samples"
    index = source / "samples.json"
    if not index.is_file():
        typer.echo(
            f"error: {source.resolve()} has no samples.json: this bundle ships no sample images "
            "(`idembed-train build-bundle` writes them)",
            err=True,
        )
        raise typer.Exit(2)
    identities = json.loads(index.read_text(encoding="utf-8"))["identities"]
    out.mkdir(parents=True, exist_ok=True)
    for files in identities.values():
        for file in files:
            shutil.copyfile(source / file, out / file)
    listing = "; ".join(f"{name}: {', '.join(files)}" for name, files in identities.items())
    typer.echo(f"copied {sum(map(len, identities.values()))} images to {out}/ ({listing})")


if __name__ == "__main__":
    sys.exit(app())
