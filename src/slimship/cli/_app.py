"""The typer app every verb module registers on, and what several of them share: the common options
(workload, data, threads, a PyTorch target), target resolution (`[LABEL=]TARGET[@RUNTIME]`), int-list parsing,
and `config_option`, which builds an option's help from the pass config field it sets.

Imports none of the verb modules (they import this one); `slimship.cli` imports them to register their verbs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "DataOpt",
    "LimitOpt",
    "ThreadsOpt",
    "TorchTargetArg",
    "WorkloadOpt",
    "app",
    "cli_workload",
    "config_option",
    "console",
    "load_torch_target",
    "option_given",
    "parse_ints",
    "resolve_target",
]

app = typer.Typer(
    name="slimship",
    help="Compress, convert, measure and ship trained models. Start with `slimship quickstart`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

WorkloadOpt = Annotated[
    str,
    typer.Option(
        "--workload",
        "-w",
        help="Built-in name (minilm, mnist, digits, mobilenetv2), path/to/file.py:build (a factory), hf:path/to/model_dir, "
        "or path/to/model.onnx (with --data). Example: `-w mnist`.",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="For an ONNX workload: an .npz with one array per model input (batch first) and optional `labels`.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", "-t", min=1, help="Intra-op threads for every runtime (default: physical cores)."
    ),
]
LimitOpt = Annotated[
    int | None, typer.Option(min=1, help="--eval on the first N samples only (minilm: N articles).")
]
TorchTargetArg = Annotated[
    str,
    typer.Argument(
        help="The PyTorch model to compress: `original` (the workload's own model) or a PyTorch candidate directory."
    ),
]


def config_option(
    config: type[BaseModel], field: str, *param_decls: str, prefix: str = "", suffix: str = "", **kwargs: Any
) -> Any:
    """A `typer.Option` for a CLI option that sets `config`'s `field`, its help taken from the field's description
    (one source for `--help`, `slimship passes` and the recipe schema). `prefix` names the mode the option applies
    to (`structured: `), `suffix` the CLI's syntax (` (repeatable)`); both are dropped when the field has no
    description, so a missing description shows as a missing help (tests/test_package.py checks every option)."""
    description = (config.model_fields[field].description or "").strip()
    return typer.Option(*param_decls, help=f"{prefix}{description}{suffix}" if description else "", **kwargs)


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (`1,8,32`); `what` names the option in the error."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} is a comma-separated list of integers, e.g. 1,8,32; got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what} must be positive integers, e.g. 1,8,32; got {text!r}")
    return values


def resolve_target(spec: str, workload: Any, default_label: str) -> tuple[str, Any, str]:
    """`[LABEL=]TARGET[@RUNTIME]` → (label, candidate, backend). TARGET: `original`, a candidate dir, or a .onnx file."""
    from slimship._util import cache_dir
    from slimship.candidate import Candidate, load_candidate, original_candidate
    from slimship.errors import CandidateError, ConfigError
    from slimship.runtime import BACKENDS

    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = "", spec
    target, at, backend = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and backend not in BACKENDS:
        raise ConfigError(
            f"unknown runtime {backend!r} in {spec!r}; use one of {list(BACKENDS)}, e.g. original@torch"
        )
    if target == "original":
        orig_dir = (
            cache_dir()
            / "originals"
            / f"{workload.name.replace('/', '_').replace(':', '_')[:60]}-{workload.fingerprint()}"
        )
        cand: Candidate = (
            load_candidate(orig_dir)
            if (orig_dir / "candidate.json").exists()
            else original_candidate(workload, orig_dir)
        )
    elif target.endswith(".onnx"):
        path = Path(target)
        if not path.is_file():
            raise CandidateError(f"{path} does not exist")
        from slimship._util import sha256_file

        cand = Candidate(
            path=path.parent.resolve(),
            id=f"file-{sha256_file(path)[:12]}",
            name=path.stem,
            format="onnx",
            artifact=path.name,
            workload=dict(workload.ref),
            artifact_sha256=sha256_file(path),
        )
    else:
        cand = load_candidate(target)
    from slimship.runtime import default_backend

    backend = backend or default_backend(cand.format)
    return label or default_label or f"{cand.name}@{backend}", cand, backend


def _current_context() -> Any:
    """The running command's click context (typer ≥ 0.29 runs on its own copy of click; older ones on click)."""
    import importlib

    try:
        module = importlib.import_module("typer._click.globals")
    except ImportError:  # pragma: no cover - typer before 0.29
        module = importlib.import_module("click.globals")
    return module.get_current_context(silent=True)


def option_given(param: str) -> bool:
    """Whether the user gave option ``param`` of the running command (False when its default is in use)."""
    ctx = _current_context()
    return ctx is None or getattr(ctx.get_parameter_source(param), "name", "") != "DEFAULT"


def cli_workload(workload: str, data: str | None, param: str = "workload") -> Any:
    """Resolve a verb's ``--workload``; when the user gave none and the verb's built-in default is used, say
    which on stderr (``prune`` defaults to ``mnist``: a user who meant their own model should know at once)."""
    from slimship.workload import resolve_workload

    w = resolve_workload(workload, data=data)
    ctx = _current_context()
    if not option_given(param):
        typer.echo(
            f"workload: {workload} (the default of `slimship {ctx.info_name}`; give -w for another)", err=True
        )
    return w


def load_torch_target(target: str, workload: str, data: str | None) -> tuple[Any, Any]:
    """(workload, candidate) for a verb that works on a PyTorch model; an ONNX target is a ConfigError."""
    from slimship.errors import ConfigError

    w = cli_workload(workload, data)
    _, cand, _ = resolve_target(target, w, "")
    if cand.format != "torch":
        raise ConfigError(
            f"{target} is an ONNX candidate; compression passes work on PyTorch models (`original` or a pass's output)"
        )
    return w, cand


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
