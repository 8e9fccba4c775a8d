"""`slimship serve`: the Open Inference Protocol server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import app
from slimship.serve.config import Limits, ServeConfig


def _limit_help(field: str) -> str:
    """A --help line from the Limits field's description (one source for the docs), with its default."""
    info = Limits.model_fields[field]
    return f"{info.description} (default {info.default:g})."


def _config_help(field: str) -> str:
    """A --help line from a ServeConfig field's description."""
    return str(ServeConfig.model_fields[field].description)


def _model_spec(text: str) -> dict[str, Any]:
    """NAME=PATH, NAME@VERSION=PATH or NAME=registry:REF into a ModelSpec dict."""
    from slimship.errors import ConfigError

    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ConfigError(
            f"--model {text!r}: use NAME=PATH (ONNX file or candidate dir), NAME@VERSION=PATH, "
            "or NAME=registry:REF (REF: a version number, production, staging, latest)"
        )
    name, _, version = name.partition("@")
    spec: dict[str, Any] = {"name": name}
    if version:
        spec["version"] = version
    if source.startswith("registry:"):
        spec["registry"] = source.removeprefix("registry:")
    else:
        spec["path"] = source
    return spec


@app.command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="What to serve, repeatable: NAME=PATH (an ONNX file or candidate "
            "directory), NAME@VERSION=PATH, or NAME=registry:REF (REF: version number, production, "
            "staging, latest).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="A serving config YAML (models, batching, traffic, limits); "
            "flags add to it. See slimship/serve/config.py for the format.",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)."
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help=_config_help("grpc_port")),
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Dynamic batching: most rows per batch, for models given with --model (default 32)."
        ),
    ] = None,
    max_queue_delay_ms: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Dynamic batching: longest wait for more requests once one is queued (default 0: a batch starts when the previous ends, with whatever arrived meanwhile).",
        ),
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(
            min=1, help="Requests that may wait per endpoint; beyond, 503 + Retry-After (default 256)."
        ),
    ] = None,
    instances: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=16,
            help="Model instances per endpoint running batches side by side, the cores split between them (default 1).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds before an unanswered request gets 504 (default 30)."),
    ] = None,
    max_body_mb: Annotated[
        float | None, typer.Option(min=0.001, help="Largest request body in MB; beyond, 413 (default 64).")
    ] = None,
    max_id_chars: Annotated[int | None, typer.Option(min=16, help=_limit_help("max_id_chars"))] = None,
    header_timeout: Annotated[
        float | None, typer.Option(min=0.001, help=_limit_help("header_timeout_s"))
    ] = None,
    body_timeout: Annotated[float | None, typer.Option(min=0.001, help=_limit_help("body_timeout_s"))] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            envvar="SLIMSHIP_REGISTRY", help="Registry directory, for registry: models and the stage API."
        ),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(
            envvar="SLIMSHIP_REGISTRY_URL",
            help="Registry database URL (default SQLite in the registry directory).",
        ),
    ] = None,
    token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the bearer token inference requires (unset: no token needed)."
        ),
    ] = "SLIMSHIP_TOKEN",
    admin_token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the admin API's bearer token (unset: admin API disabled)."
        ),
    ] = "SLIMSHIP_ADMIN_TOKEN",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="One JSON line per request on stderr.")
    ] = True,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Deploy on Ray Serve: one Serve application per model version with the "
            "replicas/autoscaling of its `replicas` block in --config, the same protocol, metrics, admin "
            "API, rollouts and dashboard (needs the `ray` extra).",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="With --ray: a running Ray cluster (host:port of the head's GCS, "
            "or auto); default: start a local Ray instance bound to 127.0.0.1.",
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, help="With --ray: replicas per model version given with --model (default 1)."),
    ] = None,
    ingress_replicas: Annotated[
        int | None,
        typer.Option("--ingress-replicas", min=1, help=_config_help("ingress_replicas")),
    ] = None,
) -> None:
    """Serve ONNX models over the Open Inference Protocol (KServe V2, JSON and binary tensors — tritonclient works as is),
    with dynamic batching, versions and traffic splitting, Prometheus metrics at /metrics and an admin API.

    Examples: `slimship serve -m mnist=runs/mnist/optimized` ·
    `SLIMSHIP_ADMIN_TOKEN=s3cret slimship serve -m minilm=registry:production --registry ~/reg`
    """
    from slimship.serve.config import load_serve_config
    from slimship.serve.run import serve as run_server

    models = [_model_spec(m) for m in model or []]
    batching = {
        k: v
        for k, v in {
            "max_batch_size": max_batch_size,
            "max_queue_delay_ms": max_queue_delay_ms,
            "max_queue": max_queue,
            "timeout_s": timeout,
            "instances": instances,
        }.items()
        if v is not None
    }
    for m in models:
        m["batching"] = batching
        if replicas is not None:
            m["replicas"] = {"num_replicas": replicas}
    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "grpc_port": grpc_port,
        "models": models or None,
        "registry": str(registry) if registry else None,
        "registry_url": registry_url,
        "ingress_replicas": ingress_replicas,
    }
    limits = {
        k: v
        for k, v in {
            "max_body_bytes": int(max_body_mb * 1e6) if max_body_mb is not None else None,
            "max_id_chars": max_id_chars,
            "header_timeout_s": header_timeout,
            "body_timeout_s": body_timeout,
        }.items()
        if v is not None
    }
    if limits:
        overrides["limits"] = limits
    cfg = load_serve_config(config, overrides)
    if not cfg.models:
        from slimship.errors import ConfigError

        raise ConfigError(
            "nothing to serve: give --model NAME=PATH (or models in --config), e.g. -m mnist=runs/mnist/optimized"
        )
    if not ray and (address is not None or replicas is not None or cfg.ingress_replicas > 1):
        from slimship.errors import ConfigError

        raise ConfigError(
            "--address, --replicas and --ingress-replicas (ingress_replicas) only apply with --ray"
        )
    tokens = {
        "token": os.environ.get(token_env) or None,
        "admin_token": os.environ.get(admin_token_env) or None,
    }
    from slimship.serve.run import bind_warning

    warning = bind_warning(cfg.host, tokens["token"])
    if warning is not None:
        typer.secho(f"\n{'!' * 80}\n{warning}\n{'!' * 80}\n", fg="red", bold=True, err=True)
    if ray and cfg.grpc_port is not None:
        from slimship.errors import ConfigError

        raise ConfigError(
            "gRPC (--grpc-port / grpc_port) is served by the single-process server; drop --ray or the gRPC port"
        )
    if ray:
        from slimship.serve.ray_serve import serve_on_ray

        serve_on_ray(cfg, **tokens, log_level=log_level, access_log=access_log, address=address)
        return
    run_server(cfg, **tokens, log_level=log_level, access_log=access_log)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        from slimship.errors import ConfigError

        raise ConfigError(f"{what} {text!r}: give comma-separated integers, e.g. 1,4,16") from err


