"""`slimship serve --ray`: the same server on Ray Serve.

    HTTP ─► Ray Serve proxy ─► slimship ingress (N replicas, ``--ingress-replicas``: the protocol app — routing,
                                traffic, rollouts, drift, A/B feedback, metrics, admin API, dashboard — exactly the
                                single-process code)  ──► with N > 1, one IngressState actor (serve/shared.py)
                                     │ DeploymentHandle.infer(inputs)      owns what replicas must agree on
                                     ▼
                               one Serve application per model version ("slimship-<model>-v<version>"):
                               replicas, each an ONNX Runtime session with its own dynamic batcher

Replicas and autoscaling come from each model's ``replicas`` block of the serving config. Backpressure is set
deliberately: Ray Serve's default of 5 requests in flight per replica starves the batcher and collapses throughput
under load, so each replica takes ``max_ongoing_requests`` (default 64) and Serve queues at most
``max_queued_requests`` more per handle; beyond that the client gets 503 with Retry-After at once. A request whose
replica dies while it runs is retried once on another replica (inference is idempotent), then answered 503 — never
left hanging; Serve starts a replacement replica. Requests are validated in the ingress before they are sent.

With ``ingress_replicas`` > 1 the replicas share traffic policies, rollout windows and decisions, A/B ids, outcomes
and tallies and shadow counts through one actor (see :mod:`slimship.serve.shared`); each answer names its replica in
``x-slimship-ingress``, and /metrics, statistics, live figures and drift stay per replica.

Admin loads deploy a new model application from the ingress replica that got the request (the others attach to it);
unloads delete it once every ingress replica has dropped it. ``--address`` points at a running
cluster (``auto``, ``host:port`` of the head's GCS); without it a local Ray instance starts bound to 127.0.0.1, its
processes children of this one: stop it by signalling this process (SIGTERM / Ctrl-C), which removes the deployments
and then stops Ray — a SIGTERM to the whole process group kills Ray's own processes under the shutdown, and Ray's core
may then abort the driver (exit -6) after waiting for a controller that is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import ServingError
from slimship.serve.config import BatchingConfig, DriftConfig, Limits, ReplicaConfig, TrafficPolicy
from slimship.serve.endpoint import Endpoint, ModelIO, ServedEndpoint, WireTensorSpec
from slimship.serve.http import create_app
from slimship.serve.protocol import Overloaded, ProtocolError, TimedOut
from slimship.serve.run import configure_logging, resolve_models
from slimship.serve.server import Server
from slimship.serve.shared import IngressState, SharedState
from slimship.serve.stats import ModelStats

log = logging.getLogger("slimship.serve")

INSTALL_HINT = "pip install 'slimship[ray]'"
INGRESS_APP = "slimship"
#: the actor replicated ingresses share (named, in its own namespace, owned by the `slimship serve --ray` driver)
SHARED_STATE = {"name": "slimship-ingress-state", "namespace": "slimship"}
#: a local instance's object store: requests and answers pass through it, models don't (each replica loads its file)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
#: attempts per request when its replica dies under it (the first try plus one retry on another replica)
ATTEMPTS = 2


def _loopback_replica_grpc() -> None:
    """Ray 2.60's replicas open their inter-deployment gRPC port on ``[::]`` whatever the node IP is; on a local
    instance (bound to 127.0.0.1) keep that port on the loopback interface too. Runs in each replica process when it
    imports this module (before the replica starts that server)."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    orig = replica.add_port_to_grpc_server
    if getattr(orig, "_slimship_loopback", False):
        return

    def loopback(server: Any, address: str) -> Any:
        return orig(server, address.replace("[::]", "127.0.0.1"))

    loopback._slimship_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


if os.environ.get("SLIMSHIP_RAY_LOOPBACK") == "1":
    _loopback_replica_grpc()


