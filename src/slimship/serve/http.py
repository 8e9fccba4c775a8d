"""The HTTP app: an ASGI app (Starlette, run by uvicorn) speaking the Open Inference Protocol over a
:class:`~slimship.serve.server.Server`.

    GET  /v2/health/live | /v2/health/ready | /v2                      server health and metadata
    GET  /v2/models/{m}[/versions/{v}]  and  …/ready                  model metadata and readiness
    POST /v2/models/{m}[/versions/{v}]/infer                           inference (JSON or binary tensors)
    POST|GET /v2/models/{m}/feedback                                   A/B outcomes and their summary
    GET  /v2/models[/{m}[/versions/{v}]]/stats                         Triton's statistics extension
    GET  /metrics                                                      Prometheus
    GET|POST|PUT /v2/admin/…                                           load / unload / traffic / stage / rollout
    GET  /dashboard, /v2/dashboard/state                               the dashboard

Each handler is a module-level ``async (server, request) -> Response``; :func:`create_app` wraps every one in the
same guard (auth, request id, error mapping, metrics, access log). Known errors map to their status with an
``{"error": ...}`` body; anything unexpected is logged with its traceback and answered with an opaque 500.

Under hostile input: an ``x-request-id`` longer than ``limits.max_id_chars`` is refused (400, not truncated: a
truncated id would silently break feedback sent with the full one); a body must arrive within
``limits.body_timeout_s`` (408); bodies from ``limits.parse_in_process_bytes`` up are parsed in a worker process
(JSON parsing holds the GIL, so a thread would still stall the event loop — health checks and small requests go
on meanwhile); a client that disconnects mid-upload is not an error (logged at debug, counted under status 499); a
wrong method on a known route is 405 with ``Allow``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from slimship.errors import ServingError, SlimshipError
from slimship.serve.config import (
    FeedbackBody,
    LoadBody,
    ModelSpec,
    ReasonBody,
    RolloutBody,
    StageBody,
    TrafficPolicy,
)
from slimship.serve.dashboard import page, state
from slimship.serve.protocol import (
    HEADER_LENGTH,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    Unauthorized,
    encode_infer_response,
    parse_infer_request,
)
from slimship.serve.routing import next_version
from slimship.serve.server import Server

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from slimship.serve.endpoint import ServedEndpoint

log = logging.getLogger("slimship.serve")
access_log = logging.getLogger("slimship.access")

SERVER_NAME = "slimship"
EXTENSIONS = [
    "binary_tensor_data",
    "statistics",
    "classification_free",
    "slimship_admin",
    "slimship_traffic",
    "slimship_rollout",
    "slimship_feedback",
]
#: largest admin / feedback body
SMALL_BODY = 1 << 20
#: the status counted (and logged) for a client that went away before its request was read (nginx's convention)
CLIENT_GONE = 499

Handler = Callable[[Server, "Request"], Awaitable["Response"]]


# ---- helpers -----------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import Response

    return Response(
        json.dumps(body, separators=(",", ":")), status, headers=headers, media_type="application/json"
    )


def _error(err: ProtocolError | str, status: int = 400) -> Response:
    if isinstance(err, ProtocolError):
        return _json({"error": str(err)}, err.status, err.headers)
    return _json({"error": err}, status)


def _bearer_ok(header: str | None, token: str) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


async def _read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    # A refusal before the whole body is read closes the connection (RFC 9112 9.6): what is left of the body would
    # otherwise be read as the next request, and a stalled client would hold the connection for keep_alive_s more.
    close = {"Connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"the request body is {int(declared)} bytes; this server takes at most {limit}", headers=close
        )
    if timeout_s is None:
        timeout_s = request.app.state.server.limits.body_timeout_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes", headers=close)
                chunks.append(chunk)
    except TimeoutError as err:
        raise ProtocolError(
            f"the request body did not arrive within {timeout_s:g} s ({size} bytes read)", 408, close
        ) from err
    return b"".join(chunks)


class ParserPool:
    """A worker process for parsing large infer bodies off the event loop, started on first use."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def parse(self, body: bytes, header_length: str | None, max_id_chars: int) -> Any:
        import multiprocessing

        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")
            )
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, parse_infer_request, body, header_length, max_id_chars
            )
        except concurrent.futures.process.BrokenProcessPool:
            # the worker died (or could not start here): a new one next time; this body is parsed in-process, as
            # it would be without the pool (its size is bounded by max_body_bytes)
            log.warning("the parser process died; parsing a %d-byte body in the server process", len(body))
            self._pool = None
            pool.shutdown(wait=False)
            return parse_infer_request(body, header_length, max_id_chars)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


