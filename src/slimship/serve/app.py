"""The inference server: an ASGI app (Starlette, run by uvicorn) speaking the Open Inference Protocol.

    GET  /v2/health/live | /v2/health/ready | /v2                      server health and metadata
    GET  /v2/models/{m}[/versions/{v}]  and  …/ready                  model metadata and readiness
    POST /v2/models/{m}[/versions/{v}]/infer                           inference (JSON or binary tensors)
    GET  /metrics                                                      Prometheus
    GET|POST|PUT /v2/admin/…                                           load / unload / traffic / stage (bearer token)

Each model is a group of versions (endpoints). A versionless request is routed by the model's traffic policy:
weights (A/B, canary), optionally sticky by a header so one user stays on one variant, and a shadow version that
receives a share of the traffic in the background — the client is answered by the primary, the two outputs are
compared and the agreement recorded. Known errors map to their status with an ``{"error": ...}`` body; anything
unexpected is logged with its traceback and answered with an opaque 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from slimship.errors import ServingError, SlimshipError
from slimship.serve.drift import DriftConfig
from slimship.serve.endpoint import BatchingConfig, Endpoint
from slimship.serve.metrics import Metrics
from slimship.serve.protocol import (
    HEADER_LENGTH,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    Unauthorized,
    encode_infer_response,
    parse_infer_request,
)
from slimship.serve.ray_serve import ReplicaConfig

log = logging.getLogger("slimship.serve")
access_log = logging.getLogger("slimship.access")

SERVER_NAME = "slimship"
EXTENSIONS = [
    "binary_tensor_data",
    "classification_free",
    "slimship_admin",
    "slimship_traffic",
    "slimship_rollout",
    "slimship_feedback",
]


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: largest request body in bytes (413 beyond)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)


class ShadowPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    #: share of the model's traffic mirrored to the shadow version, in [0, 1]
    fraction: float = Field(default=1.0, ge=0, le=1)


class TrafficPolicy(BaseModel):
    """How versionless requests to a model are split between its versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: version → weight (any non-negative numbers; normalised); empty = the registry's production version takes all
    #: when it is loaded, else the newest loaded version
    weights: dict[str, float] = Field(default_factory=dict)
    #: a request header whose value pins a caller to one variant (e.g. x-user-id); None = random per request
    sticky_header: str | None = None
    shadow: ShadowPolicy | None = None


@dataclass
class ShadowStats:
    pairs: int = 0
    errors: int = 0
    fidelity_sum: float = 0.0
    fidelity_min: float = 1.0
    recent: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.pairs += 1
        self.fidelity_sum += value
        self.fidelity_min = min(self.fidelity_min, value)
        self.recent.append(value)
        del self.recent[:-1000]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "errors": self.errors,
            "fidelity_mean": self.fidelity_sum / self.pairs if self.pairs else None,
            "fidelity_min": self.fidelity_min if self.pairs else None,
        }


@dataclass
class ModelGroup:
    name: str
    versions: dict[str, Endpoint] = field(default_factory=dict)
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    shadow_stats: dict[str, ShadowStats] = field(default_factory=dict)

    def default_version(self) -> str:
        """Where versionless requests go without weights: the registry's production version if it is loaded (a
        candidate loaded next to it gets no traffic until told), else the newest version."""
        prod = [v for v, ep in self.versions.items() if ep.source.get("stage") == "production"]
        return max(prod or self.versions, key=_version_key)

    def route(self, sticky_value: str | None) -> Endpoint:
        weights = {v: w for v, w in self.policy.weights.items() if v in self.versions and w > 0}
        if not weights:
            return self.versions[self.default_version()]
        total = sum(weights.values())
        if sticky_value is not None:
            u = (
                int.from_bytes(hashlib.sha256(f"{self.name}\0{sticky_value}".encode()).digest()[:8], "big")
                / 2**64
            )
        else:
            u = random.random()
        acc = 0.0
        for v in sorted(weights, key=_version_key):
            acc += weights[v] / total
            if u < acc:
                return self.versions[v]
        return self.versions[max(weights, key=_version_key)]