#: readiness / health-check timeouts for Serve's HTTP proxy in a local instance (Ray 2.60's defaults: 5 s / 10 s)
PROXY_CHECK_TIMEOUTS_S = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def import_serve(local: bool) -> Any:
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read once, when Ray is imported
        os.environ["SLIMSHIP_RAY_LOOPBACK"] = "1"  # inherited by the workers of the local instance
        # Serve gives its HTTP proxy 5 s to answer a readiness check and marks it unhealthy after 3 misses: on 2 busy
        # cores it starts slower than that (measured: the test suite beside a training job) and the server never comes
        # up. A local instance waits longer; a user's own setting wins
        for var, seconds in PROXY_CHECK_TIMEOUTS_S.items():
            os.environ.setdefault(var, seconds)
        # Ray starts every worker at nice 15 (its raylet's worker_niceness), which in `serve --ray` is the whole
        # server — ingress and model replicas: on a host doing anything else it would answer last
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ServingError(
            f"--ray needs Ray Serve, which is not installed here ({err}); install it with: {INSTALL_HINT}"
        ) from err
    return ray, serve


def app_name(model: str, version: str) -> str:
    return f"slimship-{model}-v{version}"


# ---- the model replica -------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the server's metrics inside a replica: batch sizes, queue times, queue depth and where batches ran
    are kept and shipped back with the next answer, and the ingress replays them into its /metrics (every request
    passes it). A record is (series, its labels after model and version, value)."""

    class _Series:
        def __init__(self, rec: _Recorder, name: str, extra: tuple[str, ...] = ()) -> None:
            self._rec, self._name, self._extra = rec, name, extra

        def labels(self, _model: str, _version: str, *extra: str) -> _Recorder._Series:
            return _Recorder._Series(self._rec, self._name, extra)

        def observe(self, value: float) -> None:
            self._rec.pending.append((self._name, self._extra, float(value)))

        set = observe

        def inc(self, value: float = 1.0) -> None:
            self.observe(value)

    def __init__(self) -> None:
        self.pending: list[tuple[str, tuple[str, ...], float]] = []
        self.batch_size = self._Series(self, "batch_size")
        self.queue_time = self._Series(self, "queue_time")
        self.queue_depth = self._Series(self, "queue_depth")
        self.batch_runs = self._Series(self, "batch_runs")

    def drain(self) -> list[tuple[str, tuple[str, ...], float]]:
        out, self.pending = self.pending, []
        return out


class ModelReplica:
    """One replica of one model version: an ONNX Runtime session and a dynamic batcher (the single-process Endpoint)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits it
        self, model: str, version: str, path: str, batching: dict[str, Any], source: dict[str, Any]
    ) -> None:
        cfg = BatchingConfig(**batching)
        self.recorder = _Recorder()
        self.ep = Endpoint(model, version, path, cfg, self.recorder, source)
        await self.ep.start()

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        outputs = await self.ep.infer(inputs)
        return {"outputs": outputs, "metrics": self.recorder.drain()}

    def info(self) -> dict[str, Any]:
        ep = self.ep
        return {
            "inputs": [(s.name, s.datatype, s.shape) for s in ep.inputs],
            "outputs": [(s.name, s.datatype, s.shape) for s in ep.outputs],
            "batchable": ep.batchable,
            "pads": ep.pads,
            "path": str(ep.path),
            "pid": os.getpid(),
            "runtime_settings": ep.runtime_settings(),
            "verification": ep.verification,
        }

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A direct session run (the ingress builds the drift reference with it)."""
        return list(self.ep.session.run(names, feeds))

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        if not self.ep.ready:
            raise RuntimeError("the endpoint is not ready")


class _RemoteSession:
    """Just enough of an ONNX Runtime session for the drift reference, run on a replica."""

    def __init__(self, handle: Any, info: dict[str, Any]) -> None:
        from types import SimpleNamespace

        self._handle = handle
        self._inputs = [SimpleNamespace(name=n) for n, _, _ in info["inputs"]]
        self._outputs = [SimpleNamespace(name=n) for n, _, _ in info["outputs"]]

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(
            self._handle.run.remote(names or [o.name for o in self._outputs], feeds).result(timeout_s=120)
        )


class RemoteEndpoint(ModelIO):
    """An endpoint whose batches run on Ray Serve replicas: the ingress routes, validates and measures here."""

    def __init__(
        self,
        model: str,
        version: str,
        handle: Any,
        info: dict[str, Any],
        config: BatchingConfig,
        source: dict[str, Any],
        replicas: ReplicaConfig,
        metrics: Any = None,
    ) -> None:
        self.model, self.version = model, str(version)
        self.metrics = metrics
        self.handle, self.config, self.source, self.replicas = handle, config, source, replicas
        self.inputs = [WireTensorSpec(n, d, tuple(s)) for n, d, s in info["inputs"]]
        self.outputs = [WireTensorSpec(n, d, tuple(s)) for n, d, s in info["outputs"]]
        self.batchable, self.pads = bool(info["batchable"]), bool(info["pads"])
        self.path = Path(info["path"])
        self.session = _RemoteSession(handle, info)
        self._runtime_settings: dict[str, Any] = dict(info["runtime_settings"])  # as the replica applies them
        self.verification: dict[str, Any] = dict(info["verification"])  # the replica's probe at its start
        self.ready = False
        self.in_flight = 0
        self.drift_config: DriftConfig | None = None
        self.drift: Any = None
        #: what the ingress sees (success / fail, rows, last inference); the replicas' batchers count the rest
        self.stats = ModelStats()

    @property
    def queue_depth(self) -> int:
        """Requests this ingress sent to the version and has no answer for yet: waiting in Serve's queue or a
        replica's batcher, or running (the ingress can't tell those apart; replicas' own queues reach /metrics)."""
        return self.in_flight

    def runtime_settings(self) -> dict[str, Any]:
        return self._runtime_settings

    async def start(self) -> None:
        self.ready = True

    def _replay(self, records: list[tuple[str, tuple[str, ...], float]]) -> None:
        if self.metrics is None:
            return
        for name, extra, value in records:
            series = getattr(self.metrics, name).labels(self.model, self.version, *extra)
            if name == "queue_depth":
                series.set(value)
            elif name == "batch_runs":
                series.inc(value)
            else:
                series.observe(value)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self.ready = False
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError

        if not self.ready:
            raise Overloaded(
                f"{self.model} v{self.version} is not ready (loading or shutting down)",
                headers={"Retry-After": "1"},
            )
        self.validate(inputs)
        self.in_flight += 1
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    answer = await asyncio.wait_for(self.handle.infer.remote(inputs), self.config.timeout_s)
                    self._replay(answer["metrics"])
                    return dict(answer["outputs"])
                except BackPressureError as err:
                    raise Overloaded(
                        f"{self.model} v{self.version} is overloaded on Ray Serve ({err}); retry shortly",
                        headers={"Retry-After": "1"},
                    ) from err
                except TimeoutError as err:
                    raise TimedOut(
                        f"{self.model} v{self.version} did not answer within {self.config.timeout_s:g} s"
                    ) from err
                except (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError) as err:
                    log.warning(
                        json.dumps(
                            {
                                "event": "replica.lost",
                                "model": self.model,
                                "version": self.version,
                                "attempt": attempt,
                                "error": type(err).__name__,
                            }
                        )
                    )
                    if attempt == ATTEMPTS:
                        raise Overloaded(
                            f"the replica of {self.model} v{self.version} running this request died; retry",
                            headers={"Retry-After": "1"},
                        ) from err
                except rex.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, ProtocolError):
                        raise cause from None
                    raise
            raise AssertionError("unreachable")
        finally:
            self.in_flight -= 1