async def _parse(server: Server, request: Request, body: bytes) -> Any:
    """The infer request in ``body``: parsed here when small, in the parser process when large."""
    header, max_id = request.headers.get(HEADER_LENGTH), server.limits.max_id_chars
    if len(body) < server.limits.parse_in_process_bytes:
        return parse_infer_request(body, header, max_id)
    return await request.app.state.parser.parse(body, header, max_id)


def _authorize(server: Server, request: Request, admin: bool) -> None:
    """Raise unless the request may go on: admin routes need the admin token, inference and feedback the token."""
    header = request.headers.get("authorization")
    if admin:
        if server.admin_token is None:
            raise ProtocolError("the admin API is disabled: start the server with --admin-token", 403)
        if not _bearer_ok(header, server.admin_token):
            raise Unauthorized(
                "admin API: send `Authorization: Bearer <admin token>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
    elif (
        server.token is not None
        and request.url.path.endswith(("/infer", "/feedback", "/stats"))
        and not _bearer_ok(header, server.token)
    ):
        raise Unauthorized(
            "inference, feedback and statistics need `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _answer(server: Server, fn: Handler, request: Request, admin: bool) -> Response:
    """The handler's response, or the error it raised mapped to its status."""
    from starlette.requests import ClientDisconnect

    try:
        _authorize(server, request, admin)
        return await fn(server, request)
    except ClientDisconnect:  # nobody to answer: not an error of the server nor of a request
        log.debug("client disconnected before %s %s was read", request.method, request.url.path)
        return _error("the client disconnected", CLIENT_GONE)
    except ProtocolError as err:
        return _error(err)
    except ValidationError as err:
        return _error(f"invalid body: {err.errors(include_url=False)}", 400)
    except SlimshipError as err:
        return _error(str(err), 400)
    except Exception:  # opaque to the client, whole in the log
        rid = request.state.rid
        log.exception("unexpected error on %s %s (request %s)", request.method, request.url.path, rid)
        return _error(f"internal server error (request id {rid})", 500)


def _log_access(request: Request, status: int, ms: float) -> None:
    if not access_log.isEnabledFor(logging.INFO):  # --no-access-log: not even the JSON is built
        return
    access_log.info(
        json.dumps(
            {
                "method": request.method,
                "path": request.url.path,
                "status": status,
                "ms": round(ms, 3),
                "model": request.state.model,
                "version": request.state.version,
                "request_id": request.state.rid,
                "client": request.client.host if request.client else None,
            }
        )
    )


def guard(server: Server, fn: Handler, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """``fn`` as a Starlette endpoint: auth, a request id, error mapping, the HTTP metric and the access log."""

    async def endpoint(request: Request) -> Response:
        t0 = time.perf_counter()
        request.state.model = request.state.version = None
        rid = request.headers.get("x-request-id")
        limit = server.limits.max_id_chars
        request.state.rid = rid if rid and len(rid) <= limit else uuid.uuid4().hex
        if rid is not None and len(rid) > limit:
            resp = _error(f"x-request-id is {len(rid)} characters; at most {limit}")
        else:
            resp = await _answer(server, fn, request, admin)
        resp.headers["x-request-id"] = request.state.rid
        if (
            server.shared is not None
        ):  # which ingress replica answered, errors too (its /metrics, /stats are its own)
            resp.headers["x-slimship-ingress"] = server.shared.replica
        route = request.scope.get("route")
        server.metrics.http.labels(getattr(route, "path", request.url.path), str(resp.status_code)).inc()
        _log_access(request, resp.status_code, (time.perf_counter() - t0) * 1000)
        return resp

    return endpoint


def _target(server: Server, request: Request) -> tuple[str, str | None, ServedEndpoint]:
    """The model, the version asked for (None: routed) and the endpoint of a metadata or readiness request."""
    name, version = request.path_params["model"], request.path_params.get("version")
    group = server.group(name)
    return name, version, server.endpoint(name, version or group.default_version())


# ---- health & metadata -------------------------------------------------------------------------


async def live(server: Server, request: Request) -> Response:
    return _json({"live": True})


async def ready(server: Server, request: Request) -> Response:
    ok = server.started and all(ep.ready for g in server.models.values() for ep in g.versions.values())
    return _json({"ready": ok}, 200 if ok else 503)


async def server_meta(server: Server, request: Request) -> Response:
    from slimship import __version__

    return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def model_meta(server: Server, request: Request) -> Response:
    name, version, ep = _target(server, request)
    meta = ep.metadata()
    meta["versions"] = server.group(name).labels() if version is None else [ep.version]
    return _json(meta)


async def model_ready(server: Server, request: Request) -> Response:
    name, _, ep = _target(server, request)
    return _json({"name": name, "version": ep.version, "ready": ep.ready}, 200 if ep.ready else 503)


# ---- inference ---------------------------------------------------------------------------------


async def infer(server: Server, request: Request) -> Response:
    from starlette.responses import Response

    name, version = request.path_params["model"], request.path_params.get("version")
    t0 = time.perf_counter()
    body = await _read_body(request, server.limits.max_body_bytes)
    req = await _parse(server, request, body)
    sticky_header = server.group(name).policy.sticky_header
    ep = server.endpoint(name, version, request.headers.get(sticky_header) if sticky_header else None)
    request.state.model, request.state.version = name, ep.version
    data, headers = await server.run_inference(
        name,
        ep,
        version is None,
        req.inputs,
        lambda outputs: encode_infer_response(name, ep.version, req.id, outputs, req),
        t0,
    )
    await server.remember(req.id, request.state.rid, name, ep.version)
    headers["x-model-version"] = ep.version
    return Response(data, 200, headers=headers)


async def metrics(request: Request) -> Response:
    """Prometheus text: open, outside the guard (scrapes are not counted as HTTP requests)."""
    from starlette.responses import Response

    server: Server = request.app.state.server
    data, ctype = server.metrics.render()
    return Response(data, 200, media_type=ctype.split(";")[0], headers={"content-type": ctype})


async def model_stats(server: Server, request: Request) -> Response:
    """Triton's statistics extension: every loaded version, a model's versions, or one version."""
    name, version = request.path_params.get("model"), request.path_params.get("version")
    request.state.model, request.state.version = name, version
    return _json({"model_stats": server.statistics(name, version)})


# ---- admin -------------------------------------------------------------------------------------


async def admin_state(server: Server, request: Request) -> Response:
    out = {}
    for name, g in server.models.items():
        out[name] = {
            "versions": {
                v: {
                    "ready": ep.ready,
                    "source": ep.source,
                    "queue": ep.queue_depth,
                    "batching": ep.config.model_dump(),
                    "runtime_settings": ep.runtime_settings(),
                    "verification": ep.verification,
                }
                for v, ep in g.versions.items()
            },
            "traffic": g.policy.model_dump(),
            "shadow": await server.shadow_summary(name),
        }
    return _json({"models": out})


async def admin_load(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    body = LoadBody.model_validate_json(await _read_body(request, SMALL_BODY) or b"{}")
    if (body.path is None) == (body.registry is None):
        raise ProtocolError(
            'give either "path" (an ONNX file or a candidate directory) or "registry" (a version number or stage)'
        )
    if body.path is not None:
        group = server.models.get(name)
        version = body.version or next_version(group.versions if group else ())
        onnx_path, workload = ModelSpec(
            name=name, path=body.path
        ).resolve()  # a candidate directory → its ONNX file
        source = {"path": body.path, **({"workload": workload} if workload else {})}
        ep = await server.load(name, version, onnx_path, body.batching, source, body.drift, body.replicas)
    else:
        ep = await server.load_from_registry(
            name,
            str(body.registry),
            body.version,
            body.batching,
            body.registry_model,
            body.drift,
            body.replicas,
        )
    await server.rollouts.restore()  # a stored rollout waiting for this version goes on
    return _json({"model": name, "version": ep.version, "ready": ep.ready, "source": ep.source})


async def admin_unload(server: Server, request: Request) -> Response:
    name, version = request.path_params["model"], request.path_params["version"]
    await server.unload(name, version)
    return _json({"model": name, "version": version, "unloaded": True})


async def admin_traffic(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    policy = TrafficPolicy.model_validate_json(await _read_body(request, SMALL_BODY))
    server.set_traffic(name, policy)
    await server.publish_traffic(name)
    return _json({"model": name, "traffic": server.models[name].policy.model_dump()})


async def admin_stage(server: Server, request: Request) -> Response:
    name, version = request.path_params["model"], request.path_params["version"]
    body = StageBody.model_validate_json(await _read_body(request, SMALL_BODY))
    registry = server.registry
    if registry is None:
        raise ServingError("this server has no registry: start it with --registry")
    ep = server.endpoint(name, version)
    reg_model = ep.source.get("registry", name)
    number = int(ep.source.get("version", version))
    v = await asyncio.get_running_loop().run_in_executor(
        None, lambda: registry.set_stage(reg_model, number, body.stage, reason=body.reason)
    )
    return _json({"model": reg_model, "version": v.number, "stage": v.stage})


# ---- A/B feedback ------------------------------------------------------------------------------


async def feedback(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    server.group(name)
    body = FeedbackBody.model_validate_json(await _read_body(request, SMALL_BODY) or b"{}")
    version = await server.record_feedback(name, body.id, body.outcome, body.metric)
    return _json({"model": name, "id": body.id, "version": version, "metric": body.metric, "recorded": True})


async def feedback_summary(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    server.group(name)
    q = request.query_params
    try:
        alpha = float(q.get("alpha", 0.05))
        min_samples = int(q.get("min_samples", 30))
    except ValueError as err:
        raise ProtocolError(f"alpha is a number in (0, 1) and min_samples an integer: {err}") from err
    if not 0 < alpha < 1 or min_samples < 2:
        raise ProtocolError("alpha must be in (0, 1) and min_samples ≥ 2")
    summary, answered = await server.feedback_summary(name, alpha, min_samples)
    return _json({"model": name, "metrics": summary, "answered": answered})


# ---- rollouts ----------------------------------------------------------------------------------


async def rollout_start(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    body = RolloutBody.model_validate_json(await _read_body(request, SMALL_BODY) or b"{}")
    return _json(await server.rollouts.start(name, body.candidate, body.baseline, body.policy))


async def rollout_status(server: Server, request: Request) -> Response:
    name = request.path_params["model"]
    server.group(name)
    return _json(await server.rollouts.status_with_history(name))


async def rollout_action(server: Server, request: Request) -> Response:
    name, action = request.path_params["model"], request.path_params["action"]
    body = ReasonBody.model_validate_json(await _read_body(request, SMALL_BODY) or b"{}")
    fn = {
        "pause": server.rollouts.pause,
        "resume": server.rollouts.resume,
        "abort": server.rollouts.abort,
    }.get(action)
    if fn is None:
        raise NotFound(f"no rollout action {action!r}; use pause, resume or abort")
    return _json(await fn(name, body.reason))


# ---- dashboard ---------------------------------------------------------------------------------


async def dashboard_page(server: Server, request: Request) -> Response:
    from starlette.responses import Response

    return Response(
        page(),
        200,
        media_type="text/html; charset=utf-8",
        headers={
            "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src data:"
        },
    )


async def dashboard_state(server: Server, request: Request) -> Response:
    return _json(await state(server))


async def not_found(request: Request, exc: Exception) -> Response:
    return _error(f"no route {request.method} {request.url.path}; see /v2 for the protocol's endpoints", 404)


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    allow = dict(getattr(exc, "headers", None) or {}).get("Allow", "")
    return _json(
        {"error": f"{request.method} is not allowed on {request.url.path}; use {allow or 'another method'}"},
        405,
        {"Allow": allow} if allow else None,
    )


#: (path, handler, methods, admin)
ROUTES: list[tuple[str, Handler, list[str], bool]] = [
    ("/v2/health/live", live, ["GET"], False),
    ("/v2/health/ready", ready, ["GET"], False),
    ("/v2", server_meta, ["GET"], False),
    ("/v2/models/stats", model_stats, ["GET"], False),  # before /v2/models/{model}, which would take it
    ("/v2/models/{model}", model_meta, ["GET"], False),
    ("/v2/models/{model}/versions/{version}", model_meta, ["GET"], False),
    ("/v2/models/{model}/ready", model_ready, ["GET"], False),
    ("/v2/models/{model}/versions/{version}/ready", model_ready, ["GET"], False),
    ("/v2/models/{model}/infer", infer, ["POST"], False),
    ("/v2/models/{model}/versions/{version}/infer", infer, ["POST"], False),
    ("/v2/models/{model}/stats", model_stats, ["GET"], False),
    ("/v2/models/{model}/versions/{version}/stats", model_stats, ["GET"], False),
    ("/v2/admin/models", admin_state, ["GET"], True),
    ("/v2/admin/models/{model}/load", admin_load, ["POST"], True),
    ("/v2/admin/models/{model}/versions/{version}/unload", admin_unload, ["POST"], True),
    ("/v2/admin/models/{model}/traffic", admin_traffic, ["PUT"], True),
    ("/v2/admin/models/{model}/versions/{version}/stage", admin_stage, ["POST"], True),
    ("/v2/models/{model}/feedback", feedback, ["POST"], False),
    ("/v2/models/{model}/feedback", feedback_summary, ["GET"], False),
    ("/v2/admin/models/{model}/rollout", rollout_start, ["POST"], True),
    ("/v2/admin/models/{model}/rollout", rollout_status, ["GET"], True),
    ("/v2/admin/models/{model}/rollout/{action}", rollout_action, ["POST"], True),
    ("/dashboard", dashboard_page, ["GET"], False),
    ("/v2/dashboard/state", dashboard_state, ["GET"], False),
]


def create_app(
    server: Server,
    startup: list[Coroutine[Any, Any, Any]] | None = None,
    services: Sequence[contextlib.AbstractAsyncContextManager[Any]] = (),
) -> Any:
    """The ASGI app. ``startup``: coroutines (e.g. model loads) awaited when the app starts; ``services``: other
    front ends over the same server (the gRPC one), entered once the models are loaded — before the server reports
    ready — and exited first on shutdown (answering their calls in flight)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                for coro in startup or []:
                    await coro
                await server.rollouts.restore()  # rollouts stored in the registry go on where they were
                server.rollouts.start_loop()
                server.spawn(server.watch())
                for service in services:
                    await stack.enter_async_context(service)
                server.started = True
                yield
            finally:
                server.started = False
                await stack.aclose()
                app.state.parser.close()
                await server.stop()

    routes = [Route(path, guard(server, fn, admin), methods=methods) for path, fn, methods, admin in ROUTES]
    routes.append(Route("/metrics", metrics))
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: method_not_allowed}
    )
    app.state.server = server
    app.state.parser = ParserPool()
    return app
