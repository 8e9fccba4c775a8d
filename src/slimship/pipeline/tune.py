"""`slimship tune recipe.yaml`: search a recipe's ``search`` space for the fastest (or smallest) candidate
within its constraints, timing every candidate on its real runtime interleaved with the original.

How a search runs:

* An **executor** proposes parameter sets and runs trials. :class:`LocalExecutor` drives Optuna's
  multi-objective TPE sampler (seeded, so a search is reproducible) in this process;
  :class:`~slimship.pipeline.tune_ray.RayExecutor` runs the same sampler inside Ray Tune (``OptunaSearch``)
  with every trial on a Ray worker. A trial is :func:`run_trial` — a plain function of a
  :class:`TrialContext` and the chosen values — so any executor can ship it to a worker, and every executor
  produces the same rows.
* A trial builds the recipe's steps with the chosen values through the cached step machinery of
  `slimship run` (trials that share a prefix of steps share its candidates), then **screens** the result
  with cheap signals before the expensive part: file size against ``max_size_mb`` (exact), and quality and
  fidelity on a small slice of the evaluation data against the budget plus a margin. A hopeless candidate
  stops there (status ``screened``). Otherwise it is evaluated on the whole evaluation set and timed against
  the original at the search's batch size, interleaved.
* Constraint violations go back to the sampler, which learns the feasible region. A trial whose pass fails
  is recorded with its reason and the search goes on. The search **stops early** when every combination
  of an all-choices space has been tried, or when a feasible candidate exists and ``patience`` evaluated
  trials in a row have not beaten it; a repeated proposal reuses the earlier row and costs no evaluation.
* The result (``tune.json``, rewritten after every trial) holds every trial, the Pareto front of quality
  against speed (or size), the best feasible trial — or, when none is feasible, the closest ones — and the
  reason the search stopped; ``report.html`` shows it.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from slimship._util import write_json_atomic
from slimship.errors import ConfigError
from slimship.pipeline.recipe import Recipe, effective_params, load_recipe, with_value
from slimship.pipeline.runner import (
    _reuse,
    _say,
    check_constraints,
    constraint_batch_sizes,
    evaluate_steps,
    execute_steps,
)

SCHEMA = "slimship.tune/1"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, picklable: where the recipe and the search directory are, and how many threads
    its timing may use (None: the machine's physical cores)."""

    recipe_path: str
    out_dir: str
    evaluate_limit: int | None = None
    threads: int | None = None


@functools.lru_cache(maxsize=4)
def _setup(recipe_path: str, out_dir: str) -> tuple[Recipe, Any, Any]:
    """The recipe, workload and original candidate, once per process (workers reuse them across trials)."""
    from slimship.candidate import original_candidate
    from slimship.workload import resolve_workload

    recipe = load_recipe(recipe_path)
    workload = resolve_workload(recipe.workload, data=recipe.data)
    out = Path(out_dir)
    original = _reuse(out / "original") or original_candidate(workload, out / "original")
    return recipe, workload, original


def apply_params(recipe: Recipe, params: dict[str, Any]) -> list[Any]:
    """The recipe's steps with the searched ``<step>.<field>``, ``<step>.skip`` and ``<step>.pass`` values set
    (a field the chosen pass doesn't have is left out)."""
    labels = recipe.step_labels()
    steps = list(recipe.passes)
    params = effective_params(recipe, params)
    for key, value in sorted(params.items(), key=lambda kv: not kv[0].endswith((".pass", ".skip"))):
        label, _, fld = key.partition(".")
        i = labels.index(label)
        if fld == "skip":
            steps[i] = steps[i].model_copy(update={"skip": bool(value)})
        elif fld == "pass":
            steps[i] = steps[i].model_copy(update={"pass_name": str(value)})
        else:
            steps[i] = steps[i].model_copy(update={"config": with_value(steps[i].config, fld, value)})
    return steps


