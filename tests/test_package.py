"""The package surface: light import, pinned public API, one exception tree, CLI help."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import slimship
from slimship import errors

# what `import slimship` must not import: the heavy backends and the serving/search/registry stacks
HEAVY = (
    "torch",
    "onnx",
    "onnxruntime",
    "transformers",
    "starlette",
    "uvicorn",
    "optuna",
    "sqlalchemy",
    "ray",
    "openvino",
    "executorch",
    "sklearn",
)


def test_import_is_light():
    code = f"import sys, slimship, slimship.errors; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"`import slimship` imported heavy modules: {out}"


def test_listing_passes_and_workloads_stays_light():
    code = (
        "import sys; from slimship.passes import list_passes; from slimship.workload import list_workloads; "
        f"list_passes(); list_workloads(); print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_cli_import_stays_light():
    # the CLI reads the pass configs' field descriptions for its help, so it imports slimship.passes, not more
    code = (
        f"import sys, slimship.cli; print(','.join(m for m in {(*HEAVY, 'fastapi')!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"`import slimship.cli` imported heavy modules: {out}"


def test_public_api_is_pinned():
    assert slimship.__all__ == [
        "BenchTarget",
        "Candidate",
        "CandidateError",
        "CompressionError",
        "ConfigError",
        "DepthPruneConfig",
        "DistillConfig",
        "ExecutorError",
        "ExportConfig",
        "ExportError",
        "FinetuneConfig",
        "GraphOptimizeConfig",
        "InferenceError",
        "InputSpecError",
        "LowRankConfig",
        "RegistryError",
        "ServingError",
        "SlimshipError",
        "StructuredPruneConfig",
        "UnstructuredPruneConfig",
        "VerificationError",
        "WeightShareConfig",
        "Workload",
        "WorkloadError",
        "__version__",
        "bench",
        "create_runtime",
        "depth_prune",
        "distill",
        "evaluate",
        "export",
        "load_candidate",
        "load_shared",
        "lowrank",
        "machine_info",
        "optimize_graph",
        "original_candidate",
        "prune",
        "resolve_workload",
        "run_pass",
        "share",
        "sparsify",
    ]
    for name in slimship.__all__:
        assert getattr(slimship, name) is not None
    with pytest.raises(AttributeError):
        slimship.nonexistent  # noqa: B018


def test_every_error_is_a_slimship_error():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SlimshipError)
    assert issubclass(errors.VerificationError, errors.ExportError)
    assert issubclass(errors.InputSpecError, errors.InferenceError)


# every verb `slimship --help` lists; a new verb is added here on purpose
VERBS = {
    "bench",
    "distill",
    "eval",
    "export",
    "info",
    "layers",
    "lowrank",
    "passes",
    "prune",
    "quantize",
    "quickstart",
    "registry",
    "report",
    "rollout",
    "run",
    "separable",
    "serve",
    "serve-tune",
    "share",
    "tune",
    "verify",
    "workloads",
}


def _commands() -> list[tuple[str, Any]]:
    """Every command and sub-command of the CLI as (`slimship …` path, click command), groups included."""
    import typer

    from slimship.cli import app

    out: list[tuple[str, Any]] = []

    def walk(path: str, cmd: Any) -> None:
        out.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(f"{path} {name}", sub)

    walk("slimship", typer.main.get_command(app))
    return out


def test_cli_lists_exactly_the_documented_verbs():
    out = subprocess.run(
        [sys.executable, "-m", "slimship.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    ).stdout
    root = dict(_commands())["slimship"]
    names = set(root.commands)
    assert not [n for n in names if n.startswith(("-", "_"))], f"private helpers registered as verbs: {names}"
    assert names == VERBS
    import slimship.cli

    undocumented = [v for v in VERBS if f" {v}" not in (slimship.cli.__doc__ or "").replace(",", " ")]
    assert not undocumented, f"verbs missing from slimship/cli/__init__.py's module map: {undocumented}"
    listed = {
        line.strip("│ ").split()[0] for line in out.splitlines() if line.startswith("│ ") and line[2:3] != "-"
    }
    assert listed >= VERBS and not [n for n in listed if n.startswith(("-", "_"))], out


def test_cli_help_explains_every_command_option_and_argument():
    missing = []
    for path, cmd in _commands():
        for param in cmd.params:  # options and arguments (typer's own classes, on its vendored click)
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{path} {param.param_type_name} {param.opts[0]}: no help")
        if path != "slimship" and "Example" not in (cmd.help or ""):
            missing.append(f"{path}: docstring without an example")
    assert not missing, "\n".join(missing)
    assert len(_commands()) >= 25


def test_cli_help_renders_for_every_command():
    from typer.testing import CliRunner

    from slimship.cli import app

    runner = CliRunner()
    for path, _ in _commands():
        result = runner.invoke(app, [*path.split()[1:], "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output and (path == "slimship" or "Example" in result.output), path


def test_config_option_help_is_the_config_fields_description():
    from pydantic import BaseModel, Field

    from slimship.cli._app import config_option

    class Config(BaseModel):
        described: int = Field(default=1, description="how many")
        bare: int = 1

    opt = config_option(Config, "described", "--many", min=1, prefix="mode: ", suffix=" (repeatable)")
    assert opt.help == "mode: how many (repeatable)" and opt.min == 1
    assert (
        config_option(Config, "bare", prefix="mode: ").help == ""
    )  # no description: no help, and the help test says so


@pytest.mark.parametrize(
    ("verb", "option", "config", "field", "prefix"),
    [
        ("export", "--opset", "ExportConfig", "opset", ""),
        ("export", "--level", "GraphOptimizeConfig", "level", ""),
        ("prune", "--channel-ratio", "StructuredPruneConfig", "channel_ratio", "structured: "),
        ("prune", "--keep-layers", "DepthPruneConfig", "keep_layers", "depth: "),
        ("prune", "--sparsity-scope", "UnstructuredPruneConfig", "scope", "unstructured: "),
        ("prune", "--max-seconds", "FinetuneConfig", "max_seconds", "Recovery: "),
        ("lowrank", "--min-speedup", "LowRankConfig", "min_speedup", ""),
        ("separable", "--min-energy", "SeparableConfig", "min_energy", ""),
        ("share", "--bits", "WeightShareConfig", "bits", ""),
        ("distill", "--width", "StudentSpec", "width", ""),
        ("distill", "--feature-weight", "DistillConfig", "feature_weight", ""),
        ("quantize", "--smooth-alpha", "DynamicQuantConfig", "smooth_alpha", "dynamic: "),
        ("quantize", "--calibration", "StaticQuantConfig", "calibration", "static: "),
        ("quantize", "--block-size", "Int4WeightOnlyConfig", "block_size", "int4: "),
    ],
)
def test_pass_options_take_their_help_from_the_pass_config(verb, option, config, field, prefix):
    import slimship.passes
    from slimship.train.trainer import FinetuneConfig

    cls = FinetuneConfig if config == "FinetuneConfig" else getattr(slimship.passes, config)
    description = cls.model_fields[field].description
    cmd = dict(_commands())[f"slimship {verb}"]
    (opt,) = [p for p in cmd.params if option in p.opts]
    assert opt.help == (f"{prefix}{description}" if description else "")
