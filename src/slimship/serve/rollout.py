"""Staged rollouts: a candidate version goes live in steps, judged against the production version on the same requests.
This module owns the controller (traffic, compares, decisions, their record in the registry); the gates are judged
in :mod:`slimship.serve.gates`, the policy's models are in :mod:`slimship.serve.config`, compares in
:mod:`slimship.serve.compare`.

A policy (YAML or JSON)::

    stages:
      - {name: shadow, traffic: 0, compare: 100, min_requests: 200}   # candidate answers nobody; every request
      - {name: canary-5, traffic: 5, min_requests: 50}                 # is also run on it and compared
      - {name: canary-25, traffic: 25, min_requests: 100}
      - {name: full, traffic: 100, min_requests: 100}
    gates: {min_fidelity: 0.98, max_error_rate: 0.01, max_latency_p99_ms: 250}
    min_pairs: 30

``traffic``: percent of versionless requests the candidate answers; ``compare``: percent of requests that are also
run on the *other* version in the background (baseline → candidate, or candidate → baseline), so fidelity is
measured on identical inputs with the production version as the reference. Gates are judged on the stage's window:

- ``max_error_rate`` — failed candidate requests (5xx, timeouts, overload refusals clients saw, failed shadow runs);
  breached as soon as the errors exceed what the limit allows at ``min_requests`` (the breach is then certain);
- ``max_latency_p99_ms`` — nearest-rank p99 of the candidate's latency on the requests it *answers* (time in the
  endpoint: queue + run); breached as soon as more requests were slower than the limit than a p99 tolerates;
  ``max_latency_p99_ratio`` compares with the p99 of the requests the baseline answered in the same window. A p99 of
  fewer than 100 samples is just the maximum (one pause would decide it), so latency gates wait for 100 answered
  requests. Compare runs are never timed for a gate: they queue behind and compete with the answering version, which
  no client would see (measured: a healthy INT8 candidate's shadow p99 was 2.7x fp32's live p99). So latency gates
  don't apply in a shadow stage, nor the ratio at 100% (the baseline answers nobody);
- ``min_fidelity`` — mean agreement of candidate and baseline outputs on the same inputs, judged by the workload's
  fidelity function (its first metric, as offline) where the workload is known, else row cosine (top-1 agreement for
  classifiers) — see :mod:`slimship.serve.compare`; judged from ``min_pairs`` compared requests on.

A breached gate rolls back at once: traffic returns to the baseline before the decision is written. When a stage has
its requests and every gate holds, the rollout advances; after the last stage the candidate becomes production in the
registry (the previous production version is archived). Every decision is stored in the registry with its evidence
(counts, figures, time window), and the rollout's state lives there, so a restarted server picks it up where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship.errors import RolloutConflictError, ServingError
from slimship.serve.compare import Agreement, ask
from slimship.serve.config import RolloutPolicy, TrafficPolicy, parse_policy
from slimship.serve.gates import Judgement, Window, judge
from slimship.serve.protocol import NotFound, ProtocolError

if TYPE_CHECKING:
    from slimship.serve.endpoint import ServedEndpoint
    from slimship.serve.server import Server

log = logging.getLogger("slimship.serve")

#: shadow runs of one rollout allowed in flight at once; beyond, a comparison is skipped (counted as shed)
MAX_COMPARES_IN_FLIGHT = 8


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


# ---- the controller -------------------------------------------------------------------------------


@dataclass
class ActiveRollout:
    record: dict[str, Any]  # the registry's row
    policy: RolloutPolicy
    model: str  # served name
    reg_model: str
    candidate: str  # served version labels
    baseline: str
    window: Window = field(default_factory=Window)
    compares_in_flight: int = 0
    last: Judgement | None = None
    #: replicated ingress: the shared window's epoch and the last change of the record this replica knows
    epoch: int = 0
    seq: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """The shared window's key: (rollout id, epoch)."""
        return (int(self.record["id"]), self.epoch)

    @property
    def state(self) -> str:
        return str(self.record["state"])

    @property
    def stage(self) -> int:
        return int(self.record["stage"])