def _screen(
    recipe: Recipe,
    workload: Any,
    cand_dir: str,
    orig_dir: Path,
    final: Any,
    original: Any,
    log: Callable[[str], None],
    row: dict[str, Any],
    hints: dict[str, Any],
) -> dict[str, Any] | None:
    """Cheap signals: exact size; for a latency search, the speed its MACs predict against the best feasible
    candidate; quality / fidelity on a small slice. A dict saying why when the candidate is hopeless."""
    search, c = recipe.search, recipe.constraints
    assert search is not None
    if c.max_size_mb is not None and final.size_bytes / 1e6 > c.max_size_mb:
        return {"signal": "size", "measured": final.size_bytes / 1e6, "limit": c.max_size_mb}
    best, per_mac = hints.get("best_feasible"), hints.get("speed_per_mac", {}).get(row["signature"])
    if search.screen is not None and per_mac is not None:
        predicted = row["macs_ratio"] * per_mac * search.screen.macs_margin
        signal = f"speed-up its MACs predict (x{search.screen.macs_margin:g} margin)"
        if (
            c.min_speedup is not None
            and c.min_speedup.batch_size == search.batch_size
            and predicted < c.min_speedup.value
        ):
            return {"signal": signal + " vs min_speedup", "measured": predicted, "limit": c.min_speedup.value}
        if search.objective == "latency" and best is not None and predicted < best:
            return {"signal": signal + " vs the best feasible", "measured": predicted, "limit": best}
    if search.screen is None or (c.max_quality_drop is None and c.min_fidelity is None):
        return None
    n = search.screen.samples
    ev = evaluate_steps([{"label": "trial", "candidate": cand_dir}], orig_dir, workload, n, log)
    metric = workload.primary_metric
    if c.max_quality_drop is not None and metric:
        q0, q = ev["original"]["quality"].get(metric), ev["trial"]["quality"].get(metric)
        if q0 is not None and q is not None:
            drop = q0 - q if workload.higher_is_better else q - q0
            if drop > c.max_quality_drop + search.screen.quality_margin:
                return {
                    "signal": f"{metric} on {n} samples",
                    "measured": drop,
                    "limit": c.max_quality_drop + search.screen.quality_margin,
                }
    if c.min_fidelity is not None:
        name, value = next(iter(ev["trial"].get("fidelity", {}).items()), (None, None))
        if value is not None and value < c.min_fidelity - search.screen.fidelity_margin:
            return {
                "signal": f"{name} on {n} samples",
                "measured": value,
                "limit": c.min_fidelity - search.screen.fidelity_margin,
            }
    return None


def _macs(cand: Any) -> tuple[int | None, float]:
    """MACs after the newest structural step in the lineage (the passes record them) and the ratio to the original's."""
    recs = [
        c.info["complexity"]
        for c in cand.lineage()
        if isinstance(c.info.get("complexity"), dict)
        and c.info["complexity"].get("macs_after")
        and c.info["complexity"].get("macs_before")
    ]
    if not recs:
        return None, 1.0
    return int(recs[0]["macs_after"]), float(recs[-1]["macs_before"]) / max(1, int(recs[0]["macs_after"]))


def _signature(steps: list[dict[str, Any]]) -> str:
    """The runtime-side passes a candidate went through (export, optimize, quantize…): candidates that share
    them convert MACs into time at a similar rate."""
    from slimship.passes import PASSES

    return (
        ">".join(
            s["pass"]
            for s in steps
            if s["status"] in ("ran", "reused") and PASSES[s["pass"]].output_format != "torch"
        )
        or "torch"
    )


