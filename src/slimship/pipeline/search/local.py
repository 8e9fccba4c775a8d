"""The local executor: Optuna TPE (multi-objective, seeded, constraint-aware) with trials run one after another
in this process."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable
from typing import Any

from slimship.pipeline.recipe import effective_params
from slimship.pipeline.search.sampler import DIRECTIONS, suggest_params, tell_row, tpe_sampler, untried
from slimship.pipeline.search.state import SearchState, TrialRow, candidate_key
from slimship.pipeline.search.trial import TrialContext, run_trial


class LocalExecutor:
    """Proposes with Optuna's TPE in this process and runs each trial here (see :mod:`slimship.pipeline.search`)."""

    name = "local"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def search(
        self,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[TrialRow], None],
        log: Callable[[str], None],
    ) -> str:
        import optuna

        recipe = state.recipe
        assert recipe.search is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seen: dict[str, TrialRow] = {}
        rng = random.Random(self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", optuna.exceptions.ExperimentalWarning
            )  # constraints are "experimental"
            study = optuna.create_study(directions=list(DIRECTIONS), sampler=tpe_sampler(self.seed))
            for number in itertools.count():
                reason = state.stop_reason(limit, deadline)
                if reason is not None:
                    return reason
                if number >= 4 * limit:
                    return f"the sampler kept proposing tried combinations ({number} proposals)"
                trial = study.ask()
                params: dict[str, Any] = suggest_params(trial, recipe)
                same = candidate_key(effective_params(recipe, params))
                earlier = seen.get(same)
                if earlier is not None:
                    row = earlier.repeat(number, params)
                    # the sampler is circling: steer the next proposal to a combination not tried yet
                    fresh = untried(recipe, seen, rng)
                    if fresh is not None:
                        study.enqueue_trial(fresh)
                else:
                    row = run_trial(ctx, number, params, log, hints=state.hints())
                    seen[same] = row
                tell_row(study, trial, row, recipe)
                state.record(row)
                on_row(row)
        raise AssertionError("unreachable")
