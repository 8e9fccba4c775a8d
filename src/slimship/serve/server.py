"""The server's state behind the HTTP app: model groups, load / unload, traffic policies, shadow traffic, drift
monitors, feedback ids, rollouts, metrics. Nothing here speaks HTTP (that is :mod:`slimship.serve.http`).

A model is a group of served versions (:mod:`slimship.serve.routing`). A shadow version receives a share of a
model's versionless traffic in the background: the client is answered by the primary, the two answers are compared
(:mod:`slimship.serve.compare`) and the agreement recorded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from slimship.errors import ServingError
from slimship.serve.abtest import FeedbackStore
from slimship.serve.compare import Judges, ShadowStats, ask
from slimship.serve.config import BatchingConfig, DriftConfig, Limits, ReplicaConfig, TrafficPolicy
from slimship.serve.drift import DriftMonitor
from slimship.serve.endpoint import Endpoint, ServedEndpoint
from slimship.serve.live import LiveStats
from slimship.serve.metrics import Metrics
from slimship.serve.protocol import NotFound, ProtocolError
from slimship.serve.rollout import RolloutController
from slimship.serve.routing import ModelGroup, sorted_versions
from slimship.serve.shared import SharedState

log = logging.getLogger("slimship.serve")
T = TypeVar("T")

#: builds an endpoint elsewhere (Ray Serve): (name, version, path, batching, source, replicas) → endpoint
EndpointFactory = Callable[
    [str, str, str, BatchingConfig | None, dict[str, Any], ReplicaConfig | None], Awaitable[ServedEndpoint]
]
#: removes what an EndpointFactory built, after an unload
EndpointRetire = Callable[[ServedEndpoint], Awaitable[None]]
#: a replicated ingress: an endpoint for a version another replica built, from its load spec (name, version, spec)
EndpointAttach = Callable[[str, str, dict[str, Any]], Awaitable[ServedEndpoint]]


def _rows(ep: ServedEndpoint, inputs: dict[str, np.ndarray]) -> int:
    """Rows of a request (1 for a model without a batch axis)."""
    if not ep.batchable or not inputs:
        return 1
    return int(next(iter(inputs.values())).shape[0])


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
        #: builds endpoints elsewhere (Ray Serve) instead of in this process
        self.endpoint_factory: EndpointFactory | None = None
        #: removes what endpoint_factory built, after an unload
        self.endpoint_retire: EndpointRetire | None = None
        #: replicated ingress: attaches to a version another replica loaded (``shared`` version changes)
        self.endpoint_attach: EndpointAttach | None = None
        #: replicated ingress: the last shared version change this replica applied
        self._version_seq = 0
        self._sync_lock = asyncio.Lock()
        self.judges = Judges()
        self.rollouts = RolloutController(self)
        self.feedback = FeedbackStore(max_ids=self.limits.max_remembered_ids)  # ids are capped in length
        self.live = LiveStats()
        #: HTTP requests received and not yet answered (set by the HTTP entry point, which counts them in its protocol;
        #: None: not counted): handed to each endpoint, whose lone tiny rows then skip the batcher's queue
        self.requests_open: Callable[[], int] | None = None
        #: replicated ingress (Ray): A/B, traffic, rollouts and shadow counts live there (:mod:`.shared`)
        self.shared: SharedState | None = None
        #: model → generation of the shared traffic policy this replica applies
        self._policy_generation: dict[str, int] = {}

    async def remember(self, body_id: str | None, request_id: str, model: str, version: str) -> None:
        """Which version answered a request, for feedback sent later (by the protocol id and by x-request-id)."""
        ids = [request_id] + ([body_id] if body_id and body_id != request_id else [])
        if self.shared is not None:  # awaited: feedback sent to another replica right after must find the id
            await self.shared.call("answered", model, version, ids)
            return
        self.feedback.count(model, version)
        for i in ids:
            self.feedback.remember(model, i, version)

    async def record_feedback(self, model: str, request_id: str, outcome: Any, metric: str) -> str:
        """Attach an outcome to an answered request; returns the version that answered it."""
        if self.shared is None:
            return self.feedback.record(model, request_id, outcome, metric)
        got = await self.shared.call("record", model, request_id, outcome, metric)
        if got[0] == "error":
            raise ProtocolError(got[2], got[1])
        return str(got[1])

    async def feedback_summary(
        self, model: str, alpha: float = 0.05, min_samples: int = 30
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The A/B summary per metric, and the requests each version answered."""
        control = self.control_version(model)
        if self.shared is None:
            return self.feedback.summary(model, control, alpha, min_samples), self.feedback.tallies(model)
        summary = await self.shared.call("summary", model, control, alpha, min_samples)
        return summary, await self.shared.call("tallies", model)

    async def shadow_summary(self, model: str) -> dict[str, dict[str, Any]]:
        """Agreement of each shadow version of ``model`` with the primary."""
        if self.shared is not None:
            return dict(await self.shared.call("shadow_stats", model))
        group = self.models.get(model)
        return {v: s.as_dict() for v, s in group.shadow_stats.items()} if group else {}

    async def publish_traffic(self, name: str) -> None:
        """Share the traffic policy just set here with the other ingress replicas (no-op on a single server)."""
        if self.shared is not None:
            self._policy_generation[name] = await self.shared.call(
                "set_policy", name, self.models[name].policy.model_dump()
            )

    async def sync_traffic(self) -> None:
        """Adopt traffic policies another ingress replica set since (models under a rollout follow the rollout)."""
        if self.shared is None:
            return
        for name, (generation, policy) in (await self.shared.call("policies")).items():
            group = self.models.get(name)
            if group is None or generation <= self._policy_generation.get(name, 0):
                continue
            self._policy_generation[name] = generation
            if self.rollouts.controls(name) is None:
                group.policy = TrafficPolicy(**policy)

    def control_version(self, model: str) -> str | None:
        """The version A/B comparisons are made against: the production version if one is loaded."""
        r = self.rollouts.controls(model)
        if r is not None:
            return r.baseline
        group = self.models.get(model)
        return group.production_version() if group else None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background (shadow and compare runs), kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def monitor_output(
        self,
        model: str,
        ep: ServedEndpoint,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
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

    # ---- inference (shared by the HTTP and gRPC front ends) -------------------------------------
    async def run_inference(
        self,
        name: str,
        ep: ServedEndpoint,
        routed: bool,
        inputs: dict[str, np.ndarray],
        encode: Callable[[dict[str, np.ndarray]], T],
        t0: float,
    ) -> T:
        """Run one request on ``ep`` (chosen by :meth:`endpoint`; ``routed``: by the traffic policy) and encode its
        answer; metrics, live figures, the rollout's window, drift and shadow traffic are fed whichever transport
        asked. ``t0``: when the request arrived (perf_counter). Errors propagate after being counted."""
        status, outputs = "200", None
        t_infer = time.perf_counter()
        try:
            outputs = await ep.infer(inputs)
            t_infer = time.perf_counter() - t_infer  # queue + run: what the rollout compares between versions
            encoded = encode(outputs)
        except ProtocolError as err:
            status = str(err.status)
            raise
        except Exception:
            status = "500"
            raise
        finally:
            elapsed = time.perf_counter() - t0
            self._record(name, ep, routed, inputs, outputs, status, elapsed, t_infer)
            ok = status == "200"
            ep.stats.request(ok, int(elapsed * 1e9), _rows(ep, inputs) if ok else 0)
        self.monitor_output(name, ep, inputs, outputs)
        if routed:
            self.maybe_shadow(name, ep, inputs, outputs)
        return encoded

    def _record(
        self,
        name: str,
        ep: ServedEndpoint,
        routed: bool,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        status: str,
        elapsed: float,
        t_infer: float,
    ) -> None:
        """Metrics, live figures and the rollout's window of one inference request, answered or not."""
        self.metrics.requests.labels(name, ep.version, status).inc()
        self.metrics.latency.labels(name, ep.version).observe(elapsed)
        self.live.add(name, ep.version, elapsed, status)
        ok = status == "200"
        if routed and (ok or int(status) >= 500):
            self.rollouts.observe(name, ep, inputs, outputs if ok else None, t_infer if ok else elapsed, ok)

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """The statistics extension's ``model_stats``: every version of every model, of one model, or one version
        (404 for a model or version that isn't loaded)."""
        if name is None:
            groups = [(n, g.versions) for n, g in sorted(self.models.items())]
        elif version is None:
            groups = [(name, self.group(name).versions)]
        else:
            groups = [(name, {version: self.endpoint(name, version)})]
        return [versions[v].stats.as_dict(n, v) for n, versions in groups for v in sorted_versions(versions)]

    def token_ok(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value carries the inference token (always, when the server has none)."""
        if self.token is None:
            return True
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self.token.encode())

    # ---- model management ---------------------------------------------------------------------
    async def load(
        self,
        name: str,
        version: str,
        path: str,
        batching: BatchingConfig | None = None,
        source: dict[str, Any] | None = None,
        drift: DriftConfig | None = None,
        replicas: ReplicaConfig | None = None,
    ) -> ServedEndpoint:
        """Build an endpoint (ONNX Runtime session) off the event loop, warm it, then make it routable. On a
        replicated ingress the other replicas attach to it at their next sync (:meth:`sync_versions`)."""
        if self.shared is None:
            return await self._load(name, version, path, batching, source, drift, replicas)
        await self.sync_versions()  # what other replicas loaded or unloaded, first
        self._refuse_loaded(name, version)
        if not await self.shared.call("reserve_version", "load", name, version):
            raise ProtocolError(
                f"{name} v{version} is loaded already through another ingress replica, or being loaded or unloaded "
                "there; unload it first, load under another version, or retry in a moment",
                409,
            )
        try:
            ep = await self._load(name, version, path, batching, source, drift, replicas)
            spec = {
                "batching": batching.model_dump() if batching is not None else None,
                "source": ep.source,
                "drift": drift.model_dump() if drift is not None else None,
                "replicas": replicas.model_dump() if replicas is not None else None,
            }
            await self.shared.call("version_change", "load", name, version, spec)
        finally:
            await self.shared.call("release_version", name, version)
        return ep

    async def _load(
        self,
        name: str,
        version: str,
        path: str,
        batching: BatchingConfig | None,
        source: dict[str, Any] | None,
        drift: DriftConfig | None,
        replicas: ReplicaConfig | None,
    ) -> ServedEndpoint:
        async with self._lock:
            self._refuse_loaded(name, version)
            ep: ServedEndpoint
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

    async def add(self, ep: ServedEndpoint) -> ServedEndpoint:
        """Start a built endpoint and make it routable (once warm)."""
        async with self._lock:
            return await self._add(ep)

    def _refuse_loaded(self, name: str, version: str) -> None:
        group = self.models.get(name)
        if group is not None and version in group.versions:
            raise ServingError(
                f"{name} v{version} is already loaded; unload it first or load under another version"
            )

    async def _add(self, ep: ServedEndpoint) -> ServedEndpoint:
        self._refuse_loaded(ep.model, ep.version)
        await self._record_verification(ep)
        await ep.start()
        if isinstance(ep, Endpoint):  # in-process (a Ray RemoteEndpoint's replica batches on its own)
            ep.requests_open = self.requests_open
        self._attach_drift(ep)
        self.judges.prepare(ep)
        self.models.setdefault(ep.model, ModelGroup(ep.model)).versions[ep.version] = ep
        log.info(
            json.dumps({"event": "loaded", "model": ep.model, "version": ep.version, "source": ep.source})
        )
        return ep

    async def _record_verification(self, ep: ServedEndpoint) -> None:
        """The probe's outcome (run when the endpoint was built) as a metric and, for registry versions, an event."""
        v = ep.verification
        status = v.get("status")
        self.metrics.verified.labels(ep.model, ep.version).set(
            1 if status == "passed" else 0 if status == "failed" else -1
        )
        reg_model, number = ep.source.get("registry"), ep.source.get("version")
        if self.registry is None or reg_model is None or number is None or status not in ("passed", "failed"):
            return
        kind = "verified" if status == "passed" else "verification_failed"
        detail = {
            "cpu_class": v.get("host_cpu_class"),
            "served_as": f"{ep.model} v{ep.version}",
            "failures": v.get("failures", []),
        }
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None, self.registry.record_event, str(reg_model), int(number), kind, detail
            )
        except Exception:  # the version serves either way; a registry hiccup must not stop the load
            log.exception("could not record the probe's outcome in the registry")

    def _attach_drift(self, ep: ServedEndpoint) -> None:
        cfg = ep.drift_config or DriftConfig()
        workload = cfg.workload or ep.source.get("workload")
        if not cfg.enabled or not workload:
            return
        ep.drift = DriftMonitor(ep.model, ep.version, cfg, self.metrics)
        ep.drift.build_in_background(ep.session, ep.path, workload)

    async def load_from_registry(
        self,
        name: str,
        ref: str,
        version: str | None = None,
        batching: BatchingConfig | None = None,
        registry_model: str | None = None,
        drift: DriftConfig | None = None,
        replicas: ReplicaConfig | None = None,
    ) -> ServedEndpoint:
        if self.registry is None:
            raise ServingError("this server has no registry: start it with --registry (or SLIMSHIP_REGISTRY)")
        loop = asyncio.get_running_loop()
        reg_model = registry_model or name
        v = await loop.run_in_executor(
            None, self.registry.get, reg_model, int(ref) if str(ref).isdigit() else ref
        )
        cand = await loop.run_in_executor(None, self.registry.fetch, reg_model, v.number)  # verified by hash
        if cand.format not in ("onnx", "openvino", "executorch"):
            raise ServingError(
                f"{reg_model} v{v.number} is a {cand.format} model; the server runs ONNX, OpenVINO IR and ExecuTorch programs (export it first)"
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
        """Stop routing to a version, answer what it has in flight, then remove it. On a replicated ingress every
        replica drops it at its next sync, and its application is deleted once all of them have."""
        if self.shared is None:
            ep = await self._unload(name, version, drain_timeout)
            await self._retire(ep)
            return
        await self.sync_versions()  # a version another replica loaded is unloaded here too
        self.group(name)  # 404 for an unknown model before anything is reserved
        if not await self.shared.call("reserve_version", "unload", name, version):
            raise ProtocolError(
                f"{name} v{version} is being loaded or unloaded through another ingress replica; retry in a moment",
                409,
            )
        try:
            ep = await self._unload(name, version, drain_timeout)
            seq = await self.shared.call("version_change", "unload", name, version, None)
            await self._await_replicas(self.shared, seq, drain_timeout + 10.0)
            await self._retire(ep)
        finally:
            await self.shared.call("release_version", name, version)
        if name in self.models:  # the other replicas take the traffic without the version from here too
            await self.publish_traffic(name)

    async def _unload(self, name: str, version: str, drain_timeout: float) -> ServedEndpoint:
        async with self._lock:
            group = self.group(name)
            ep = group.versions.get(version)
            if ep is None:
                raise NotFound(f"{name} has no loaded version {version}; loaded: {group.labels()}")
            r = self.rollouts.controls(name)
            if r is not None and version in (r.candidate, r.baseline):
                raise ProtocolError(
                    f"{name} v{version} is in rollout #{r.record['id']} ({r.state}); abort the rollout "
                    "before unloading it",
                    409,
                )
            self._drop(name, version)
        await ep.stop(drain_timeout)  # requests already routed to it are answered first
        return ep

    def _drop(self, name: str, version: str) -> None:
        group = self.models[name]
        del group.versions[version]  # no new request is routed to it from here on
        group.policy = group.without(version)
        if not group.versions:
            del self.models[name]

    async def _retire(self, ep: ServedEndpoint) -> None:
        if self.endpoint_retire is not None:
            await self.endpoint_retire(ep)
        log.info(json.dumps({"event": "unloaded", "model": ep.model, "version": ep.version}))

    @staticmethod
    async def _await_replicas(shared: SharedState, seq: int, timeout_s: float) -> None:
        """Until every ingress replica has applied the version changes up to ``seq`` (its own included: its sync
        loop runs meanwhile), or ``timeout_s`` (a replica that is gone doesn't hold an unload up for ever)."""
        deadline = time.monotonic() + timeout_s
        while await shared.call("replicas_applied", seq) < shared.replicas:
            if time.monotonic() > deadline:
                log.warning(
                    json.dumps({"event": "unload.replicas_not_synced", "seq": seq, "waited_s": timeout_s})
                )
                return
            await asyncio.sleep(0.05)

    async def sync_versions(self) -> None:
        """A replicated ingress: apply the versions other replicas loaded or unloaded since the last sync."""
        if self.shared is None:
            return
        async with self._sync_lock:  # the rollout loop's sync and an admin request's, one at a time
            await self._apply_version_changes(self.shared)

    async def _apply_version_changes(self, shared: SharedState) -> None:
        changes = await shared.call("version_changes", self._version_seq)
        for seq, op, name, version, spec in changes:
            group = self.models.get(name)
            here = group is not None and version in group.versions
            try:
                if op == "load" and not here and self.endpoint_attach is not None:
                    ep = await self.endpoint_attach(name, version, spec or {})
                    await self.add(ep)
                elif op == "unload" and here:
                    async with self._lock:
                        ep = self.models[name].versions[version]
                        self._drop(name, version)
                    await ep.stop()
            except Exception:  # one version that can't be attached must not stop the others
                log.exception("could not apply %s of %s v%s from another ingress replica", op, name, version)
            self._version_seq = seq
        if changes:
            shared.send("applied", shared.replica, self._version_seq)

    def set_traffic(self, name: str, policy: TrafficPolicy) -> None:
        group = self.group(name)
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
                f"traffic for {name} names version(s) {unknown} that aren't loaded; loaded: {group.labels()}"
            )
        if policy.weights and sum(policy.weights.values()) <= 0:
            raise ProtocolError("traffic weights must include a positive weight")
        group.policy = policy

    def group(self, name: str) -> ModelGroup:
        """The model's group of versions; 404 if it isn't served."""
        group = self.models.get(name)
        if group is None:
            raise NotFound(f"unknown model {name!r}; models: {sorted(self.models)}")
        return group

    def endpoint(self, name: str, version: str | None, sticky: str | None = None) -> ServedEndpoint:
        group = self.group(name)
        if version is None:
            return group.route(sticky)
        ep = group.versions.get(version)
        if ep is None:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: {sorted_versions(group.versions)}"
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
        self,
        name: str,
        primary: ServedEndpoint,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        group = self.models.get(name)
        if group is None or group.policy.shadow is None:
            return
        sh = group.policy.shadow
        target = group.versions.get(sh.version)
        if target is None or target is primary or random.random() >= sh.fraction:
            return
        stats = group.shadow_stats.setdefault(sh.version, ShadowStats())
        self.spawn(self._shadow(name, primary, target, stats, inputs, outputs))

    async def _shadow(
        self,
        name: str,
        primary: ServedEndpoint,
        target: ServedEndpoint,
        stats: ShadowStats,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        asked = await ask(target, inputs)
        if asked.outputs is None:  # shed or failed: never reaches the client
            stats.errors += 1
            if self.shared is not None:
                self.shared.send("shadow_add", name, target.version, None)
            self.metrics.shadow_errors.labels(name, target.version).inc()
            log.debug("shadow request to %s v%s failed: %s", name, target.version, asked.error)
            return
        agreement = await self.judges.judge(primary, target, outputs, asked.outputs)
        stats.add(agreement)
        if self.shared is not None:
            self.shared.send("shadow_add", name, target.version, agreement.value, agreement.judge)
        self.monitor_output(name, target, inputs, asked.outputs)
        self.metrics.shadow_fidelity.labels(name, primary.version, target.version).observe(agreement.value)