def _grid(
    grid: Path | None,
    batch_sizes: str | None,
    delays_ms: str | None,
    instances: str | None,
    threads: str | None,
) -> Any:
    """The tune grid from --grid (YAML) with the list flags replacing its keys."""
    from slimship.errors import ConfigError
    from slimship.serve.config import parse_tune_grid

    data: dict[str, Any] = {}
    if grid is not None:
        if not grid.is_file():
            raise ConfigError(f"--grid {grid} does not exist")
        import yaml

        try:
            data = yaml.safe_load(grid.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--grid {grid}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"--grid {grid}: a tune grid is a mapping of BatchingConfig fields to lists")
    try:
        flags = {
            "max_batch_size": _ints(batch_sizes, "--batch-sizes"),
            "max_queue_delay_ms": [float(x) for x in delays_ms.split(",")] if delays_ms else None,
            "instances": _ints(instances, "--instances"),
            "threads": [None if x.strip() in ("auto", "none") else int(x) for x in threads.split(",")]
            if threads
            else None,
        }
    except ValueError as err:
        raise ConfigError(
            f"--delays-ms / --threads: comma-separated numbers (threads: or auto): {err}"
        ) from err
    data.update({k: v for k, v in flags.items() if v is not None})
    return parse_tune_grid(data, str(grid) if grid else "grid")