def run_trial(
    ctx: TrialContext,
    number: int,
    params: dict[str, Any],
    log: Callable[[str], None] = _say,
    hints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, screen, evaluate and time one candidate; the row every executor records for it. ``hints`` are what
    the search knows so far (:meth:`SearchState.hints`), for the cheap MACs signal."""
    from slimship.candidate import load_candidate
    from slimship.measure.bench import BenchTarget, bench

    recipe, workload, original = _setup(ctx.recipe_path, ctx.out_dir)
    assert recipe.search is not None
    out = Path(ctx.out_dir)
    t0 = time.perf_counter()
    log(f"trial {number}: {params}")
    done = execute_steps(apply_params(recipe, params), recipe.step_labels(), workload, original, out, log)
    _test_exit(number)
    row: dict[str, Any] = {"trial": number, "params": params, "steps": done}
    failed = [s for s in done if s["status"] == "failed"]
    finished = [s for s in done if s["status"] in ("ran", "reused")]
    if failed or not finished:
        row.update(
            status="failed",
            reason=failed[0].get("reason") if failed else "no step ran",
            seconds=round(time.perf_counter() - t0, 1),
        )
        return row
    last = finished[-1]
    final = load_candidate(last["candidate"])
    macs, macs_ratio = _macs(final)
    row.update(
        candidate=last["candidate"],
        size_bytes=final.size_bytes,
        macs=macs,
        macs_ratio=macs_ratio,
        signature=_signature(done),
    )
    screened = _screen(
        recipe, workload, last["candidate"], out / "original", final, original, log, row, hints or {}
    )
    if screened is not None:
        log(
            f"trial {number}: screened out — {screened['signal']} {screened['measured']:.4g} vs limit {screened['limit']:.4g}"
        )
        row.update(status="screened", screen=screened, seconds=round(time.perf_counter() - t0, 1))
        return row
    evaluations = evaluate_steps([last], out / "original", workload, ctx.evaluate_limit, log)
    backend = lambda c: "torch" if c.format == "torch" else "onnxruntime"  # noqa: E731
    log(f"trial {number}: timing against the original at batch {recipe.search.batch_size} (interleaved)")
    sizes = tuple(sorted({recipe.search.batch_size, *constraint_batch_sizes(recipe)}))
    timing = bench(
        [
            BenchTarget("original", original, backend(original)),
            BenchTarget(last["label"], final, backend(final)),
        ],
        workload,
        batch_sizes=sizes,
        memory=False,
        progress=False,
        baseline="original",
        threads=ctx.threads,
    )
    verdict = check_constraints(recipe, workload, evaluations, timing, last, original, done)
    bs = recipe.search.batch_size
    res = next(
        r
        for r in next(c for c in timing["candidates"] if c["label"] != "original")["results"]
        if r["batch_size"] == bs
    )
    base = next(
        r
        for r in next(c for c in timing["candidates"] if c["label"] == "original")["results"]
        if r["batch_size"] == bs
    )
    metric = workload.primary_metric
    q = evaluations[last["label"]]["quality"].get(metric) if metric else None
    q0 = evaluations["original"]["quality"].get(metric) if metric else None
    row.update(
        {
            "status": "ok",
            "speedup": res["speedup_vs_baseline_p50"],
            "latency_ms_p50": res["latency_ms"]["p50"],
            "original_latency_ms_p50": base["latency_ms"]["p50"],
            "size_ratio": original.size_bytes / final.size_bytes,
            "quality": q,
            "quality_drop": None
            if q is None or q0 is None
            else (q0 - q if workload.higher_is_better else q - q0),
            "fidelity": evaluations[last["label"]]["fidelity"],
            "feasible": verdict["holds"],
            "checks": verdict["checks"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return row


def _test_exit(number: int) -> None:
    """A seam for the worker-death tests: with SLIMSHIP_TUNE_EXIT_ONCE=<trial>:<marker file> the process running
    that trial exits abruptly once its steps are built (the first time; the marker remembers), ``<trial>:always``
    every time. The Ray executor forwards the variable to its workers."""
    import os

    seam = os.environ.get("SLIMSHIP_TUNE_EXIT_ONCE")
    if not seam:
        return
    trial, _, marker = seam.partition(":")
    if trial != str(number):
        return
    if marker != "always":
        if Path(marker).exists():
            return
        Path(marker).write_text("exited once")
    print(f"trial {number}: exiting abruptly (SLIMSHIP_TUNE_EXIT_ONCE)", flush=True)
    os._exit(17)


def objectives(row: dict[str, Any], objective: str) -> tuple[float, float] | None:
    """(speed or size ratio, quality) — both maximised — for an evaluated row."""
    if row.get("status") != "ok":
        return None
    speed = row["speedup"] if objective == "latency" else row["size_ratio"]
    return float(speed), float(row["quality"] if row["quality"] is not None else 0.0)


def constraint_values(row: dict[str, Any], recipe: Recipe) -> dict[str, float]:
    """One value per constraint, ≤ 0 when it holds (Optuna's convention): how far each is from holding."""
    names = [
        n
        for n in ("max_quality_drop", "min_fidelity", "max_latency_ms", "min_speedup", "max_size_mb")
        if getattr(recipe.constraints, n) is not None
    ] or ["completes"]
    if row.get("status") == "ok":
        checks = row["checks"]
        return {
            n: 0.0
            if checks.get(n, {"holds": True})["holds"]
            else 1.0 + abs(float(checks[n]["measured"] or 0) - float(checks[n]["limit"]))
            for n in names
        }
    return dict.fromkeys(names, 1e3)  # failed or screened: far outside the feasible region


def pool_baseline(rows: list[dict[str, Any]], recipe: Recipe) -> float | None:
    """Judge every trial's speed against the median of the original's p50 over all trials.

    Each trial times the original interleaved with its candidate, but a PyTorch original's p50 moves ±10% from
    one trial to the next on this machine (OpenMP scheduling), while ONNX Runtime candidates barely move; one
    trial's ratio inherits that noise. The pooled median is the steadier yardstick: ``speedup`` becomes
    pooled / candidate p50 (the trial's own ratio stays as ``speedup_same_run``) and a ``min_speedup`` at the
    search's batch size is judged again with it."""
    fresh = [
        r
        for r in rows
        if r.get("status") == "ok" and r.get("reused_from") is None and r.get("original_latency_ms_p50")
    ]
    if not fresh:
        return None
    import statistics

    pooled = float(statistics.median(r["original_latency_ms_p50"] for r in fresh))
    c = recipe.constraints
    assert recipe.search is not None
    for r in rows:
        if r.get("status") != "ok" or not r.get("latency_ms_p50"):
            continue
        r.setdefault("speedup_same_run", r["speedup"])
        r["speedup"] = pooled / float(r["latency_ms_p50"])
        chk = r.get("checks", {}).get("min_speedup")
        if (
            chk is not None
            and c.min_speedup is not None
            and c.min_speedup.batch_size == recipe.search.batch_size
        ):
            chk.update(
                measured=r["speedup"],
                holds=r["speedup"] >= c.min_speedup.value,
                baseline="pooled original p50",
            )
            r["feasible"] = all(v["holds"] for v in r["checks"].values())
    return pooled


def pareto_front(rows: Iterable[dict[str, Any]], objective: str) -> set[int]:
    """Trial numbers not dominated in (speed-or-size, quality) among the evaluated rows."""
    pts = {r["trial"]: objectives(r, objective) for r in rows if objectives(r, objective) is not None}
    front = set()
    for t, (s, q) in pts.items():  # type: ignore[misc]
        if not any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for t2, (s2, q2) in pts.items() if t2 != t):  # type: ignore[misc]
            front.add(t)
    return front


def space_size(recipe: Recipe) -> int | None:
    """How many distinct candidates the space can build, when it is all choices or stepped ranges (else None).
    Proposals that differ only in a skipped step's fields, or in a field the chosen pass lacks, count once."""
    assert recipe.search is not None
    values: list[list[Any]] = []
    for p in recipe.search.params.values():
        if p.choices is not None:
            values.append(list(p.choices))
        elif p.step is not None:
            n = math.floor((float(p.high or 0) - float(p.low or 0)) / p.step + 1e-9) + 1
            values.append([float(p.low or 0) + k * p.step for k in range(n)])
        else:
            return None
    total = math.prod(len(v) for v in values)
    if total > 20000:
        return total
    keys = list(recipe.search.params)
    return len(
        {
            _key(effective_params(recipe, dict(zip(keys, combo, strict=True))))
            for combo in itertools.product(*values)
        }
    )


@dataclass
class SearchState:
    """What the search has seen so far; executors consult ``stop_reason`` after every trial."""

    recipe: Recipe
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    since_best: int = 0

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if row.get("reused_from") is not None:
            return
        if row.get("status") == "ok" and row.get("feasible"):
            v = objectives(row, self.objective)[0]  # type: ignore[index]
            if self.best_value is None or v > self.best_value:
                self.best_value, self.since_best = v, 0
                return
        if self.best_value is not None:
            self.since_best += 1

    def hints(self) -> dict[str, Any]:
        """For cheap signals in the next trial: the best feasible objective value, and per runtime signature the
        best speed-up per unit of MAC reduction seen so far."""
        per_mac: dict[str, float] = {}
        for r in self.rows:
            if r.get("status") == "ok" and r.get("reused_from") is None and r.get("macs_ratio"):
                v = float(r["speedup"]) / float(r["macs_ratio"])
                per_mac[r["signature"]] = max(per_mac.get(r["signature"], 0.0), v)
        return {"best_feasible": self.best_value, "speed_per_mac": per_mac}

    @property
    def objective(self) -> str:
        assert self.recipe.search is not None
        return self.recipe.search.objective

    @property
    def evaluations(self) -> int:
        return sum(1 for r in self.rows if r.get("reused_from") is None)

    def stop_reason(self, limit: int, deadline: float | None) -> str | None:
        search = self.recipe.search
        assert search is not None
        if self.evaluations >= limit:
            return f"trial budget reached ({limit} candidates)"
        if deadline is not None and time.monotonic() >= deadline:
            return f"time budget reached ({search.timeout_seconds:g} s)"
        size = space_size(self.recipe)
        if (
            size is not None
            and len({_key(effective_params(self.recipe, r["params"])) for r in self.rows}) >= size
        ):
            return f"every one of the {size} combinations in the space was tried"
        if search.patience is not None and self.best_value is not None and self.since_best >= search.patience:
            return (
                f"early stop: a feasible candidate exists and {self.since_best} candidates in a row did not beat it "
                f"(patience {search.patience})"
            )
        return None


def _key(params: dict[str, Any]) -> str:
    import json

    return json.dumps(params, sort_keys=True, default=str)


class Executor(Protocol):
    """Runs a search: proposes parameter sets, runs :func:`run_trial` for each, records rows in ``state``."""

    name: str

    def search(
        self,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[dict[str, Any]], None],
        log: Callable[[str], None],
    ) -> str: ...


