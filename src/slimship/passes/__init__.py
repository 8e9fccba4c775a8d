"""Passes: one technique each, registered by name. Importing this package imports no heavy backend.

``run_pass("export", candidate, workload, {"opset": 18}, out_dir)`` runs any pass by name; the
typed verbs (``export``, ``optimize_graph``) are the same passes with their configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimship.errors import ConfigError
from slimship.passes.base import Pass, PassConfig
from slimship.passes.distill import DistillConfig, DistillPass, StudentSpec
from slimship.passes.executorch import ExecuTorchConvertConfig, ExecuTorchConvertPass
from slimship.passes.export import ExportConfig, ExportPass
from slimship.passes.lowrank import LowRankConfig, LowRankPass
from slimship.passes.nncf_quant import (
    NNCFOnnxQuantizeConfig,
    NNCFOnnxQuantizePass,
    NNCFQuantizeConfig,
    NNCFQuantizePass,
)
from slimship.passes.openvino import OpenVINOConvertConfig, OpenVINOConvertPass
from slimship.passes.optimize import GraphOptimizeConfig, GraphOptimizePass
from slimship.passes.prune import DepthPruneConfig, DepthPrunePass, StructuredPruneConfig, StructuredPrunePass
from slimship.passes.qat import QATConfig, QATPass
from slimship.passes.quantize import (
    DynamicQuantConfig,
    DynamicQuantPass,
    Int4WeightOnlyConfig,
    Int4WeightOnlyPass,
    StaticQuantConfig,
    StaticQuantPass,
)
from slimship.passes.separable import SeparableConfig, SeparablePass
from slimship.passes.share import WeightShareConfig, WeightSharePass
from slimship.passes.sparsity import UnstructuredPruneConfig, UnstructuredPrunePass

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

__all__ = [
    "PASSES",
    "UNVERIFIABLE_TARGETS",
    "DepthPruneConfig",
    "DistillConfig",
    "DynamicQuantConfig",
    "ExecuTorchConvertConfig",
    "ExportConfig",
    "GraphOptimizeConfig",
    "Int4WeightOnlyConfig",
    "LowRankConfig",
    "NNCFOnnxQuantizeConfig",
    "NNCFQuantizeConfig",
    "OpenVINOConvertConfig",
    "Pass",
    "PassConfig",
    "QATConfig",
    "SeparableConfig",
    "StaticQuantConfig",
    "StructuredPruneConfig",
    "StudentSpec",
    "UnstructuredPruneConfig",
    "WeightShareConfig",
    "depth_prune",
    "distill",
    "export",
    "list_passes",
    "lowrank",
    "optimize_graph",
    "prune",
    "run_pass",
    "separable",
    "share",
    "sparsify",
]

PASSES: dict[str, type[Pass[Any]]] = {
    p.name: p
    for p in (
        ExportPass,
        GraphOptimizePass,
        DynamicQuantPass,
        StaticQuantPass,
        Int4WeightOnlyPass,
        QATPass,
        StructuredPrunePass,
        DepthPrunePass,
        UnstructuredPrunePass,
        LowRankPass,
        SeparablePass,
        DistillPass,
        WeightSharePass,
        OpenVINOConvertPass,
        NNCFQuantizePass,
        NNCFOnnxQuantizePass,
        ExecuTorchConvertPass,
    )
}

#: deployment targets slimship does not offer, and why: it hands back only what it verified on the host it runs on
UNVERIFIABLE_TARGETS = {
    "coreml": "not offered: a CoreML model can only be run (and so verified) on macOS/iOS, not on this Linux host",
    "tensorrt": "not offered: a TensorRT engine needs an NVIDIA GPU to be built, run and verified; this host has none",
}


def config_fields(config_cls: type[PassConfig]) -> dict[str, dict[str, Any]]:
    """Each config field's default (JSON form) and description, from the pydantic field itself (the same
    source as the recipe JSON Schema and the CLI help)."""
    defaults = config_cls().to_json_dict()
    return {
        name: {"default": defaults.get(name), "description": field.description or ""}
        for name, field in config_cls.model_fields.items()
    }


def list_passes() -> list[dict[str, Any]]:
    """Every registered pass: name, summary, formats, extra requirements, its config's defaults
    (``config``) and each field's default and description (``fields``)."""
    return [
        {
            "name": p.name,
            "summary": p.summary,
            "input": p.input_format,
            "output": p.output_format,
            "requires": list(p.requires),
            "config": p.config_cls().to_json_dict(),
            "fields": config_fields(p.config_cls),
        }
        for p in PASSES.values()
    ]


def run_pass(
    name: str,
    candidate: Candidate,
    workload: Workload,
    config: PassConfig | dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    if name not in PASSES:
        raise ConfigError(f"unknown pass {name!r}; available: {sorted(PASSES)}")
    return PASSES[name]()(candidate, workload, config, out_dir)


def export(
    candidate: Candidate,
    workload: Workload,
    config: ExportConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → verified ONNX candidate."""
    return ExportPass()(candidate, workload, config, out_dir)


def optimize_graph(
    candidate: Candidate,
    workload: Workload,
    config: GraphOptimizeConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """ONNX candidate → ONNX Runtime-optimised (and, for transformers, fused) ONNX candidate."""
    return GraphOptimizePass()(candidate, workload, config, out_dir)


def prune(
    candidate: Candidate,
    workload: Workload,
    config: StructuredPruneConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → channels / FFN neurons / heads physically removed, recovered by distillation."""
    return StructuredPrunePass()(candidate, workload, config, out_dir)


def depth_prune(
    candidate: Candidate,
    workload: Workload,
    config: DepthPruneConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → k of its n transformer layers kept, recovered by distillation."""
    return DepthPrunePass()(candidate, workload, config, out_dir)


def sparsify(
    candidate: Candidate,
    workload: Workload,
    config: UnstructuredPruneConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → smallest-magnitude weights zeroed (a smaller compressed file, not a faster model)."""
    return UnstructuredPrunePass()(candidate, workload, config, out_dir)


def lowrank(
    candidate: Candidate,
    workload: Workload,
    config: LowRankConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → Linear / 1x1 Conv layers split by truncated SVD where measured faster."""
    return LowRankPass()(candidate, workload, config, out_dir)


def separable(
    candidate: Candidate,
    workload: Workload,
    config: SeparableConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → k×k convolutions split into depthwise + pointwise (rank-1 SVD init), recovered by distillation."""
    return SeparablePass()(candidate, workload, config, out_dir)


def share(
    candidate: Candidate,
    workload: Workload,
    config: WeightShareConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate → k-means shared weights; the candidate directory also holds the shipped ``model.slimw``."""
    return WeightSharePass()(candidate, workload, config, out_dir)


def distill(
    candidate: Candidate,
    workload: Workload,
    config: DistillConfig | None = None,
    out_dir: str | Path | None = None,
) -> Candidate:
    """PyTorch candidate (the teacher) → a smaller student distilled from it."""
    return DistillPass()(candidate, workload, config, out_dir)
