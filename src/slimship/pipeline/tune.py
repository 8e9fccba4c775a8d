"""Where ``slimship tune``'s entry points used to live; they moved to :mod:`slimship.pipeline.search`. Kept so
existing ``from slimship.pipeline.tune import tune_recipe, executor_for`` imports keep working."""

from slimship.pipeline.search import EXECUTORS, SCHEMA, executor_for, tune_recipe

__all__ = ["EXECUTORS", "SCHEMA", "executor_for", "tune_recipe"]