class RolloutController:
    """Owns the active rollouts of one server: routes their traffic, collects their windows, judges their gates."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.active: dict[str, ActiveRollout] = {}
        self.finished: dict[str, ActiveRollout] = {}
        self.waiting: dict[str, str] = {}  # model → why a stored rollout isn't running here yet
        self._lock = asyncio.Lock()
        self._tick_lock = asyncio.Lock()  # one adoption + judgement at a time (the loop, or a status read)
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start_loop(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            tick = min((r.policy.tick_s for r in self.active.values()), default=0.25)
            await asyncio.sleep(tick)
            try:
                async with self._tick_lock:
                    await self.sync()
                    await self.tick()
            except Exception:  # a bad tick must not end the controller
                log.exception("rollout controller tick failed")

    # ---- helpers -----------------------------------------------------------------------------
    def _registry(self) -> Any:
        if self.server.registry is None:
            raise ServingError(
                "rollouts keep their state and evidence in the registry; start the server with --registry "
                "(or SLIMSHIP_REGISTRY) and serve versions from it"
            )
        return self.server.registry

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    def _registry_version(self, ep: ServedEndpoint) -> tuple[str, int]:
        reg, num = ep.source.get("registry"), ep.source.get("version")
        if reg is None or num is None:
            raise ServingError(
                f"{ep.model} v{ep.version} was loaded from a file ({ep.source.get('path')}); a rollout needs "
                'registry versions (load it with {"registry": N}) so its decisions can be stored with them'
            )
        return str(reg), int(num)

    def _served_label(self, model: str, reg_model: str, number: int) -> str | None:
        group = self.server.models.get(model)
        for label, ep in group.versions.items() if group else []:
            if ep.source.get("registry") == reg_model and ep.source.get("version") == number:
                return label
        return None

    def _apply_traffic(self, r: ActiveRollout, share: float) -> None:
        group = self.server.models.get(r.model)
        if group is None:
            return
        sticky = group.policy.sticky_header
        weights = {r.baseline: 100.0 - share, r.candidate: share}
        group.policy = TrafficPolicy(weights=weights, sticky_header=sticky)

    def controls(self, model: str) -> ActiveRollout | None:
        return self.active.get(model)

    # ---- a replicated ingress: windows, decisions and records shared (serve/shared.py) --------
    async def _publish(self, r: ActiveRollout, fresh_window: bool) -> None:
        """Tell the other ingress replicas what this one changed (no-op on a single server)."""
        if self.server.shared is not None:
            r.epoch, r.seq = await self.server.shared.call("publish", r.model, r.record, fresh_window)

    def _add(
        self, w: Window, key: tuple[int, int], side: str, ok: bool, ms: float | None, live: bool = True
    ) -> None:
        if self.server.shared is None:
            getattr(w, side).add(ok, ms, live)
        else:
            self.server.shared.send("window_add", key, side, ok, ms, live)

    def _shed(self, w: Window, key: tuple[int, int], side: str) -> None:
        if self.server.shared is None:
            getattr(w, side).shed += 1
        else:
            self.server.shared.send("window_shed", key, side)

    def _agree(self, w: Window, key: tuple[int, int], agreement: Agreement) -> None:
        if self.server.shared is None:
            w.add_agreement(agreement)
        else:
            self.server.shared.send("window_agreement", key, agreement.value, agreement.judge)

    async def _pull_window(self, r: ActiveRollout) -> bool:
        """The merged window of every replica's observations (False: there is none to judge, yet or any more)."""
        if self.server.shared is None:
            return True
        w = await self.server.shared.call("window", r.key)
        if w is None:
            return False
        r.window = w
        return True

    async def _claim(self, r: ActiveRollout) -> bool:
        """Whether this replica takes the decision on ``r``'s window (always, on a single server)."""
        return self.server.shared is None or bool(await self.server.shared.call("claim", r.key))

    async def _restore_shared(self, r: ActiveRollout) -> bool:
        """Whether this replica restores a stored rollout (one replica does; the others adopt it)."""
        shared = self.server.shared
        if shared is None:
            return True
        if not await shared.call("claim", ("restored", int(r.record["id"]))):
            return False
        await self._publish(r, True)
        return True

    async def sync(self) -> None:
        """Adopt what other ingress replicas changed: versions loaded or unloaded, traffic policies, and rollouts
        started, advanced or ended."""
        shared = self.server.shared
        if shared is None:
            return
        await self.server.sync_versions()  # versions first: a policy or a rollout may name one just loaded
        await self.server.sync_traffic()
        for model, pub in (await shared.call("rollouts")).items():
            if model in self.server.models:
                self._adopt(model, pub["record"], int(pub["epoch"]), int(pub["seq"]))

    def _adopt(self, model: str, rec: dict[str, Any], epoch: int, seq: int) -> None:
        r = self.active.get(model)
        known = r if r is not None and r.record["id"] == rec["id"] else None
        if (
            known is None
            and (done := self.finished.get(model)) is not None
            and done.record["id"] == rec["id"]
        ):
            return  # ended here already
        if known is not None and seq <= known.seq:
            return  # nothing new
        running = rec["state"] in ("running", "paused")
        if known is None:
            if r is not None:
                self.active.pop(model)  # superseded: a newer rollout was started elsewhere
            cand = self._served_label(model, rec["model"], rec["candidate"])
            base = self._served_label(model, rec["model"], rec["baseline"])
            if cand is None or base is None:
                return
            policy = parse_policy(rec["policy"], f"rollout #{rec['id']}")
            known = ActiveRollout(rec, policy, model, str(rec["model"]), cand, base)
            if not running:  # ended before this replica saw it run: nothing to undo here
                self.finished[model] = known
                return
            self.active[model] = known
        known.record, known.epoch, known.seq = rec, epoch, seq
        if not running:
            self._finish(known)
            return
        known.window, known.last = Window(), None
        self._apply_traffic(known, known.policy.stages[known.stage].traffic)

    # ---- operator actions --------------------------------------------------------------------
    async def start(
        self, model: str, candidate: str, baseline: str | None, policy_data: Any
    ) -> dict[str, Any]:
        registry = self._registry()
        policy = parse_policy(policy_data)
        async with self._lock:
            group = self.server.group(model)
            if model in self.active:
                r = self.active[model]
                raise ProtocolError(
                    f"{model} already has a {r.state} rollout (#{r.record['id']}: v{r.candidate} against "
                    f"v{r.baseline}); abort it first",
                    409,
                )
            versions = group.labels()
            if candidate not in group.versions:
                raise NotFound(
                    f"{model} has no loaded version {candidate!r} (loaded: {versions}); load it first: "
                    f'POST /v2/admin/models/{model}/load {{"registry": N}}'
                )
            cand_ep = group.versions[candidate]
            reg_model, cand_num = self._registry_version(cand_ep)
            if baseline is None:
                prod = await self._call(registry.get, reg_model, "production")
                baseline = self._served_label(model, reg_model, prod.number)
                if baseline is None:
                    raise NotFound(
                        f"{reg_model}'s production version v{prod.number} isn't loaded in this server (loaded: "
                        f"{versions}); load it, or name the baseline version explicitly"
                    )
            if baseline not in group.versions:
                raise NotFound(
                    f"{model} has no loaded version {baseline!r} to compare against (loaded: {versions})"
                )
            if baseline == candidate:
                raise ProtocolError(f"the candidate and the baseline are the same version ({candidate})")
            base_reg, base_num = self._registry_version(group.versions[baseline])
            if base_reg != reg_model:
                raise ProtocolError(
                    f"v{candidate} is {reg_model} in the registry but v{baseline} is {base_reg}; a rollout "
                    "compares two versions of one registry model"
                )
            try:
                record = await self._call(
                    registry.start_rollout,
                    reg_model,
                    cand_num,
                    base_num,
                    policy.model_dump(mode="json", exclude_unset=False),
                    served_as=model,
                    detail={"served_versions": {"candidate": candidate, "baseline": baseline}},
                )
            except RolloutConflictError as err:  # another server started one for this model meanwhile
                raise ProtocolError(str(err), 409) from err
            r = ActiveRollout(record, policy, model, reg_model, candidate, baseline)
            await self._publish(r, True)
            self.active[model] = r
            self.finished.pop(model, None)
            self.waiting.pop(model, None)
            self._apply_traffic(r, policy.stages[0].traffic)
            log.info(
                json.dumps(
                    {
                        "event": "rollout.started",
                        "model": model,
                        "rollout": record["id"],
                        "candidate": candidate,
                        "baseline": baseline,
                        "stage": policy.stages[0].label(0),
                    }
                )
            )
            return self.status(model)

    async def pause(self, model: str, reason: str = "") -> dict[str, Any]:
        r = self._active_or_404(model)
        if r.state != "running":
            raise ProtocolError(f"{model}'s rollout is {r.state}, not running", 409)
        r.record = await self._call(
            self._registry().update_rollout,
            r.record["id"],
            "rollout.paused",
            self._evidence(r),
            state="paused",
            reason=reason or "paused by an operator",
        )
        await self._publish(r, False)
        return self.status(model)

    async def resume(self, model: str, reason: str = "") -> dict[str, Any]:
        r = self._active_or_404(model)
        if r.state != "paused":
            raise ProtocolError(f"{model}'s rollout is {r.state}, not paused", 409)
        r.record = await self._call(
            self._registry().update_rollout,
            r.record["id"],
            "rollout.resumed",
            {},
            state="running",
            reason=reason or "resumed by an operator",
        )
        r.window = Window()  # the stage is judged afresh from here
        await self._publish(r, True)
        self._apply_traffic(r, r.policy.stages[r.stage].traffic)
        return self.status(model)

    async def abort(self, model: str, reason: str = "") -> dict[str, Any]:
        r = self._active_or_404(model)
        self._apply_traffic(r, 0.0)
        r.record = await self._call(
            self._registry().update_rollout,
            r.record["id"],
            "rollout.aborted",
            self._evidence(r),
            state="aborted",
            reason=reason or "aborted by an operator",
        )
        await self._publish(r, False)
        self._finish(r)
        await self.server.publish_traffic(r.model)  # a replica started later starts from the winner
        return self.status(model)

    def _active_or_404(self, model: str) -> ActiveRollout:
        r = self.active.get(model)
        if r is None:
            self.server.group(model)
            raise NotFound(
                f"{model} has no active rollout; start one with `slimship rollout start {model} --candidate V`"
            )
        return r

    def _finish(self, r: ActiveRollout) -> None:
        self.active.pop(r.model, None)
        self.finished[r.model] = r
        group = self.server.models.get(r.model)
        if group is not None and r.state == "promoted":  # keep what the server reports in step
            for ep in group.versions.values():
                if ep.source.get("registry") == r.reg_model:
                    ep.source["stage"] = (
                        "production"
                        if ep.version == r.candidate
                        else (
                            "archived" if ep.source.get("stage") == "production" else ep.source.get("stage")
                        )
                    )
        if group is not None:
            winner = r.candidate if r.state == "promoted" else r.baseline
            group.policy = TrafficPolicy(weights={winner: 100.0}, sticky_header=group.policy.sticky_header)

    # ---- restart -----------------------------------------------------------------------------
    async def restore(self) -> None:
        """Pick up the registry's active rollouts of the models this server serves (after a restart or a load)."""
        if self.server.registry is None:
            return
        for model, group in list(self.server.models.items()):
            if model in self.active:
                continue
            regs = {str(ep.source["registry"]) for ep in group.versions.values() if ep.source.get("registry")}
            for reg_model in regs:
                try:
                    stored = await self._call(self.server.registry.rollouts, reg_model, True)
                except Exception as err:
                    log.warning("can't read rollouts of %s from the registry: %s", reg_model, err)
                    continue
                for rec in stored:
                    if rec["served_as"] != model:
                        continue
                    cand = self._served_label(model, reg_model, rec["candidate"])
                    base = self._served_label(model, reg_model, rec["baseline"])
                    if cand is None or base is None:
                        missing = [
                            f"v{n}"
                            for n, lab in ((rec["candidate"], cand), (rec["baseline"], base))
                            if lab is None
                        ]
                        self.waiting[model] = (
                            f"rollout #{rec['id']} is {rec['state']} in the registry but {', '.join(missing)} "
                            f"of {reg_model} isn't loaded here; load it to resume"
                        )
                        log.warning(self.waiting[model])
                        continue
                    policy = parse_policy(rec["policy"], f"rollout #{rec['id']}")
                    r = ActiveRollout(rec, policy, model, reg_model, cand, base)
                    if not await self._restore_shared(r):
                        continue  # another ingress replica restored it: adopted on the next sync
                    self.active[model] = r
                    self.waiting.pop(model, None)
                    self._apply_traffic(r, policy.stages[r.stage].traffic)
                    await self._call(
                        self.server.registry.record_event,
                        reg_model,
                        rec["candidate"],
                        "rollout.restored",
                        {
                            "rollout": rec["id"],
                            "stage": r.stage,
                            "state": r.state,
                            "reason": "picked up by a (re)started server; the stage is judged afresh",
                        },
                    )
                    log.info(
                        json.dumps(
                            {
                                "event": "rollout.restored",
                                "model": model,
                                "rollout": rec["id"],
                                "stage": policy.stages[r.stage].label(r.stage),
                                "state": r.state,
                            }
                        )
                    )

    # ---- traffic -----------------------------------------------------------------------------
    def observe(
        self,
        model: str,
        ep: ServedEndpoint,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        latency_s: float,
        ok: bool,
    ) -> None:
        """A versionless request answered by ``ep`` (``ok`` False: it failed server-side)."""
        r = self.active.get(model)
        if r is None or ep.version not in (r.candidate, r.baseline):
            return
        w, key = r.window, r.key
        self._add(w, key, "candidate" if ep.version == r.candidate else "baseline", ok, latency_s * 1000)
        if not ok or outputs is None:
            return
        stage = r.policy.stages[r.stage]
        if random.random() * 100 >= stage.compare_percent:
            return
        group = self.server.models.get(model)
        other_label = r.baseline if ep.version == r.candidate else r.candidate
        other = group.versions.get(other_label) if group else None
        if other is None:
            return
        if r.compares_in_flight >= MAX_COMPARES_IN_FLIGHT:
            self._shed(w, key, "candidate" if other_label == r.candidate else "baseline")
            return
        r.compares_in_flight += 1
        self.server.spawn(self._compare(r, w, key, ep, other, inputs, outputs))

    async def _compare(
        self,
        r: ActiveRollout,
        w: Window,
        key: tuple[int, int],
        ran: ServedEndpoint,
        other: ServedEndpoint,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Run a request ``ran`` answered on ``other`` too, and judge the candidate against the baseline."""
        try:
            asked = await ask(other, inputs)
        finally:
            r.compares_in_flight -= 1
        side = "candidate" if other.version == r.candidate else "baseline"
        if asked.outcome == "shed":
            self._shed(
                w, key, side
            )  # the shadow side is full: skip, don't blame the candidate for doubled load
            return
        if asked.outputs is None:
            self._add(w, key, side, False, None, live=False)
            self.server.metrics.shadow_errors.labels(r.model, other.version).inc()
            log.debug("compare run on %s v%s failed: %s", r.model, other.version, asked.error)
            return
        self._add(w, key, side, True, asked.latency_ms, live=False)
        got = asked.outputs
        if other.version == r.candidate:
            agreement = await self.server.judges.judge(ran, other, outputs, got)
        else:
            agreement = await self.server.judges.judge(other, ran, got, outputs)
        self._agree(w, key, agreement)
        self.server.metrics.shadow_fidelity.labels(r.model, r.baseline, r.candidate).observe(agreement.value)
        self.server.monitor_output(r.model, other, inputs, got)

    # ---- decisions ---------------------------------------------------------------------------
    def _evidence(self, r: ActiveRollout, j: Judgement | None = None) -> dict[str, Any]:
        st = r.policy.stages[r.stage]
        now = time.time()
        out = {
            "stage_name": st.label(r.stage),
            "traffic": st.traffic,
            "compare": st.compare_percent,
            "window": {
                "from": _iso(r.window.started),
                "to": _iso(now),
                "seconds": round(now - r.window.started, 3),
            },
            "candidate": {
                "version": r.record["candidate"],
                "served_as": r.candidate,
                **r.window.candidate.summary(),
            },
            "baseline": {
                "version": r.record["baseline"],
                "served_as": r.baseline,
                **r.window.baseline.summary(),
            },
            "fidelity": r.window.fidelity_summary(),
        }
        if j is not None:
            out["gates"] = j.gates
            out["judgement"] = j.reason
        return out

    async def tick(self) -> None:
        for model, r in list(self.active.items()):
            if r.state not in (
                "running",
                "paused",
            ):  # ended, but a later write of that decision failed: finish it
                self._finish(r)
                continue
            if r.state != "running" or not await self._pull_window(r):
                continue
            j = judge(r.policy, r.stage, r.window)
            r.last = j
            if j.decision == "wait" or not await self._claim(r):
                continue  # not claimed: another ingress replica takes this decision; adopted on the next sync
            registry = self._registry()
            evidence = self._evidence(r, j)
            self.server.metrics.rollout_decisions.labels(model, j.decision).inc()
            if j.decision == "rollback":
                self._apply_traffic(r, 0.0)  # at once, before anything is written
                r.record = await self._call(
                    registry.update_rollout,
                    r.record["id"],
                    "rollout.rolled_back",
                    evidence,
                    state="rolled_back",
                    reason=j.reason,
                )
                await self._publish(r, False)
                await self._call(
                    registry.set_stage,
                    r.reg_model,
                    r.record["candidate"],
                    "archived",
                    reason=f"rolled back: {j.reason}",
                    evidence={"rollout": r.record["id"], **evidence},
                )
                self._finish(r)
                await self.server.publish_traffic(r.model)  # a replica started later starts from the winner
                log.warning(
                    json.dumps(
                        {
                            "event": "rollout.rolled_back",
                            "model": model,
                            "rollout": r.record["id"],
                            "reason": j.reason,
                        }
                    )
                )
                continue
            last = r.stage + 1 >= len(r.policy.stages)
            if not last:
                r.record = await self._call(
                    registry.update_rollout,
                    r.record["id"],
                    "rollout.advanced",
                    evidence,
                    stage=r.stage + 1,
                    reason=j.reason,
                )
                await self._publish(r, True)
                r.window = Window()
                self._apply_traffic(r, r.policy.stages[r.stage].traffic)
                log.info(
                    json.dumps(
                        {
                            "event": "rollout.advanced",
                            "model": model,
                            "rollout": r.record["id"],
                            "stage": r.policy.stages[r.stage].label(r.stage),
                        }
                    )
                )
                continue
            if not r.policy.promote:
                if r.record.get("reason") != "held at the last stage":
                    r.record = await self._call(
                        registry.update_rollout,
                        r.record["id"],
                        "rollout.completed",
                        evidence,
                        reason="held at the last stage",
                    )
                    await self._publish(r, False)
                continue
            r.record = await self._call(
                registry.update_rollout,
                r.record["id"],
                "rollout.promoted",
                evidence,
                state="promoted",
                reason=j.reason,
            )
            await self._publish(r, False)
            await self._call(
                registry.set_stage,
                r.reg_model,
                r.record["candidate"],
                "production",
                reason=f"promoted by rollout #{r.record['id']}",
                evidence={"rollout": r.record["id"], **evidence},
            )
            self._finish(r)
            await self.server.publish_traffic(r.model)  # a replica started later starts from the winner
            log.info(
                json.dumps(
                    {
                        "event": "rollout.promoted",
                        "model": model,
                        "rollout": r.record["id"],
                        "version": r.record["candidate"],
                    }
                )
            )

    # ---- status ------------------------------------------------------------------------------
    def status(self, model: str, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        r = self.active.get(model) or self.finished.get(model)
        if r is None:
            out: dict[str, Any] = {"model": model, "state": "none"}
            if model in self.waiting:
                out["waiting"] = self.waiting[model]
            return out
        st = r.policy.stages[r.stage]
        j = r.last if r.state in ("running", "paused") else None
        out = {
            "model": model,
            "rollout": r.record["id"],
            "state": r.state,
            "registry_model": r.reg_model,
            "candidate": {"served_as": r.candidate, "version": r.record["candidate"]},
            "baseline": {"served_as": r.baseline, "version": r.record["baseline"]},
            "stage": {
                "index": r.stage,
                "of": len(r.policy.stages),
                "name": st.label(r.stage),
                "traffic": st.traffic,
                "compare": st.compare_percent,
                "min_requests": st.min_requests,
            },
            "stages": [s.label(i) for i, s in enumerate(r.policy.stages)],
            "reason": r.record.get("reason", ""),
            "policy": r.policy.model_dump(mode="json"),
        }
        if r.state in ("running", "paused"):
            out["window"] = self._evidence(r, j)
            out["progress"] = min(1.0, r.window.candidate.requests / st.min_requests)
        if history is not None:
            out["history"] = history
        return out

    async def status_with_history(self, model: str) -> dict[str, Any]:
        # a replicated ingress: adopt what another replica started or decided first, so that a status read
        # right after a start (answered by a different replica) never shows the previous rollout
        if self.server.shared is not None:
            async with self._tick_lock:
                await self.sync()
        r = self.active.get(model) or self.finished.get(model)
        if r is None or self.server.registry is None:
            return self.status(model)
        events = await self._call(self.server.registry.events, r.reg_model, None, "rollout.")
        return self.status(model, [e for e in events if e["detail"].get("rollout") == r.record["id"]])
