"""The Ray executor (`slimship tune --executor ray`): the same search as the local executor, every trial a Ray
Tune trial.

How it maps onto Ray Tune:

* **Proposals** come from Optuna's seeded multi-objective TPE inside Ray Tune's ``OptunaSearch`` (subclassed
  by :func:`_searcher_class`): the same define-by-run ``suggest_*`` calls, directions and constraint feedback
  as :class:`~slimship.pipeline.search.local.LocalExecutor`. A proposal that builds a candidate already tried is
  answered in the searcher from the earlier row (``reused_from``; no Ray trial starts) and the next proposal is
  steered to an untried combination, as locally. With one trial at a time (``concurrent_trials=1``, the
  default) the sampler sees exactly what the local one sees, so the same seed proposes the same candidates;
  with more, each proposal is made before the running trials have reported, so the sequence differs (the
  sampler knows less when it proposes) — the rows keep their structure.
* **A trial** is :func:`_trainable` → :func:`~slimship.pipeline.search.trial.run_trial` on a worker; its row
  comes back as the trial's result, and the driver records it, rewrites tune.json and checks
  :meth:`~slimship.pipeline.search.state.SearchState.stop_reason` before every proposal.
* **Storage**: workers write candidates into the search directory, so on a multi-node cluster it must be
  shared storage mounted at the same path everywhere (checked up front on every node). Ray's experiment state
  goes to ``storage`` (a path or a URI such as ``s3://bucket/prefix``; default ``<search dir>/ray``).
* **Failures**: a trial whose worker dies is restarted up to ``max_failures`` times (Ray Tune's
  FailureConfig); still failing, it is recorded as failed with the reason and the search goes on.
* **Checked before the first trial**, each an :class:`~slimship.errors.ExecutorError` that names the fix:
  Ray is installed; the address answers (a TCP connect with a timeout — ``ray.init`` waits far longer on a
  dead address); some node can hold one trial's CPUs (otherwise the trial would stay PENDING for ever);
  every node sees the search directory.
* With a ``ray://`` address (Ray Client) the search loop itself runs on the cluster as one task (the workers
  write to the shared search directory), and this process gets the rows back at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimship.errors import ConfigError, ExecutorError
from slimship.pipeline.recipe import effective_params
from slimship.pipeline.runner import say
from slimship.pipeline.search.sampler import suggest_params, tell_row, tpe_sampler, untried
from slimship.pipeline.search.state import SearchHints, SearchState, TrialRow, candidate_key, objectives
from slimship.pipeline.search.trial import EXIT_SEAM, TrialContext, run_trial, setup
from slimship.ray_local import connect, parse_address

INSTALL_HINT = "pip install 'slimship[ray]'"


def import_ray(local: bool = False) -> Any:
    """The ``ray`` module with Ray Tune, or an :class:`ExecutorError` that names the extra to install. ``local``:
    a private single-machine instance will be started, so every Ray port binds to the loopback interface only
    (Ray reads this switch once, when it is first imported; with node IP 127.0.0.1 it keeps every port there)."""
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.tune
        import ray.tune.search.optuna
    except ImportError as err:
        raise ExecutorError(
            f"--executor ray needs Ray Tune, which is not installed here ({err}); "
            f"install it with: {INSTALL_HINT}"
        ) from err
    return ray


@dataclasses.dataclass
class RayExecutor:
    """Runs each trial as a Ray Tune trial; see the module docstring."""

    seed: int = 0
    #: None: start a Ray instance on this machine (bound to 127.0.0.1); ``host:port`` (the GCS of a cluster's
    #: head), ``auto`` (the cluster this machine belongs to) or ``ray://host:10001`` (Ray Client)
    address: str | None = None
    #: CPUs Ray reserves for each trial; timing inside the trial uses that many threads
    trial_cpus: float = 1.0
    #: trials running at once (1: the same proposals as the local executor for the same seed)
    concurrent_trials: int = 1
    #: restarts of a trial whose worker died before it is recorded as failed
    max_failures: int = 2
    #: where Ray Tune keeps its experiment state: a path or a URI (default: <search dir>/ray)
    storage: str | None = None
    name: str = dataclasses.field(default="ray", init=False)

    def __post_init__(self) -> None:
        if not self.trial_cpus > 0:
            raise ConfigError(f"--trial-cpus must be > 0, got {self.trial_cpus:g} (e.g. --trial-cpus 2)")
        if self.concurrent_trials < 1:
            raise ConfigError(
                f"--concurrent-trials must be ≥ 1, got {self.concurrent_trials} (e.g. --concurrent-trials 2)"
            )
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be ≥ 0, got {self.max_failures} (e.g. --max-failures 2)")
        if self.address is not None:
            parse_address(self.address)
        import_ray(local=self.address is None)  # before anything runs: say now that the extra is missing

    def search(
        self,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[TrialRow], None],
        log: Callable[[str], None],
    ) -> str:
        ray = import_ray(local=self.address is None)
        ctx = dataclasses.replace(ctx, threads=max(1, math.floor(self.trial_cpus)))
        connected_here = connect(ray, self.address, log)
        try:
            where = self.address or "this machine (a local Ray instance on 127.0.0.1)"
            _check_resources(ray, self.trial_cpus, where)
            _check_shared_dir(ray, Path(ctx.out_dir), where)
            if ray.util.client.ray.is_connected():
                return self._search_through_client(ray, ctx, state, limit, deadline, on_row, log)
            return _run_tuner(self, ctx, state, limit, deadline, on_row, log)
        finally:
            if connected_here:
                ray.shutdown()

    def _search_through_client(
        self,
        ray: Any,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[TrialRow], None],
        log: Callable[[str], None],
    ) -> str:
        """Ray Client: Ray Tune would run its loop on the cluster anyway; run the whole search loop there as one
        task (no CPU reserved) and record its rows here."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        task = ray.remote(num_cpus=0)(_search_on_cluster)
        log(f"searching on the cluster through Ray Client ({self.address}); rows arrive when the search ends")
        stopped, rows = ray.get(
            task.remote(dataclasses.asdict(self), ctx, limit, remaining, [r.to_json() for r in state.rows])
        )
        for data in rows[len(state.rows) :]:
            row = TrialRow.from_json(data)
            state.record(row)
            on_row(row)
        return str(stopped)


