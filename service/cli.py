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
    from service.core.config import Settings, unknown_variables

    for name, suggestion in unknown_variables():
        hint = f" (did you mean {suggestion}?)" if suggestion else ""
        typer.echo(f"warning: {name} is not an idembed-serve setting and is ignored{hint}", err=True)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            typer.echo(f"error: invalid setting {field} (IDEMBED_{field.upper()}): {err['msg']}", err=True)
        raise typer.Exit(2) from exc


def _run(overrides: dict[str, Any], processes: int = 1) -> None:
    import uvicorn
    from threadpoolctl import threadpool_limits

    from service.app import create_app

    settings = _settings(overrides)
    if not (settings.bundle_path / "manifest.json").is_file():
        typer.echo(
            f"error: no bundle at {settings.bundle_path.absolute()} (manifest.json missing; relative paths "
            f"are taken from the working folder {Path.cwd()}). Train and export one (see README), or pass "
            "--bundle PATH or IDEMBED_BUNDLE_PATH=PATH.",
            err=True,
        )
        raise typer.Exit(2)
    # One query against the gallery is a matrix-vector product: BLAS threads only add spin-waiting there
    # (2 threads doubled p50 at 100k and raised p99 at 10k from 20 to 160 ms on a busy 2-core host), and the
    # cores are needed by onnxruntime and the event loop.
    threadpool_limits(limits=1, user_api="blas")
    if processes > 1:
        from service.multiprocess import MultiProcessRefused, serve_processes

        try:
            serve_processes(settings, overrides, processes)
        except MultiProcessRefused as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        return
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


def _default(field: str) -> object:
    """A setting's default, for help texts (one source of truth: the Settings class)."""
    from service.core.config import Settings

    return Settings.model_fields[field].get_default(call_default_factory=True)


# The options of `serve`, also accepted without the command (`idembed-serve --bundle X`).
BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", help=f"bundle folder (default: {_default('bundle_path')})")
]
HostOpt = Annotated[str | None, typer.Option(help=f"interface (default: {_default('host')})")]
PortOpt = Annotated[int | None, typer.Option(help=f"TCP port (default: {_default('port')})")]
StoreOpt = Annotated[
    str | None, typer.Option(help=f"sqlite:///path or postgresql://... (default: {_default('store_url')})")
]
BatchOpt = Annotated[
    int | None, typer.Option(help=f"images per onnxruntime call (default: {_default('max_batch_size')})")
]
WaitOpt = Annotated[
    float | None, typer.Option(help=f"extra wait to fill a batch (default: {_default('batch_wait_ms'):g})")
]
LevelOpt = Annotated[
    str | None, typer.Option(help=f"DEBUG, INFO, WARNING or ERROR (default: {_default('log_level')})")
]
FormatOpt = Annotated[str | None, typer.Option(help=f"json or text (default: {_default('log_format')})")]
ProcessesOpt = Annotated[
    int | None,
    typer.Option(min=1, help="server processes on the port (> 1: PostgreSQL store; docs/service.md)"),
]


def _options(**values: object) -> dict[str, Any]:
    names = {"bundle": "bundle_path"}
    return {names.get(k, k): v for k, v in values.items()}


def serve(
    ctx: typer.Context,
    bundle: BundleOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    store_url: StoreOpt = None,
    max_batch_size: BatchOpt = None,
    batch_wait_ms: WaitOpt = None,
    log_level: LevelOpt = None,
    log_format: FormatOpt = None,
    processes: ProcessesOpt = None,
) -> None:
    """Start the service; it is ready when GET /readyz returns 200."""
    given = _options(
        bundle=bundle,
        host=host,
        port=port,
        store_url=store_url,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        log_level=log_level,
        log_format=log_format,
    )
    if ctx.parent is None:  # called as the app itself: `idembed-serve [OPTIONS] [COMMAND]`
        ctx.obj = {"options": given, "processes": processes}
        if ctx.invoked_subcommand is not None:
            return  # the command runs with these options as its defaults
    else:
        # Options before the command (`idembed-serve --port 9000 serve`) count too; the command's own win.
        before = ctx.parent.obj or {}
        earlier = before.get("options", {})
        given = {k: v if v is not None else earlier.get(k) for k, v in given.items()}
        processes = processes if processes is not None else before.get("processes")
    _run(given, processes or 1)


# One option list: the same function is the app's callback (no command: serve) and the `serve` command.
app.callback(
    invoke_without_command=True,
    help="With no command, `serve` (settings from the options, else the environment).",
)(serve)
app.command("serve")(serve)


@app.command()
def audit(
    path: Annotated[
        Path | None,
        typer.Option(help="audit log file (default: IDEMBED_AUDIT_LOG_PATH, else beside the SQLite store)"),
    ] = None,
    identity: Annotated[str | None, typer.Option(help="only entries about this identity")] = None,
    action: Annotated[
        str | None, typer.Option(help="only this action: enroll, delete, reload or snapshot")
    ] = None,
) -> None:
    """Print the audit log of writes (one JSON object per line, oldest first), optionally filtered."""
    import json

    from service.core.audit import read_audit

    file = path or _settings({}).audit_path()
    if not file.is_file():
        typer.echo(f"error: no audit log at {file.absolute()} (working folder {Path.cwd()})", err=True)
        raise typer.Exit(2)
    for entry in read_audit(file):
        if identity is not None and entry.get("identity") != identity:
            continue
        if action is not None and entry.get("action") != action:
            continue
        typer.echo(json.dumps(entry, ensure_ascii=False))


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
