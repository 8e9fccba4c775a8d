"""The package surface: light import, pinned public API, one exception tree, CLI help."""

from __future__ import annotations

import subprocess
import sys

import pytest

import slimship
from slimship import errors

HEAVY = ("torch", "onnxruntime", "onnx", "transformers", "fastapi", "ray", "sklearn", "openvino")


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


@pytest.mark.parametrize(
    "command", ["workloads", "info", "passes", "export", "eval", "bench", "quantize", "quickstart"]
)
def test_cli_help_explains_every_option(command):
    out = subprocess.run(
        [sys.executable, "-m", "slimship.cli", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
    ).stdout
    assert "Usage" in out
    # every option line carries a description (typer prints the option then its help text)
    for line in out.splitlines():
        stripped = line.strip("│ ").strip()
        if stripped.startswith("--") and stripped != "--help":
            assert len(stripped.split(None, 2)) >= 2, f"{command}: option without help: {stripped}"
    assert "Example" in out
