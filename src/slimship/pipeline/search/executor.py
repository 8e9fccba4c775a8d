"""What an executor is (:class:`Executor`) and how one is chosen by name (:func:`executor_for`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from slimship.errors import ConfigError
from slimship.pipeline.search.state import SearchState, TrialRow
from slimship.pipeline.search.trial import TrialContext

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs a search: proposes parameter sets, runs :func:`~slimship.pipeline.search.trial.run_trial` for each,
    records rows in ``state`` and calls ``on_row`` after each; returns why it stopped."""

    name: str

    def search(
        self,
        ctx: TrialContext,
        state: SearchState,
        limit: int,
        deadline: float | None,
        on_row: Callable[[TrialRow], None],
        log: Callable[[str], None],
    ) -> str: ...


def executor_for(name: str, **options: Any) -> Executor:
    """``local`` takes ``seed``; ``ray`` takes ``seed`` and the options of
    :class:`~slimship.pipeline.search.ray.RayExecutor`."""
    if name == "local":
        from slimship.pipeline.search.local import LocalExecutor

        unknown = sorted(k for k, v in options.items() if k != "seed" and v is not None)
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)} only apply to --executor ray; drop them or add --executor ray"
            )
        return LocalExecutor(seed=options.get("seed", 0))
    if name == "ray":
        from slimship.pipeline.search.ray import RayExecutor

        return RayExecutor(**{k: v for k, v in options.items() if v is not None})
    raise ConfigError(f"unknown executor {name!r}; executors: {list(EXECUTORS)} (e.g. --executor ray)")