def _search_on_cluster(
    options: dict[str, Any],
    ctx: TrialContext,
    limit: int,
    remaining: float | None,
    rows: list[dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    """Runs on the cluster (already connected to it): the search loop of a Ray Client search; rows travel as
    their tune.json form."""
    options = {k: v for k, v in options.items() if k != "name"}
    ex = RayExecutor(**{**options, "address": None})
    recipe = setup(ctx.recipe_path, ctx.out_dir)[0]
    state = SearchState(recipe)
    for r in rows:
        state.record(TrialRow.from_json(r))
    deadline = None if remaining is None else time.monotonic() + remaining
    stopped = _run_tuner(ex, ctx, state, limit, deadline, lambda row: None, say)
    return stopped, [r.to_json() for r in state.rows]


def _check_resources(ray: Any, trial_cpus: float, where: str) -> None:
    """A trial needs ``trial_cpus`` on one node; refuse up front when no node has that many."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    largest = max(cpus, default=0.0)
    if trial_cpus > largest:
        raise ExecutorError(
            f"each trial asks for {trial_cpus:g} CPUs (--trial-cpus) but the largest node of the Ray cluster at {where} "
            f"has {largest:g} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}, {sum(cpus):g} CPUs in all), so no trial "
            f"could ever start; pass --trial-cpus {largest:g} or less, or add a node with {trial_cpus:g} CPUs"
        )


def _check_shared_dir(ray: Any, out: Path, where: str) -> None:
    """Every node must see the search directory at the same path (workers write candidates into it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = out / f".ray-probe-{uuid.uuid4().hex[:12]}"
    token.write_text("slimship")
    try:
        probe = ray.remote(num_cpus=0)(_exists)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(token))
            for n in nodes
        }
        blind = [addr for addr, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        token.unlink(missing_ok=True)
    if blind:
        raise ExecutorError(
            f"the workers on {', '.join(blind)} (Ray cluster at {where}) can't see the search directory {out}; trials write "
            "their candidates there, so on a cluster put it on storage every node mounts at the same path (NFS, a "
            "shared volume) and pass that path as --out"
        )


def _exists(path: str) -> bool:
    return Path(path).exists()


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: :func:`run_trial` on a worker; the row goes back as the trial's result."""
    from ray import tune

    p = json.loads(config["payload"])
    if p.get("exit_seam"):
        os.environ[EXIT_SEAM] = p["exit_seam"]  # this worker process only
    ctx = TrialContext(**p["ctx"])
    row = run_trial(ctx, p["trial"], p["params"], say, hints=SearchHints(**p["hints"]))
    values = objectives(row, p["objective"]) or (0.0, 0.0)
    tune.report({"row": json.dumps(row.to_json()), "speed": values[0], "quality": values[1]})


def _run_tuner(
    ex: RayExecutor,
    ctx: TrialContext,
    state: SearchState,
    limit: int,
    deadline: float | None,
    on_row: Callable[[TrialRow], None],
    log: Callable[[str], None],
) -> str:
    import warnings

    import optuna
    from ray import tune

    recipe = state.recipe
    assert recipe.search is not None
    searcher = _searcher_class()(ex, ctx, state, limit, deadline, on_row, log)
    storage = ex.storage or str(Path(ctx.out_dir) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": ex.trial_cpus}),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=ex.concurrent_trials,
            reuse_actors=True,  # a worker keeps its imports and loaded workload from one trial to the next
            trial_name_creator=lambda t: f"trial-{t.config['trial']}",
            trial_dirname_creator=lambda t: f"trial-{t.config['trial']}",
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=ex.max_failures),
            callbacks=[searcher.error_callback()],
        ),
    )
    log(
        f"Ray Tune: {ex.trial_cpus:g} CPU per trial, {ex.concurrent_trials} at a time, {ex.max_failures} restarts "
        f"of a failed worker; experiment state in {storage}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", optuna.exceptions.ExperimentalWarning
        )  # constraints are "experimental"
        tuner.fit()
    return state.stop_reason(limit, deadline) or searcher.stopped or "the sampler had nothing more to propose"