def _version_key(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Fidelity of a shadow output to the primary's: mean row cosine over float outputs; for a single-column-per-class
    output (logits) the top-1 agreement is what users see, so classifiers use that."""
    scores = []
    for name, x in a.items():
        y = b.get(name)
        if y is None or y.shape != x.shape or x.dtype.kind != "f":
            continue
        x2, y2 = x.reshape(x.shape[0], -1).astype(np.float64), y.reshape(y.shape[0], -1).astype(np.float64)
        if (
            x2.shape[1] > 1
            and x2.shape[1] <= 1000
            and name.lower() in ("logits", "output", "scores", "probabilities")
        ):
            scores.append(float((x2.argmax(1) == y2.argmax(1)).mean()))
            continue
        num = (x2 * y2).sum(1)
        den = np.linalg.norm(x2, axis=1) * np.linalg.norm(y2, axis=1)
        scores.append(float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0))))
    return float(np.mean(scores)) if scores else 0.0


class Server:
    """The state behind the app: model groups, metrics, tokens, limits, an optional registry."""

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        token: str | None = None,
        admin_token: str | None = None,
        registry: Any = None,
    ) -> None:
        self.models: dict[str, ModelGroup] = {}
        self.metrics = Metrics()
        self.limits = limits or Limits()
        self.token = token
        self.admin_token = admin_token
        self.registry = registry
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.started = False
        self.created = time.time()
        #: builds endpoints elsewhere (Ray Serve) instead of in this process: async (name, version, path, batching, source)
        self.endpoint_factory: Any = None
        #: removes what endpoint_factory built, after an unload: async (endpoint)
        self.endpoint_retire: Any = None
        from slimship.serve.abtest import FeedbackStore
        from slimship.serve.live import LiveStats
        from slimship.serve.rollout import RolloutController

        self.rollouts = RolloutController(self)
        self.feedback = FeedbackStore()
        self.live = LiveStats()

    def remember(self, body_id: str | None, request_id: str, model: str, version: str) -> None:
        """Which version answered a request, for feedback sent later (by the protocol id and by x-request-id)."""
        self.feedback.remember(model, request_id, version)
        if body_id and body_id != request_id:
            self.feedback.remember(model, body_id, version)

    def control_version(self, model: str) -> str | None:
        """The version A/B comparisons are made against: the production version if one is loaded."""
        r = self.rollouts.controls(model)
        if r is not None:
            return r.baseline
        group = self.models.get(model)
        for v, ep in group.versions.items() if group else []:
            if ep.source.get("stage") == "production":
                return v
        return None

    def spawn(self, coro: Any) -> None:
        """Run a coroutine in the background (shadow and compare runs), kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def monitor_output(
        self, model: str, ep: Endpoint, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None
    ) -> None:
        """Feed an answered request to the version's drift monitor (if it has one)."""
        if ep.drift is not None and outputs is not None:
            try:
                ep.drift.observe(inputs, outputs)
            except Exception:  # a monitor never fails a request
                log.exception("drift monitor of %s v%s failed on a request", model, ep.version)

    async def watch(self, every_s: float = 2.0) -> None:
        """Background: recompute drift (metrics, alerts) in a worker thread and refresh the rollout gauge."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            for name, group in list(self.models.items()):
                for ep in list(group.versions.values()):
                    if ep.drift is not None and ep.drift.reference is not None:
                        try:
                            await loop.run_in_executor(None, ep.drift.compute, ep.drift.take())
                        except Exception:
                            log.exception("drift computation of %s v%s failed", name, ep.version)
                r = self.rollouts.controls(name)
                self.metrics.rollout_stage.labels(name).set(r.stage if r is not None else -1)

    # ---- model management ---------------------------------------------------------------------
    async def load(
        self,
        name: str,
        version: str,
        path: str,
        batching: BatchingConfig | None = None,
        source: dict[str, Any] | None = None,
        drift: Any = None,
        replicas: Any = None,
    ) -> Endpoint:
        """Build an endpoint (ONNX Runtime session) off the event loop, warm it, then make it routable."""
        async with self._lock:
            group = self.models.get(name)
            if group is not None and version in group.versions:
                raise ServingError(
                    f"{name} v{version} is already loaded; unload it first or load under another version"
                )
            if self.endpoint_factory is not None:  # e.g. a new Ray Serve application
                ep = await self.endpoint_factory(
                    name, version, path, batching, source or {"path": path}, replicas
                )
            else:
                loop = asyncio.get_running_loop()
                ep = await loop.run_in_executor(
                    None, lambda: Endpoint(name, version, path, batching, self.metrics, source)
                )
            ep.drift_config = drift
            return await self._add(ep)

    async def add(self, ep: Endpoint) -> Endpoint:
        """Start a built endpoint and make it routable (once warm)."""
        async with self._lock:
            return await self._add(ep)

    async def _add(self, ep: Endpoint) -> Endpoint:
        group = self.models.get(ep.model)
        if group is not None and ep.version in group.versions:
            raise ServingError(
                f"{ep.model} v{ep.version} is already loaded; unload it first or load under another version"
            )
        await ep.start()
        self._attach_drift(ep)
        self.models.setdefault(ep.model, ModelGroup(ep.model)).versions[ep.version] = ep
        log.info(
            json.dumps({"event": "loaded", "model": ep.model, "version": ep.version, "source": ep.source})
        )
        return ep

    def _attach_drift(self, ep: Endpoint) -> None:
        from slimship.serve.drift import DriftConfig, DriftMonitor

        cfg = ep.drift_config or DriftConfig()
        workload = cfg.workload or ep.source.get("workload")
        if not cfg.enabled or not workload:
            return
        ep.drift = DriftMonitor(ep.model, ep.version, cfg, self.metrics)
        ep.drift.build_in_background(ep.sessions[0], ep.path, workload)

    async def load_from_registry(
        self,
        name: str,
        ref: str,
        version: str | None = None,
        batching: BatchingConfig | None = None,
        registry_model: str | None = None,
        drift: Any = None,
        replicas: Any = None,
    ) -> Endpoint:
        if self.registry is None:
            raise ServingError("this server has no registry: start it with --registry (or SLIMSHIP_REGISTRY)")
        loop = asyncio.get_running_loop()
        reg_model = registry_model or name
        v = await loop.run_in_executor(
            None, self.registry.get, reg_model, int(ref) if str(ref).isdigit() else ref
        )
        cand = await loop.run_in_executor(None, self.registry.fetch, reg_model, v.number)  # verified by hash
        if cand.format != "onnx":
            raise ServingError(
                f"{reg_model} v{v.number} is a {cand.format} model; the server runs ONNX (export it first)"
            )
        return await self.load(
            name,
            version or str(v.number),
            str(cand.artifact_path),
            batching,
            {
                "registry": reg_model,
                "version": v.number,
                "digest": v.digest,
                "stage": v.stage,
                "workload": dict(cand.workload),
            },
            drift,
            replicas,
        )

    async def unload(self, name: str, version: str, drain_timeout: float = 30.0) -> None:
        async with self._lock:
            group = self._group(name)
            ep = group.versions.get(version)
            if ep is None:
                raise NotFound(
                    f"{name} has no loaded version {version}; loaded: {sorted(group.versions, key=_version_key)}"
                )
            r = self.rollouts.controls(name)
            if r is not None and version in (r.candidate, r.baseline):
                raise ProtocolError(
                    f"{name} v{version} is in rollout #{r.record['id']} ({r.state}); abort the rollout "
                    "before unloading it",
                    409,
                )
            del group.versions[version]  # no new request is routed to it from here on
            weights = {v: w for v, w in group.policy.weights.items() if v != version}
            shadow = (
                group.policy.shadow
                if group.policy.shadow is None or group.policy.shadow.version != version
                else None
            )
            group.policy = group.policy.model_copy(update={"weights": weights, "shadow": shadow})
            if not group.versions:
                del self.models[name]
        await ep.stop(drain_timeout)  # requests already routed to it are answered first
        if self.endpoint_retire is not None:
            await self.endpoint_retire(ep)
        log.info(json.dumps({"event": "unloaded", "model": name, "version": version}))

    def set_traffic(self, name: str, policy: TrafficPolicy) -> None:
        group = self._group(name)
        r = self.rollouts.controls(name)
        if r is not None:
            raise ProtocolError(
                f"rollout #{r.record['id']} ({r.state}) controls {name}'s traffic; pause or abort it first "
                f"(`slimship rollout abort {name}`)",
                409,
            )
        unknown = [v for v in policy.weights if v not in group.versions]
        if policy.shadow is not None and policy.shadow.version not in group.versions:
            unknown.append(policy.shadow.version)
        if unknown:
            raise ProtocolError(
                f"traffic for {name} names version(s) {unknown} that aren't loaded; loaded: "
                f"{sorted(group.versions, key=_version_key)}"
            )
        if policy.weights and sum(policy.weights.values()) <= 0:
            raise ProtocolError("traffic weights must include a positive weight")
        group.policy = policy

    def _group(self, name: str) -> ModelGroup:
        group = self.models.get(name)
        if group is None:
            raise NotFound(f"unknown model {name!r}; models: {sorted(self.models)}")
        return group

    def endpoint(self, name: str, version: str | None, sticky: str | None = None) -> Endpoint:
        group = self._group(name)
        if version is None:
            return group.route(sticky)
        ep = group.versions.get(version)
        if ep is None:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: {sorted(group.versions, key=_version_key)}"
            )
        return ep

    async def stop(self) -> None:
        await self.rollouts.stop_loop()
        for t in list(self._background):
            t.cancel()
        for group in list(self.models.values()):
            for ep in list(group.versions.values()):
                await ep.stop()

    # ---- shadow -------------------------------------------------------------------------------
    def maybe_shadow(
        self, name: str, primary: Endpoint, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        group = self.models.get(name)
        if group is None or group.policy.shadow is None:
            return
        sh = group.policy.shadow
        target = group.versions.get(sh.version)
        if target is None or target is primary or random.random() >= sh.fraction:
            return

        async def run() -> None:
            stats = group.shadow_stats.setdefault(sh.version, ShadowStats())
            try:
                got = await target.infer(inputs)
            except Exception as err:  # never reaches the client
                stats.errors += 1
                self.metrics.shadow_errors.labels(name, sh.version).inc()
                log.debug("shadow request to %s v%s failed: %s", name, sh.version, err)
                return
            value = agreement(outputs, got)
            stats.add(value)
            self.monitor_output(name, target, inputs, got)
            self.metrics.shadow_fidelity.labels(name, primary.version, sh.version).observe(value)

        self.spawn(run())


# ---- HTTP --------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    return Response(
        json.dumps(body, separators=(",", ":")), status, headers=headers, media_type="application/json"
    )


def _error(err: ProtocolError | str, status: int = 400) -> Any:
    if isinstance(err, ProtocolError):
        return _json({"error": str(err)}, err.status, err.headers)
    return _json({"error": err}, status)


def _bearer_ok(header: str | None, token: str) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(server: Server, startup: list[Any] | None = None) -> Any:
    """The ASGI app. ``startup``: coroutines (e.g. model loads) awaited when the app starts."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from slimship import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        for coro in startup or []:
            await coro
        await server.rollouts.restore()  # rollouts stored in the registry go on where they were
        server.rollouts.start_loop()
        server.spawn(server.watch())
        server.started = True
        try:
            yield
        finally:
            server.started = False
            await server.stop()

    def guard(admin: bool = False) -> Any:
        def deco(fn: Any) -> Any:
            async def handler(request: Request) -> Any:
                t0 = time.perf_counter()
                rid = request.headers.get("x-request-id") or uuid.uuid4().hex
                request.state.rid = request.state.model = request.state.version = None
                request.state.rid = rid
                try:
                    if admin:
                        if server.admin_token is None:
                            raise ProtocolError(
                                "the admin API is disabled: start the server with --admin-token", 403
                            )
                        if not _bearer_ok(request.headers.get("authorization"), server.admin_token):
                            raise Unauthorized(
                                "admin API: send `Authorization: Bearer <admin token>`",
                                headers={"WWW-Authenticate": "Bearer"},
                            )
                    elif (
                        server.token is not None
                        and request.url.path.endswith(("/infer", "/feedback"))
                        and not _bearer_ok(request.headers.get("authorization"), server.token)
                    ):
                        raise Unauthorized(
                            "inference needs `Authorization: Bearer <token>`",
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                    resp = await fn(request)
                except ProtocolError as err:
                    resp = _error(err)
                except ValidationError as err:
                    resp = _error(f"invalid body: {err.errors(include_url=False)}", 400)
                except SlimshipError as err:
                    resp = _error(str(err), 400)
                except Exception:  # opaque to the client, whole in the log
                    log.exception(
                        "unexpected error on %s %s (request %s)", request.method, request.url.path, rid
                    )
                    resp = _error(f"internal server error (request id {rid})", 500)
                resp.headers["x-request-id"] = rid
                ms = (time.perf_counter() - t0) * 1000
                route = request.scope.get("route")
                server.metrics.http.labels(
                    getattr(route, "path", request.url.path), str(resp.status_code)
                ).inc()
                access_log.info(
                    json.dumps(
                        {
                            "method": request.method,
                            "path": request.url.path,
                            "status": resp.status_code,
                            "ms": round(ms, 3),
                            "model": request.state.model,
                            "version": request.state.version,
                            "request_id": rid,
                            "client": request.client.host if request.client else None,
                        }
                    )
                )
                return resp

            return handler

        return deco

    # ---- health & metadata ----
    @guard()
    async def live(request: Request) -> Any:
        return _json({"live": True})

    @guard()
    async def ready(request: Request) -> Any:
        ok = server.started and all(ep.ready for g in server.models.values() for ep in g.versions.values())
        return _json({"ready": ok}, 200 if ok else 503)

    @guard()
    async def server_meta(request: Request) -> Any:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    @guard()
    async def model_meta(request: Request) -> Any:
        name, version = request.path_params["model"], request.path_params.get("version")
        group = server._group(name)
        ep = server.endpoint(name, version or group.default_version())
        meta = ep.metadata()
        meta["versions"] = sorted(group.versions, key=_version_key) if version is None else [ep.version]
        return _json(meta)

    @guard()
    async def model_ready(request: Request) -> Any:
        name, version = request.path_params["model"], request.path_params.get("version")
        group = server._group(name)
        ep = server.endpoint(name, version or group.default_version())
        return _json({"name": name, "version": ep.version, "ready": ep.ready}, 200 if ep.ready else 503)

    @guard()
    async def infer(request: Request) -> Any:
        name, version = request.path_params["model"], request.path_params.get("version")
        t0 = time.perf_counter()
        body = await _read_body(request, server.limits.max_body_bytes)
        req = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        group = server._group(name)
        sticky = request.headers.get(group.policy.sticky_header) if group.policy.sticky_header else None
        ep = server.endpoint(name, version, sticky)
        request.state.model, request.state.version = name, ep.version
        status = "200"
        outputs = None
        t_infer = time.perf_counter()
        try:
            outputs = await ep.infer(req.inputs)
            t_infer = time.perf_counter() - t_infer  # queue + run: what the rollout compares between versions
            data, headers = encode_infer_response(name, ep.version, req.id, outputs, req)
        except ProtocolError as err:
            status = str(err.status)
            raise
        except Exception:
            status = "500"
            raise
        finally:
            elapsed = time.perf_counter() - t0
            server.metrics.requests.labels(name, ep.version, status).inc()
            server.metrics.latency.labels(name, ep.version).observe(elapsed)
            server.live.add(name, ep.version, elapsed, status)
            if version is None and (status == "200" or int(status) >= 500):
                server.rollouts.observe(
                    name,
                    ep,
                    req.inputs,
                    outputs if status == "200" else None,
                    t_infer if status == "200" else elapsed,
                    status == "200",
                )
        server.remember(req.id, request.state.rid, name, ep.version)
        server.monitor_output(name, ep, req.inputs, outputs)
        if version is None:
            server.maybe_shadow(name, ep, req.inputs, outputs)
        headers["x-model-version"] = ep.version
        return Response(data, 200, headers=headers)

    async def metrics(request: Request) -> Any:
        data, ctype = server.metrics.render()
        return Response(data, 200, media_type=ctype.split(";")[0], headers={"content-type": ctype})

    # ---- admin ----
    @guard(admin=True)
    async def admin_state(request: Request) -> Any:
        out = {}
        for name, g in server.models.items():
            out[name] = {
                "versions": {
                    v: {
                        "ready": ep.ready,
                        "source": ep.source,
                        "queue": ep._queue.qsize() if ep._queue else 0,
                        "batching": ep.config.model_dump(),
                        "runtime_settings": ep.runtime_settings(),
                    }
                    for v, ep in g.versions.items()
                },
                "traffic": g.policy.model_dump(),
                "shadow": {v: s.as_dict() for v, s in g.shadow_stats.items()},
            }
        return _json({"models": out})

    class LoadBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str | None = None
        registry: str | None = None  # a version number or stage of the registry model with this name
        registry_model: str | None = None
        version: str | None = None
        batching: BatchingConfig = BatchingConfig()
        drift: DriftConfig = DriftConfig()
        replicas: ReplicaConfig | None = (
            None  # on Ray Serve (`serve --ray`); ignored by the single-process server
        )

    @guard(admin=True)
    async def admin_load(request: Request) -> Any:
        name = request.path_params["model"]
        body = LoadBody.model_validate_json(await _read_body(request, 1 << 20) or b"{}")
        if (body.path is None) == (body.registry is None):
            raise ProtocolError('give either "path" (an ONNX file) or "registry" (a version number or stage)')
        if body.path is not None:
            version = body.version or str(
                1
                + max(
                    (int(v) for v in server.models.get(name, ModelGroup(name)).versions if v.isdigit()),
                    default=0,
                )
            )
            ep = await server.load(
                name, version, body.path, body.batching, {"path": body.path}, body.drift, body.replicas
            )
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

    @guard(admin=True)
    async def admin_unload(request: Request) -> Any:
        name, version = request.path_params["model"], request.path_params["version"]
        await server.unload(name, version)
        return _json({"model": name, "version": version, "unloaded": True})

    @guard(admin=True)
    async def admin_traffic(request: Request) -> Any:
        name = request.path_params["model"]
        policy = TrafficPolicy.model_validate_json(await _read_body(request, 1 << 20))
        server.set_traffic(name, policy)
        return _json({"model": name, "traffic": server.models[name].policy.model_dump()})

    class StageBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        stage: str
        reason: str = ""

    @guard(admin=True)
    async def admin_stage(request: Request) -> Any:
        name, version = request.path_params["model"], request.path_params["version"]
        body = StageBody.model_validate_json(await _read_body(request, 1 << 20))
        if server.registry is None:
            raise ServingError("this server has no registry: start it with --registry")
        ep = server.endpoint(name, version)
        reg_model = ep.source.get("registry", name)
        number = int(ep.source.get("version", version))
        v = await asyncio.get_running_loop().run_in_executor(
            None, lambda: server.registry.set_stage(reg_model, number, body.stage, reason=body.reason)
        )
        return _json({"model": reg_model, "version": v.number, "stage": v.stage})

    # ---- A/B feedback ----
    class FeedbackBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str = Field(min_length=1)
        outcome: StrictBool | StrictInt | StrictFloat  # true/false, 0/1 or any number; "yes" is refused
        metric: str = Field(default="outcome", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @guard()
    async def feedback(request: Request) -> Any:
        name = request.path_params["model"]
        server._group(name)
        body = FeedbackBody.model_validate_json(await _read_body(request, 1 << 20) or b"{}")
        version = server.feedback.record(name, body.id, body.outcome, body.metric)
        return _json(
            {"model": name, "id": body.id, "version": version, "metric": body.metric, "recorded": True}
        )

    @guard()
    async def feedback_summary(request: Request) -> Any:
        name = request.path_params["model"]
        server._group(name)
        q = request.query_params
        try:
            alpha = float(q.get("alpha", 0.05))
            min_samples = int(q.get("min_samples", 30))
        except ValueError as err:
            raise ProtocolError(f"alpha is a number in (0, 1) and min_samples an integer: {err}") from err
        if not 0 < alpha < 1 or min_samples < 2:
            raise ProtocolError("alpha must be in (0, 1) and min_samples ≥ 2")
        return _json(
            {
                "model": name,
                "metrics": server.feedback.summary(name, server.control_version(name), alpha, min_samples),
            }
        )

    # ---- rollouts ----
    class RolloutBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        candidate: str
        baseline: str | None = None
        policy: dict[str, Any] | None = None

    class ReasonBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        reason: str = ""

    @guard(admin=True)
    async def rollout_start(request: Request) -> Any:
        name = request.path_params["model"]
        body = RolloutBody.model_validate_json(await _read_body(request, 1 << 20) or b"{}")
        return _json(await server.rollouts.start(name, body.candidate, body.baseline, body.policy))

    @guard(admin=True)
    async def rollout_status(request: Request) -> Any:
        name = request.path_params["model"]
        server._group(name)
        return _json(await server.rollouts.status_with_history(name))

    @guard(admin=True)
    async def rollout_action(request: Request) -> Any:
        name, action = request.path_params["model"], request.path_params["action"]
        body = ReasonBody.model_validate_json(await _read_body(request, 1 << 20) or b"{}")
        fn = {
            "pause": server.rollouts.pause,
            "resume": server.rollouts.resume,
            "abort": server.rollouts.abort,
        }.get(action)
        if fn is None:
            raise NotFound(f"no rollout action {action!r}; use pause, resume or abort")
        return _json(await fn(name, body.reason))

    # ---- dashboard ----
    @guard()
    async def dashboard_page(request: Request) -> Any:
        from slimship.serve.dashboard import page

        return Response(
            page(),
            200,
            media_type="text/html; charset=utf-8",
            headers={
                "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src data:"
            },
        )

    @guard()
    async def dashboard_state(request: Request) -> Any:
        from slimship.serve.dashboard import state

        return _json(await state(server))

    async def not_found(request: Request, exc: Exception) -> Any:
        return _error(
            f"no route {request.method} {request.url.path}; see /v2 for the protocol's endpoints", 404
        )

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_meta),
        Route("/v2/models/{model}", model_meta),
        Route("/v2/models/{model}/versions/{version}", model_meta),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/v2/admin/models", admin_state),
        Route("/v2/admin/models/{model}/load", admin_load, methods=["POST"]),
        Route("/v2/admin/models/{model}/versions/{version}/unload", admin_unload, methods=["POST"]),
        Route("/v2/admin/models/{model}/traffic", admin_traffic, methods=["PUT"]),
        Route("/v2/admin/models/{model}/versions/{version}/stage", admin_stage, methods=["POST"]),
        Route("/v2/models/{model}/feedback", feedback, methods=["POST"]),
        Route("/v2/models/{model}/feedback", feedback_summary, methods=["GET"]),
        Route("/v2/admin/models/{model}/rollout", rollout_start, methods=["POST"]),
        Route("/v2/admin/models/{model}/rollout", rollout_status, methods=["GET"]),
        Route("/v2/admin/models/{model}/rollout/{action}", rollout_action, methods=["POST"]),
        Route("/dashboard", dashboard_page),
        Route("/v2/dashboard/state", dashboard_state),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app