class LocalExecutor:
    """Optuna TPE (multi-objective, seeded, constraint-aware) with trials run one after another in this process."""

    name = "local"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def search(
        self,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[dict[str, Any]], None],
        log: Callable[[str], None],
    ) -> str:
        import warnings

        import optuna

        recipe = state.recipe
        assert recipe.search is not None
        import random

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seen: dict[str, dict[str, Any]] = {}
        rng = random.Random(self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", optuna.exceptions.ExperimentalWarning
            )  # constraints are "experimental"
            sampler = optuna.samplers.TPESampler(seed=self.seed)
            study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
            for number in itertools.count():
                reason = state.stop_reason(limit, deadline)
                if reason is not None:
                    return reason
                if number >= 4 * limit:
                    return f"the sampler kept proposing tried combinations ({number} proposals)"
                trial = study.ask()
                params = suggest_params(trial, recipe)
                same = _key(effective_params(recipe, params))
                earlier = seen.get(same)
                if earlier is not None:
                    row = repeat_row(earlier, number, params)
                    # the sampler is circling: steer the next proposal to a combination not tried yet
                    untried = _untried(recipe, seen, rng)
                    if untried is not None:
                        study.enqueue_trial(untried)
                else:
                    row = run_trial(ctx, number, params, log, hints=state.hints())
                    seen[same] = row
                tell_row(study, trial, row, recipe)
                state.record(row)
                on_row(row)
        raise AssertionError("unreachable")