# ---- deploying ---------------------------------------------------------------------------------------


def _deployment_options(replicas: ReplicaConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_ongoing_requests": replicas.max_ongoing_requests,
        "max_queued_requests": replicas.max_queued_requests,
        "ray_actor_options": {"num_cpus": replicas.num_cpus},
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": 10,
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
    }
    if replicas.autoscaling is not None:
        a = replicas.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": 3,
            "downscale_delay_s": 30,
        }
    else:
        opts["num_replicas"] = replicas.num_replicas
    return opts


def _cpus_needed(replicas: ReplicaConfig) -> float:
    """CPUs a version's replicas reserve at start (autoscaling: its minimum)."""
    return replicas.num_cpus * (
        replicas.autoscaling.min_replicas if replicas.autoscaling else replicas.num_replicas
    )


def check_placement(ray: Any, replicas: ReplicaConfig, where: str, what: str) -> None:
    """Refuse up front a replica the cluster can't place (it would wait forever otherwise)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    total, largest = sum(cpus), max(cpus, default=0.0)
    need = _cpus_needed(replicas)
    if replicas.num_cpus > largest:
        raise ServingError(
            f"{what}: each replica asks for {replicas.num_cpus:g} CPUs but the largest node of the Ray cluster "
            f"at {where} has {largest:g}; lower replicas.num_cpus or add a bigger node"
        )
    if need > total:
        raise ServingError(
            f"{what}: {need / replicas.num_cpus:g} replicas × {replicas.num_cpus:g} CPUs = {need:g} CPUs, but the "
            f"Ray cluster at {where} has {total:g} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}); lower "
            "replicas.num_replicas / num_cpus, or add nodes"
        )


def check_free(ray: Any, replicas: ReplicaConfig, what: str) -> None:
    """On a local instance (no autoscaler adds nodes), refuse a version its free CPUs can't hold: Ray would keep the
    replica pending forever while the versions already loaded hold the CPUs."""
    need = _cpus_needed(replicas)
    free = float(ray.available_resources().get("CPU", 0.0))
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if need > free + 1e-9:
        raise ProtocolError(
            f"{what}: its replicas need {need:g} CPUs but only {free:g} of this local Ray instance's {total:g} are "
            "free (the versions loaded now hold the rest); unload a version, or lower replicas.num_cpus / "
            "num_replicas",
            409,
        )


def deploy_model(
    serve: Any,
    model: str,
    version: str,
    path: str,
    batching: BatchingConfig,
    source: dict[str, Any],
    replicas: ReplicaConfig,
    wait: bool = True,
) -> Any:
    """Deploy (or redeploy) one model version as its own Serve application; returns its handle. With
    ``wait=False`` it returns at once (:func:`wait_running` bounds the wait instead)."""
    threads = max(1, int(replicas.num_cpus))
    cfg = batching.model_copy(update={"threads": batching.threads or threads})
    dep = serve.deployment(ModelReplica, name="model", **_deployment_options(replicas))
    app = dep.bind(model, version, path, cfg.model_dump(), source)
    if wait:
        return serve.run(app, name=app_name(model, version), route_prefix=None, blocking=False)
    from ray.serve.api import _run

    return _run(app, _blocking=False, name=app_name(model, version), route_prefix=None)


def wait_running(serve: Any, name: str, timeout_s: float, what: str) -> None:
    """Wait until the application `name` runs; if it fails, or isn't up within `timeout_s`, delete it and raise
    a 503 that says why (Serve's own message: a crash while loading, a replica it can't place)."""
    import time

    deadline = time.monotonic() + timeout_s
    message = ""
    while True:
        app = serve.status().applications.get(name)
        state = str(getattr(app, "status", "")) if app is not None else ""
        if state.endswith("RUNNING"):
            return
        if app is not None:
            message = app.message or "; ".join(
                f"{d}: {getattr(ds, 'message', '')}"
                for d, ds in app.deployments.items()
                if getattr(ds, "message", "")
            )
        failed = state.endswith(("DEPLOY_FAILED", "UNHEALTHY"))
        if failed or time.monotonic() > deadline:
            try:
                serve.delete(name)
            except Exception as err:  # the answer below matters more; say it in the log
                log.warning("could not remove the application %s: %s", name, err)
            why = (
                "failed to start"
                if failed
                else f"was not up within {timeout_s:g} s (replicas.start_timeout_s)"
            )
            raise ProtocolError(
                f"{what} {why} and was removed; Ray Serve said: {' '.join(message.split())[:600] or 'nothing'}",
                503,
            )
        time.sleep(0.25)


class Ingress:
    """The protocol app as the Serve ingress; its endpoints forward to the model applications."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    async def __serve_build_asgi_app__(self) -> Any:
        import ray
        from ray import serve

        spec = self.spec
        configure_logging(spec.get("log_level", "info"), spec.get("access_log", True))
        registry = None
        if spec.get("registry") is not None or spec.get("registry_url") is not None:
            from slimship.registry import Registry

            registry = Registry(spec.get("registry"), url=spec.get("registry_url"))
        server = Server(
            limits=Limits(**spec["limits"]),
            token=spec.get("token"),
            admin_token=spec.get("admin_token"),
            registry=registry,
        )
        if spec.get("shared_state"):
            server.shared = SharedState(
                ray.get_actor(**spec["shared_state"]), _replica_id(), int(spec.get("ingress_replicas", 2))
            )
        endpoints: list[ServedEndpoint] = []
        for m in spec["models"]:
            handle = serve.get_app_handle(app_name(m["name"], m["version"]))
            info = await handle.info.remote()
            ep = RemoteEndpoint(
                m["name"],
                m["version"],
                handle,
                info,
                BatchingConfig(**m["batching"]),
                m["source"],
                ReplicaConfig(**m["replicas"]),
                server.metrics,
            )
            ep.drift_config = DriftConfig(**m["drift"])
            endpoints.append(ep)

        async def factory(
            name: str,
            version: str,
            path: str,
            batching: BatchingConfig | None,
            source: dict[str, Any],
            replicas_cfg: ReplicaConfig | None = None,
        ) -> ServedEndpoint:
            replicas = replicas_cfg or ReplicaConfig()
            what = f"{name} v{version}"
            check_placement(ray, replicas, "this cluster", what)
            if spec.get("local"):
                check_free(ray, replicas, what)
            b = batching or BatchingConfig()
            loop = asyncio.get_running_loop()

            def deploy() -> Any:
                handle = deploy_model(serve, name, version, path, b, source, replicas, wait=False)
                wait_running(serve, app_name(name, version), replicas.start_timeout_s, what)
                return handle

            handle = await loop.run_in_executor(None, deploy)
            info = await handle.info.remote()
            return RemoteEndpoint(name, version, handle, info, b, source, replicas, server.metrics)

        async def retire(ep: ServedEndpoint) -> None:
            await asyncio.get_running_loop().run_in_executor(
                None, serve.delete, app_name(ep.model, ep.version)
            )

        async def attach(name: str, version: str, load: dict[str, Any]) -> ServedEndpoint:
            """A version another ingress replica deployed: its application's handle, no second deployment."""
            handle = serve.get_app_handle(app_name(name, version))
            info = await handle.info.remote()
            ep = RemoteEndpoint(
                name,
                version,
                handle,
                info,
                BatchingConfig(**(load.get("batching") or {})),
                dict(load.get("source") or {}),
                ReplicaConfig(**(load.get("replicas") or {})),
                server.metrics,
            )
            ep.drift_config = DriftConfig(**load["drift"]) if load.get("drift") else None
            return ep

        server.endpoint_factory = factory
        server.endpoint_retire = retire
        server.endpoint_attach = attach

        async def start_all() -> None:
            for ep in endpoints:
                await server.add(ep)
            for name, policy in spec.get("traffic", {}).items():
                server.set_traffic(name, TrafficPolicy(**policy))

        return create_app(server, startup=[start_all()])


