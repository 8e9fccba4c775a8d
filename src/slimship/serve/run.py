"""Build and run the single-process server: the models of a :class:`~slimship.serve.config.ServeConfig` resolved
(registry checkouts verified), the app built over a :class:`~slimship.serve.server.Server` and handed to uvicorn.
SIGTERM / Ctrl-C stop taking connections, answer in-flight requests (up to ``graceful_shutdown_s``), then drain
every endpoint's queue before the process exits.

Connections are timed: a request's headers must arrive within ``limits.header_timeout_s`` of the connection opening
(or of the previous response), else the connection is closed (uvicorn itself never times out incomplete headers, so
held-open connections would pile up: slowloris); the body has ``limits.body_timeout_s`` (408, in the app); an idle
keep-alive connection is closed after ``limits.keep_alive_s``. Binding a non-loopback interface without an inference
token is warned about loudly: anyone who can reach the port can use the models."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
from typing import Any

from slimship.serve.config import ServeConfig
from slimship.serve.endpoint import Endpoint
from slimship.serve.http import create_app
from slimship.serve.server import Server


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            return msg
        out = {"level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "info", access_log: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    for name in ("slimship.serve", "slimship.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    # by level, not `disabled`: uvicorn's logging.config.dictConfig (disable_existing_loggers=False) sets every other
    # logger's `disabled` back to False, so --no-access-log used to log every request anyway
    if not access_log:
        logging.getLogger("slimship.access").setLevel(logging.WARNING)


def resolve_models(config: ServeConfig) -> list[dict[str, Any]]:
    """Every model of the config as (name, version label, ONNX path, source, settings): registry checkouts are
    verified by hash here, so a model that can't be served stops the start with one clear error."""
    registry = None
    if any(m.registry for m in config.models):
        from slimship.registry import Registry

        registry = Registry(config.registry, url=config.registry_url)
    out = []
    for m in config.models:
        source: dict[str, Any]
        if m.path is not None:
            onnx, workload = m.resolve()
            version, source = (
                m.version or "1",
                {"path": m.path, **({"workload": workload} if workload else {})},
            )
        else:
            assert registry is not None
            reg_model = m.registry_model or m.name
            ref = str(m.registry)
            v = registry.get(reg_model, int(ref) if ref.isdigit() else ref)
            cand = registry.fetch(reg_model, v.number)
            if cand.format not in ("onnx", "openvino", "executorch"):
                from slimship.errors import ConfigError

                raise ConfigError(
                    f"{reg_model} v{v.number} is a {cand.format} model; the server runs ONNX, OpenVINO IR and ExecuTorch programs (export it first)"
                )
            onnx, version = str(cand.artifact_path), m.version or str(v.number)
            source = {
                "registry": reg_model,
                "version": v.number,
                "digest": v.digest,
                "stage": v.stage,
                "workload": dict(cand.workload),
            }
        out.append(
            {
                "name": m.name,
                "version": version,
                "path": onnx,
                "source": source,
                "batching": m.batching.model_dump(),
                "drift": m.drift.model_dump(),
                "replicas": m.replicas.model_dump(),
                "batching_cfg": m.batching,
                "drift_cfg": m.drift,
                "replicas_cfg": m.replicas,
            }
        )
    if registry is not None:
        registry.close()
    return out


def build(
    config: ServeConfig, token: str | None = None, admin_token: str | None = None
) -> tuple[Server, Any]:
    registry = None
    if (
        config.registry is not None
        or config.registry_url is not None
        or any(m.registry for m in config.models)
    ):
        from slimship.registry import Registry

        registry = Registry(config.registry, url=config.registry_url)
    server = Server(limits=config.limits, token=token, admin_token=admin_token, registry=registry)
    endpoints = []
    for m in resolve_models(config):
        ep = Endpoint(m["name"], m["version"], m["path"], m["batching_cfg"], server.metrics, m["source"])
        ep.drift_config = m["drift_cfg"]
        endpoints.append(ep)

    async def start_all() -> None:
        for ep in endpoints:
            await server.add(ep)
        for name, policy in config.traffic.items():
            server.set_traffic(name, policy)

    services = []
    if config.grpc_port is not None:
        from slimship.serve.grpc import GrpcFrontend

        services.append(GrpcFrontend(server, config.host, config.grpc_port, config.graceful_shutdown_s))
    return server, create_app(server, startup=[start_all()], services=services)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def bind_warning(host: str, token: str | None) -> str | None:
    """The warning to print when the server binds beyond loopback with no inference token, else None."""
    if token is not None or is_loopback(host):
        return None
    return (
        f"WARNING: serving on {host} with no inference token: anyone who can reach this port can run the models. "
        "Set SLIMSHIP_TOKEN (clients then send `Authorization: Bearer <token>`), or bind 127.0.0.1."
    )


class OpenRequests:
    """HTTP requests whose headers have arrived and whose responses are not complete, over all connections."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


def timed_protocol(
    header_timeout_s: float, open_requests: OpenRequests | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a deadline for a request's headers; counts open requests in
    ``open_requests`` when given."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    counter = open_requests or OpenRequests()

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _open = 0  # this connection's requests counted in `counter` (pipelined ones too)

        def _close_one(self) -> None:
            if self._open:
                self._open -= 1
                counter.count -= 1

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._open += 1
            counter.count += 1
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._close_one()
            super().on_response_complete()
            self._disarm()  # idle now: the keep-alive timeout takes over

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            counter.count -= self._open  # requests never answered
            self._open = 0
            super().connection_lost(exc)

    return TimedHttpToolsProtocol


def serve(
    config: ServeConfig,
    token: str | None = None,
    admin_token: str | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    import uvicorn

    configure_logging(log_level, access_log)
    server, app = build(config, token, admin_token)
    open_requests = OpenRequests()
    server.requests_open = open_requests
    server.metrics.count_open_requests(open_requests)
    print(
        f"serving {', '.join(sorted({m.name for m in config.models}))} on http://{config.host}:{config.port} "
        + (f"and gRPC {config.host}:{config.grpc_port} " if config.grpc_port is not None else "")
        + "(Ctrl-C or SIGTERM stops after answering requests in flight)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(config.graceful_shutdown_s),
        timeout_keep_alive=max(1, round(config.limits.keep_alive_s)),
        http=timed_protocol(config.limits.header_timeout_s, open_requests),
        loop="uvloop",
    )
