"""`slimship <verb>`: the command-line entry point. Only this package and the server configure logging.

One module per group of verbs, all registered on the app of `_app.py` (which imports none of them):

- `measure.py`: workloads, info, eval, bench, verify, layers
- `compress.py`: export, passes, prune, lowrank, separable, share, distill
- `quantize.py`: quantize
- `recipes.py`: run, tune, report, quickstart
- `registry.py`: registry list | show | register | stage | archive | gc
- `serve.py`: serve, serve-tune
- `rollout.py`: rollout start | status | pause | resume | abort
"""

from __future__ import annotations

import sys

import typer

from slimship.cli import compress, measure, quantize, recipes, registry, rollout, serve  # noqa: F401 - register
from slimship.cli._app import app, console
from slimship.errors import SlimshipError

__all__ = ["app", "main"]

# `slimship --help` lists the verbs in this order (the order users met them), not grouped by module
_ORDER = (
    "workloads",
    "info",
    "passes",
    "export",
    "eval",
    "bench",
    "verify",
    "quantize",
    "quickstart",
    "prune",
    "lowrank",
    "separable",
    "share",
    "distill",
    "layers",
    "run",
    "tune",
    "report",
    "serve",
    "serve-tune",
)


def _position(command: typer.models.CommandInfo) -> int:
    name = command.name or getattr(command.callback, "__name__", "")
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


app.registered_commands.sort(key=_position)


def main() -> None:
    """The `slimship` console script: run the app; a SlimshipError is one red line on stderr and exit code 2."""
    try:
        app()
    except SlimshipError as err:
        from rich.markup import escape

        # escaped: a message like "pip install 'slimship[ray]'" must not lose its brackets to rich markup
        console().print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, markup=True)
        sys.exit(2)
