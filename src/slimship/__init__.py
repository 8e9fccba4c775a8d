"""slimship: take a trained model (PyTorch or ONNX) and make it deployable — compressed, converted,
verified, measured on the machine that will run it, and shipped.

``import slimship`` is light: it imports neither torch, onnxruntime, transformers, fastapi nor ray;
each is imported when the code that needs it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimship.errors import (
    CandidateError,
    CompressionError,
    ConfigError,
    ExecutorError,
    ExportError,
    InferenceError,
    InputSpecError,
    RegistryError,
    ServingError,
    SlimshipError,
    VerificationError,
    WorkloadError,
)

__version__ = "0.1.0"

__all__ = [
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

# name -> module that defines it; resolved on first access so `import slimship` stays light
_LAZY = {
    "BenchTarget": "slimship.measure.bench",
    "bench": "slimship.measure.bench",
    "Candidate": "slimship.candidate",
    "load_candidate": "slimship.candidate",
    "original_candidate": "slimship.candidate",
    "ExportConfig": "slimship.passes",
    "GraphOptimizeConfig": "slimship.passes",
    "export": "slimship.passes",
    "optimize_graph": "slimship.passes",
    "run_pass": "slimship.passes",
    "StructuredPruneConfig": "slimship.passes",
    "DepthPruneConfig": "slimship.passes",
    "UnstructuredPruneConfig": "slimship.passes",
    "LowRankConfig": "slimship.passes",
    "WeightShareConfig": "slimship.passes",
    "DistillConfig": "slimship.passes",
    "prune": "slimship.passes",
    "depth_prune": "slimship.passes",
    "sparsify": "slimship.passes",
    "lowrank": "slimship.passes",
    "share": "slimship.passes",
    "distill": "slimship.passes",
    "load_shared": "slimship.passes.share",
    "FinetuneConfig": "slimship.train",
    "create_runtime": "slimship.runtime",
    "evaluate": "slimship.measure.evaluate",
    "machine_info": "slimship.machine",
    "resolve_workload": "slimship.workload",
    "Workload": "slimship.workload",
}

if TYPE_CHECKING:
    from slimship.candidate import Candidate, load_candidate, original_candidate
    from slimship.machine import machine_info
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.passes import (  # type: ignore[no-redef]  # mypy takes distill, export, … for the same-named submodules
        DepthPruneConfig,
        DistillConfig,
        ExportConfig,
        GraphOptimizeConfig,
        LowRankConfig,
        StructuredPruneConfig,
        UnstructuredPruneConfig,
        WeightShareConfig,
        depth_prune,
        distill,
        export,
        lowrank,
        optimize_graph,
        prune,
        run_pass,
        share,
        sparsify,
    )
    from slimship.passes.share import load_shared
    from slimship.runtime import create_runtime
    from slimship.train import FinetuneConfig
    from slimship.workload import Workload, resolve_workload


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimship' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