@app.command("serve-tune")
def serve_tune(
    model: Annotated[
        str, typer.Argument(help="The model: PATH or NAME=PATH (an ONNX file or candidate directory).")
    ],
    p99_ms: Annotated[float, typer.Option("--p99-ms", help="The p99 latency budget in milliseconds.")],
    clients: Annotated[
        str, typer.Option(help="Closed-loop client counts to measure each config at.")
    ] = "1,4,16",
    duration: Annotated[
        float, typer.Option(min=0.1, help="Seconds of load per client count and config.")
    ] = 3.0,
    grid: Annotated[
        Path | None,
        typer.Option(
            help="A tune grid YAML: lists of max_batch_size, max_queue_delay_ms, instances, threads (serve/config.py: TuneGrid)."
        ),
    ] = None,
    batch_sizes: Annotated[
        str | None, typer.Option(help="max_batch_size values to try, e.g. 1,8,32.")
    ] = None,
    delays_ms: Annotated[str | None, typer.Option(help="max_queue_delay_ms values to try, e.g. 0,2.")] = None,
    instances: Annotated[str | None, typer.Option(help="Model instances to try, e.g. 1,2.")] = None,
    threads: Annotated[
        str | None, typer.Option(help="Intra-op threads in all to try, e.g. 1,2 (auto: physical cores).")
    ] = None,
    finalists: Annotated[
        int, typer.Option(min=0, help="Best configs measured again (with the default).")
    ] = 3,
    confirm_rounds: Annotated[
        int, typer.Option(min=0, help="Extra rounds for the finalists, interleaved.")
    ] = 2,
    min_gain: Annotated[
        float,
        typer.Option(
            min=0,
            help="Keep the default unless a config is this share faster at some client count (or keeps the p99 "
            "budget where the default misses it) and is no slower at any.",
        ),
    ] = 0.03,
    request: Annotated[
        Path | None,
        typer.Option(
            help="An Open Inference Protocol JSON request body to send (default: synthesised from the inputs)."
        ),
    ] = None,
    generator: Annotated[
        str, typer.Option(help="Load generator: auto (hey if on PATH), hey or httpx.")
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Output directory (default runs/serve-tune/NAME).")] = None,
) -> None:
    """Measure serving configs (batch size, queue delay, instances, threads) under real concurrent load on 127.0.0.1
    and write the fastest that keeps the p99 budget as a serving config (`slimship serve --config OUT/serve.yaml`),
    with the sweep in OUT/serve_tune.{json,md}.

    Example: `slimship serve-tune mnist=runs/mnist/optimized --p99-ms 20 --clients 1,4,16`
    """
    import json

    from slimship.errors import ConfigError
    from slimship.serve.autotune import autotune

    name, sep, path = model.partition("=")
    if not sep:
        name, path = Path(model).stem if Path(model).is_file() else Path(model).name, model
    if generator not in ("auto", "hey", "httpx"):
        raise ConfigError(f"--generator {generator!r}: auto, hey or httpx")
    body = None
    if request is not None:
        try:
            body = json.loads(request.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"--request {request}: not a readable JSON file: {err}") from err
    tune_grid = _grid(grid, batch_sizes, delays_ms, instances, threads)
    out_dir = out or Path("runs") / "serve-tune" / name
    autotune(
        path,
        p99_ms,
        name=name,
        grid=tune_grid,
        clients=tuple(_ints(clients, "--clients") or ()),
        duration_s=duration,
        finalists=finalists,
        confirm_rounds=confirm_rounds,
        min_gain=min_gain,
        request=body,
        generator=generator,  # type: ignore[arg-type]
        progress=lambda s: typer.echo(s, err=True),
        out_dir=out_dir,
    )
    paths = {"md": out_dir / "serve_tune.md", "config": out_dir / "serve.yaml"}
    typer.echo(paths["md"].read_text())
    typer.echo(f"serving config: {paths['config']}  (slimship serve --config {paths['config']})")