def repeat_row(earlier: dict[str, Any], number: int, params: dict[str, Any]) -> dict[str, Any]:
    """The row of a proposal that builds the same candidate as trial ``earlier``: its results, no new evaluation."""
    return {**earlier, "trial": number, "params": params, "reused_from": earlier["trial"]}


def tell_row(study: Any, trial: Any, row: dict[str, Any], recipe: Recipe) -> None:
    """Feed a finished row back to the Optuna study: constraint violations, then the objectives (or PRUNED)."""
    import optuna

    assert recipe.search is not None
    for name, value in constraint_values(row, recipe).items():
        trial.set_constraint(name, value)
    values = objectives(row, recipe.search.objective)
    if values is None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, list(values))


def _untried(recipe: Recipe, seen: dict[str, Any], rng: Any) -> dict[str, Any] | None:
    """A random combination of an all-choices space that builds a candidate not tried yet (None if none/too big)."""
    assert recipe.search is not None
    params = recipe.search.params
    if (
        any(p.choices is None for p in params.values())
        or math.prod(len(p.choices or []) for p in params.values()) > 20000
    ):
        return None
    keys = list(params)
    combos = [
        dict(zip(keys, c, strict=True)) for c in itertools.product(*(params[k].choices or [] for k in keys))
    ]
    fresh = [c for c in combos if _key(effective_params(recipe, c)) not in seen]
    return rng.choice(fresh) if fresh else None


def suggest_params(trial: Any, recipe: Recipe) -> dict[str, Any]:
    """One value per searched key from an Optuna trial (the same calls, in the same order, in every executor)."""
    assert recipe.search is not None
    return {key: _suggest(trial, key, p) for key, p in recipe.search.params.items()}


