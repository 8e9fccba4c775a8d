"""`slimship tune recipe.yaml`: search a recipe's ``search`` space for the fastest (or smallest) candidate
within its constraints, timing every candidate on its real runtime interleaved with the original.

Optuna's multi-objective TPE sampler (seeded) proposes values for the searched ``<step>.<field>`` params;
each trial runs the recipe's steps with those values through the same cached step machinery as
`slimship run` (trials that share a prefix of steps share its candidates), evaluates the final candidate,
times it against the original at the search's batch size, and records speed, size, quality and which
constraints hold. Constraint violations are fed to the sampler, so it learns the feasible region. A trial
whose pass fails is recorded with its reason and the search goes on. The result is every trial, the Pareto
front (quality against speed) and the best feasible trial — or, when none is feasible, the closest ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimship._util import write_json_atomic
from slimship.errors import ConfigError
from slimship.pipeline.recipe import load_recipe, with_value
from slimship.pipeline.runner import _reuse, _say, check_constraints, evaluate_steps, execute_steps

SCHEMA = "slimship.tune/1"


def tune_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    trials: int | None = None,
    evaluate_limit: int | None = None,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    import optuna

    from slimship.candidate import load_candidate, original_candidate
    from slimship.machine import machine_info, physical_cores
    from slimship.measure.bench import BenchTarget, bench
    from slimship.workload import resolve_workload

    recipe = load_recipe(recipe_path)
    if recipe.search is None:
        raise ConfigError(f"{recipe_path} has no `search` section; `slimship tune` needs one (or use `slimship run`)")
    search = recipe.search
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(physical_cores())
    workload = resolve_workload(recipe.workload, data=recipe.data)
    original = _reuse(out / "original") or original_candidate(workload, out / "original")
    labels = recipe.step_labels()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    metric = workload.primary_metric

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        steps = list(recipe.passes)
        chosen: dict[str, Any] = {}
        for key, p in search.params.items():
            if p.choices is not None:
                value = trial.suggest_categorical(key, p.choices)
            elif p.step is not None and float(p.step).is_integer() and float(p.low or 0).is_integer():
                value = trial.suggest_int(key, int(p.low or 0), int(p.high or 0), step=int(p.step), log=p.log)
            else:
                value = trial.suggest_float(key, float(p.low or 0), float(p.high or 0), step=p.step, log=p.log)
            chosen[key] = value
            label, _, field = key.partition(".")
            i = labels.index(label)
            steps[i] = steps[i].model_copy(update={"config": with_value(steps[i].config, field, value)})
        log(f"trial {trial.number}: {chosen}")
        done = execute_steps(steps, labels, workload, original, out, log)
        row: dict[str, Any] = {"trial": trial.number, "params": chosen, "steps": done}
        if done[-1]["status"] not in ("ran", "reused"):
            row["status"] = "failed"
            row["reason"] = next((s.get("reason") for s in done if s["status"] == "failed"), "a step failed")
            rows.append(row)
            trial.set_constraint("failed", 1.0)
            raise optuna.TrialPruned(row["reason"])
        evaluations = evaluate_steps([done[-1]], out / "original", workload, evaluate_limit, log)
        final = load_candidate(done[-1]["candidate"])
        backend = lambda c: "torch" if c.format == "torch" else "onnxruntime"  # noqa: E731
        timing = bench([BenchTarget("original", original, backend(original)), BenchTarget(done[-1]["label"], final, backend(final))],
                       workload, batch_sizes=(search.batch_size,), memory=False, progress=False, baseline="original")
        verdict = check_constraints(recipe, workload, evaluations, timing, done[-1], original)
        res = next(c for c in timing["candidates"] if c["label"] != "original")["results"][0]
        q = evaluations[done[-1]["label"]]["quality"].get(metric) if metric else None
        q0 = evaluations["original"]["quality"].get(metric) if metric else None
        row.update({
            "status": "ok",
            "candidate": done[-1]["candidate"],
            "speedup": res["speedup_vs_baseline_p50"],
            "latency_ms_p50": res["latency_ms"]["p50"],
            "size_bytes": final.size_bytes,
            "quality": q,
            "quality_drop": None if q is None or q0 is None else q0 - q,
            "fidelity": evaluations[done[-1]["label"]]["fidelity"],
            "feasible": verdict["holds"],
            "checks": verdict["checks"],
        })
        rows.append(row)
        # ≤ 0 means satisfied: how far each constraint is from holding (the sampler learns the feasible region)
        for name, c in verdict["checks"].items():
            trial.set_constraint(name, 0.0 if c["holds"] else 1.0 + abs(float(c["measured"] or 0) - float(c["limit"])))
        speed = res["speedup_vs_baseline_p50"] if search.objective == "latency" else original.size_bytes / final.size_bytes
        return speed, q if q is not None else 0.0

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constraint handling is marked experimental
        sampler = optuna.samplers.TPESampler(seed=0)
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        study.optimize(objective, n_trials=trials or search.trials, timeout=search.timeout_seconds, catch=())
    ok = [r for r in rows if r.get("status") == "ok"]
    pareto_ids = {t.number for t in study.best_trials}
    for r in ok:
        r["pareto"] = r["trial"] in pareto_ids
    key = "speedup" if search.objective == "latency" else "size_bytes"
    feasible = [r for r in ok if r["feasible"]]
    best = (max(feasible, key=lambda r: r["speedup"]) if key == "speedup" else min(feasible, key=lambda r: r["size_bytes"])) if feasible else None
    closest = sorted(ok, key=lambda r: sum(0 if c["holds"] else 1 for c in r["checks"].values()))[:3] if not feasible else []
    result = {
        "schema": SCHEMA,
        "machine": machine,
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "workload": workload.describe(),
        "objective": search.objective,
        "batch_size": search.batch_size,
        "trials": rows,
        "best": best,
        "closest_if_none_feasible": closest,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(out / "tune.json", result)
    return result