def _searcher_class() -> Any:
    """``OptunaSearch`` taught slimship's rules (built here so Ray is imported only when used)."""
    import random

    from ray.tune import Callback
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class SlimshipOptunaSearch(OptunaSearch):
        def __init__(
            self,
            ex: RayExecutor,
            ctx: TrialContext,
            state: SearchState,
            limit: int,
            deadline: float | None,
            on_row: Callable[[TrialRow], None],
            log: Callable[[str], None],
        ) -> None:
            recipe = state.recipe
            super().__init__(
                space=lambda trial: suggest_params(trial, recipe),
                metric=["speed", "quality"],
                mode=["max", "max"],
                sampler=tpe_sampler(ex.seed),
            )
            self.ex, self.ctx, self.state, self.limit, self.deadline = ex, ctx, state, limit, deadline
            self.on_row, self.log, self.recipe = on_row, log, recipe
            self.rng = random.Random(ex.seed)
            self.seen: dict[str, TrialRow] = {}
            self.pending: dict[str, str] = {}  # candidate key → Ray trial id building it
            self.meta: dict[str, tuple[int, dict[str, Any], str]] = {}  # Ray trial id → (number, params, key)
            self.deferred: dict[str, list[tuple[Any, int, dict[str, Any]]]] = {}  # repeats of a running trial
            self.errors: dict[str, str] = {}
            self.stopped: str | None = None
            self.exit_seam = os.environ.get(EXIT_SEAM)

        @property
        def _study(self) -> Any:
            return self._ot_study

        def error_callback(self) -> Any:
            errors = self.errors

            class _Errors(Callback):
                def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                    err = (
                        getattr(trial, "error_message", None)
                        or getattr(trial, "error_msg", None)
                        or "the worker died"
                    )
                    errors[trial.trial_id] = (
                        str(err).strip().splitlines()[-1][:300] if str(err).strip() else "the worker died"
                    )

            return _Errors()

        def _record(self, row: TrialRow, ot_trial: Any) -> None:
            tell_row(self._study, ot_trial, row, self.recipe)
            self.state.record(row)
            self.on_row(row)

        def suggest(self, trial_id: str) -> Any:  # a config, None (ask again later) or Searcher.FINISHED
            size_reached = False
            while True:
                reason = self.state.stop_reason(self.limit, self.deadline)
                if reason is None and self.state.evaluations + len(self.pending) >= self.limit:
                    reason = f"trial budget reached ({self.limit} candidates)"
                if reason is not None:
                    self.stopped = reason
                    return Searcher.FINISHED
                if len(self._study.trials) >= 4 * self.limit:
                    self.stopped = (
                        f"the sampler kept proposing tried combinations ({len(self._study.trials)} proposals)"
                    )
                    return Searcher.FINISHED
                if size_reached:
                    return None  # every combination is tried or running: wait for the running ones
                ask_id = f"{trial_id}/ask{len(self._study.trials)}"
                params: dict[str, Any] = dict(super().suggest(ask_id) or {})
                ot_trial = self._ot_trials.pop(ask_id)
                number = ot_trial.number
                same = candidate_key(effective_params(self.recipe, params))
                earlier = self.seen.get(same)
                if earlier is not None or same in self.pending:
                    # the sampler is circling: steer the next proposal to a combination not tried (nor running)
                    fresh = untried(self.recipe, {**self.seen, **self.pending}, self.rng)
                    if fresh is not None:
                        self._study.enqueue_trial(fresh)
                    elif same in self.pending:
                        size_reached = True
                    if earlier is not None:
                        self._record(earlier.repeat(number, params), ot_trial)
                    else:
                        self.deferred.setdefault(same, []).append((ot_trial, number, params))
                    continue
                self.pending[same] = trial_id
                self.meta[trial_id] = (number, params, same)
                self._ot_trials[trial_id] = ot_trial
                payload = {
                    "trial": number,
                    "params": params,
                    "ctx": dataclasses.asdict(self.ctx),
                    "hints": dataclasses.asdict(self.state.hints()),
                    "objective": self.state.objective,
                    "exit_seam": self.exit_seam,
                }
                self.log(f"trial {number}: {params} → Ray trial {trial_id}")
                return {"trial": number, "payload": json.dumps(payload, default=str)}

        def save(self, checkpoint_path: str) -> None:
            return None  # the search's state is tune.json; a re-run reuses built steps instead of resuming Ray's experiment

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            return None  # one result per trial, handled when it completes

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            if trial_id not in self.meta:
                return
            number, params, same = self.meta.pop(trial_id)
            ot_trial = self._ot_trials.pop(trial_id)
            self.pending.pop(same, None)
            if result and "row" in result and not error:
                row = TrialRow.from_json(json.loads(result["row"]))
            else:
                why = self.errors.get(trial_id, "the worker died")
                row = TrialRow(
                    trial=number,
                    params=params,
                    status="failed",
                    reason=f"Ray trial failed {self.ex.max_failures + 1} time(s) ({why})",
                )
                self.log(f"trial {number}: {row.reason}; the search goes on")
            self.seen[same] = row
            self._record(row, ot_trial)
            for ot, n, p in self.deferred.pop(same, []):
                self._record(row.repeat(n, p), ot)

    return SlimshipOptunaSearch
