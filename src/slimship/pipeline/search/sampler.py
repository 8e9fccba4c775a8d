"""The proposals: Optuna's seeded multi-objective TPE sampler, the define-by-run ``suggest_*`` calls that turn a
recipe's ``search.params`` into one parameter set, the feedback of a finished row (constraint violations, then
the objectives), and an untried combination to steer a sampler that keeps proposing tried ones. Every executor
uses these, in the same order, so the same seed proposes the same candidates."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Literal

from slimship.pipeline.recipe import Recipe, effective_params
from slimship.pipeline.search.state import TrialRow, candidate_key, constraint_values, objectives

#: the two objectives every study maximises: speed (or size) ratio, then quality
DIRECTIONS: tuple[Literal["maximize"], ...] = ("maximize", "maximize")


def tpe_sampler(seed: int) -> Any:
    """Optuna's multi-objective TPE sampler, seeded (constraint feedback goes through ``set_constraint``)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


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


def tell_row(study: Any, trial: Any, row: TrialRow, recipe: Recipe) -> None:
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


def untried(recipe: Recipe, seen: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """A random combination of an all-choices space whose :func:`candidate_key` is not in ``seen`` (None if every
    one is, or the space is not all choices, or too big to list)."""
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
    fresh = [c for c in combos if candidate_key(effective_params(recipe, c)) not in seen]
    return rng.choice(fresh) if fresh else None