def _replica_id() -> str:
    """This ingress replica's Serve id (its pid where Serve doesn't say)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica, or an older Serve
        return f"pid-{os.getpid()}"


def start_shared_state(ray: Any, max_ids: int) -> Any:
    """The actor replicated ingresses share: no CPU reserved, one call at a time (its methods are short)."""
    try:
        return (
            ray.remote(IngressState)
            .options(**SHARED_STATE, num_cpus=0, max_concurrency=1, max_restarts=0)
            .remote(max_ids)
        )
    except ValueError as err:  # the name is taken: another `slimship serve --ray` runs on this cluster
        raise ServingError(
            f"another slimship server already runs on this Ray cluster ({err}); stop it, or serve on another cluster"
        ) from err


def serve_on_ray(
    config: Any,
    token: str | None = None,
    admin_token: str | None = None,
    log_level: str = "info",
    access_log: bool = True,
    address: str | None = None,
) -> None:
    """Deploy every model version and the ingress, then block until interrupted (the deployments are removed)."""
    import signal
    import time

    ray, serve = import_serve(local=address is None)
    from slimship.ray_local import connect

    configure_logging(log_level, access_log)
    resolved = resolve_models(
        config
    )  # registry checkouts verified, files found — before anything is deployed
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if address is None:
        # a new instance of our own, every port on 127.0.0.1 (a bare ray.init() would join any cluster already here)
        say("starting a local Ray instance (127.0.0.1)")
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=True,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        )
        try:  # replicas' output reaches this process's stderr asynchronously (and not always): say where it lands first
            from ray._private.worker import _global_node

            if _global_node is not None:
                say(f"Ray worker logs (every replica's stdout/stderr): {_global_node.get_logs_dir_path()}")
        except Exception:  # a private API; only a hint
            pass
    else:
        try:
            connect(ray, address, say)
        except Exception as err:
            raise ServingError(str(err)) from err
    where = address or "127.0.0.1 (local)"
    for m in resolved:
        check_placement(ray, m["replicas_cfg"], where, f"{m['name']} v{m['version']}")
    serve.start(
        http_options={"host": config.host, "port": config.port},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    try:
        shared = None
        if config.ingress_replicas > 1:
            shared = start_shared_state(ray, config.limits.max_remembered_ids)
            ray.get(shared.policies.remote())  # up before any ingress asks for it
        for m in resolved:
            say(
                f"deploying {m['name']} v{m['version']} on Ray Serve ({m['replicas_cfg'].model_dump(exclude_none=True)})"
            )
            deploy_model(
                serve, m["name"], m["version"], m["path"], m["batching_cfg"], m["source"], m["replicas_cfg"]
            )
        spec = {
            "models": [{k: v for k, v in m.items() if not k.endswith("_cfg")} for m in resolved],
            "traffic": {k: v.model_dump() for k, v in config.traffic.items()},
            "limits": config.limits.model_dump(),
            "registry": config.registry,
            "registry_url": config.registry_url,
            "token": token,
            "admin_token": admin_token,
            "log_level": log_level,
            "access_log": access_log,
            "shared_state": SHARED_STATE if shared is not None else None,
            "ingress_replicas": config.ingress_replicas,
            "local": address is None,
        }
        ingress = serve.deployment(
            serve.ingress()(Ingress),
            name="ingress",
            num_replicas=config.ingress_replicas,
            max_ongoing_requests=1024,
            max_queued_requests=4096,
            ray_actor_options={"num_cpus": 0},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        serve.run(ingress.bind(spec), name=INGRESS_APP, route_prefix="/")
        say(
            f"serving {', '.join(sorted({m['name'] for m in resolved}))} through {config.ingress_replicas} ingress "
            f"replica{'s' if config.ingress_replicas > 1 else ''} on Ray Serve at http://{config.host}:{config.port} "
            "(Ctrl-C or SIGTERM stops and removes the deployments)"
        )
        stop = {"now": False}

        def _stop(*_: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        say("shutting down Ray Serve")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