def _suggest(trial: Any, key: str, p: Any) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(key, p.choices)
    if p.step is not None and float(p.step).is_integer() and float(p.low or 0).is_integer():
        return trial.suggest_int(key, int(p.low or 0), int(p.high or 0), step=int(p.step), log=p.log)
    return trial.suggest_float(key, float(p.low or 0), float(p.high or 0), step=p.step, log=p.log)


EXECUTORS = ("local", "ray")


def executor_for(name: str, **options: Any) -> Executor:
    """``local`` takes ``seed``; ``ray`` takes ``seed`` and the options of :class:`~slimship.pipeline.tune_ray.RayExecutor`."""
    if name == "local":
        unknown = sorted(k for k, v in options.items() if k != "seed" and v is not None)
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)} only apply to --executor ray; drop them or add --executor ray"
            )
        return LocalExecutor(seed=options.get("seed", 0))
    if name == "ray":
        from slimship.pipeline.tune_ray import RayExecutor

        return RayExecutor(**{k: v for k, v in options.items() if v is not None})
    raise ConfigError(f"unknown executor {name!r}; executors: {list(EXECUTORS)} (e.g. --executor ray)")


def tune_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    trials: int | None = None,
    evaluate_limit: int | None = None,
    executor: Executor | None = None,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Run (or resume — built steps and evaluations are reused) a search; returns what tune.json holds."""
    import shutil

    from slimship.machine import machine_info, physical_cores

    recipe = load_recipe(recipe_path)
    if recipe.search is None:
        raise ConfigError(
            f"{recipe_path} has no `search` section; `slimship tune` needs one (or use `slimship run`)"
        )
    search = recipe.search
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    ctx = TrialContext(str(Path(recipe_path).resolve()), str(out.resolve()), evaluate_limit)
    _, workload, original = _setup(ctx.recipe_path, ctx.out_dir)
    executor = executor or LocalExecutor()
    machine = machine_info(physical_cores())
    state = SearchState(recipe)
    limit = trials or search.trials
    t_start = time.perf_counter()
    deadline = time.monotonic() + search.timeout_seconds if search.timeout_seconds else None
    base_eval = evaluate_steps([], out / "original", workload, evaluate_limit, log)["original"]

    def result(stopped: str | None) -> dict[str, Any]:
        rows = state.rows
        pooled = pool_baseline(rows, recipe)
        front = pareto_front([r for r in rows if r.get("reused_from") is None], search.objective)
        for r in rows:
            if r.get("status") == "ok":
                r["pareto"] = r["trial"] in front and r.get("reused_from") is None
        ok = [r for r in rows if r.get("status") == "ok" and r.get("reused_from") is None]
        feasible = [r for r in ok if r["feasible"]]
        best = max(feasible, key=lambda r: objectives(r, search.objective)[0]) if feasible else None  # type: ignore[index]
        closest = (
            []
            if feasible
            else sorted(
                ok,
                key=lambda r: (
                    sum(0 if c["holds"] else 1 for c in r["checks"].values()),
                    sum(constraint_values(r, recipe).values()),
                ),
            )[:3]
        )
        return {
            "schema": SCHEMA,
            "machine": machine,
            "recipe": recipe.model_dump(mode="json", by_alias=True),
            "recipe_path": str(recipe_path),
            "workload": workload.describe(),
            "executor": executor.name,
            "objective": search.objective,
            "batch_size": search.batch_size,
            "original": {
                "size_bytes": original.size_bytes,
                "quality": base_eval["quality"],
                "format": original.format,
                "candidate": str(out / "original"),
            },
            "trials": rows,
            "evaluations": state.evaluations,
            "best": best,
            "closest_if_none_feasible": closest,
            "original_latency_ms_p50_pooled": pooled,
            "stopped": stopped,
            "seconds": round(time.perf_counter() - t_start, 1),
        }

    from tqdm import tqdm

    bar = tqdm(total=limit, desc="search", unit="candidate", disable=None)  # off when not a terminal

    def on_row(row: dict[str, Any]) -> None:
        bar.n = state.evaluations
        bar.set_postfix_str(f"best {state.best_value:.2f}x" if state.best_value else "no feasible yet")
        bar.refresh()
        write_json_atomic(out / "tune.json", result(None))

    try:
        stopped = executor.search(ctx, state, limit, deadline, on_row, log)
    finally:
        bar.close()
    log(f"search stopped: {stopped}")
    final = result(stopped)
    write_json_atomic(out / "tune.json", final)
    from slimship.report.html import write_report

    write_report(out, final)
    return final
