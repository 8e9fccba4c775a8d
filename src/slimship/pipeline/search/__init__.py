"""The search (`slimship tune recipe.yaml`): search a recipe's ``search`` space for the fastest (or smallest)
candidate within its constraints, timing every candidate on its real runtime interleaved with the original.

How a search runs:

* An **executor** proposes parameter sets and runs trials. The local executor
  (:class:`~slimship.pipeline.search.local.LocalExecutor`) drives Optuna's multi-objective TPE sampler (seeded,
  so a search is reproducible) in this process; :class:`~slimship.pipeline.search.ray.RayExecutor` runs the same
  sampler inside Ray Tune (``OptunaSearch``) with every trial on a Ray worker. A trial is
  :func:`~slimship.pipeline.search.trial.run_trial` — a plain function of a
  :class:`~slimship.pipeline.search.trial.TrialContext` and the chosen values — so any executor can ship it to a
  worker, and every executor produces the same :class:`~slimship.pipeline.search.state.TrialRow`.
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

Modules:

* :mod:`~slimship.pipeline.search.trial` — one trial: build, screen, evaluate, time (``run_trial``)
* :mod:`~slimship.pipeline.search.sampler` — Optuna TPE setup, proposals from the search space, row feedback
* :mod:`~slimship.pipeline.search.state` — the typed trial row, objectives, pooled baseline, Pareto front,
  ``SearchState`` (stop rules)
* :mod:`~slimship.pipeline.search.executor` — the ``Executor`` protocol and ``executor_for``
* :mod:`~slimship.pipeline.search.local`, :mod:`~slimship.pipeline.search.ray` — the executors
* :mod:`~slimship.pipeline.search.driver` — ``tune_recipe``: runs a search, writes tune.json and report.html
"""

from slimship.pipeline.search.driver import SCHEMA, tune_recipe
from slimship.pipeline.search.executor import EXECUTORS, Executor, executor_for
from slimship.pipeline.search.state import SearchState, TrialRow

__all__ = ["EXECUTORS", "SCHEMA", "Executor", "SearchState", "TrialRow", "executor_for", "tune_recipe"]
