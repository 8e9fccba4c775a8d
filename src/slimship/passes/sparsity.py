"""Unstructured magnitude pruning: zero the smallest weights of Linear and Conv layers, globally or per
layer, in one shot or gradually (Zhu & Gupta 2017 cubic schedule) with fine-tuning between steps.

What it buys, plainly: a sparse model compresses (the recorded ``compressed_bytes``) and feeds weight
sharing; dense runtimes (PyTorch eager, ONNX Runtime CPU) run it exactly as fast as before, because a
zero is multiplied like any other number. Structured pruning and low-rank factorisation are what make
dense kernels faster.
"""

from __future__ import annotations

import lzma
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from slimship.passes.base import Pass, PassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.workload import Workload

DENSE_NOTE = (
    "Unstructured sparsity shrinks the compressed file, not the latency: dense runtimes multiply zeros like any other "
    "weight. Use structured pruning (slimship prune) or low-rank factorisation for speed."
)


class UnstructuredPruneConfig(PassConfig):
    sparsity: float = Field(
        default=0.8,
        gt=0.0,
        lt=1.0,
        description="fraction of the pruned layers' weights set to zero, in (0, 1)",
    )
    scope: Literal["global", "layer"] = Field(
        default="global",
        description="global: one magnitude threshold across layers; layer: every layer reaches the same sparsity",
    )
    steps: int = Field(
        default=1,
        ge=1,
        le=20,
        description="pruning steps; >1 ramps sparsity along a cubic schedule with fine-tuning after each step",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="layers left dense (the first conv and the output layer are often sensitive)",
    )
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(),
        description="fine-tuning with the mask held fixed (after each step); null to skip",
    )


def prunable_weights(model: nn.Module, ignore: list[str]) -> dict[str, torch.Tensor]:
    import torch

    from slimship.passes._common import resolve_layers

    skip = {id(m) for m in resolve_layers(model, ignore, "ignore")}
    return {
        f"{n}.weight": m.weight
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d) and id(m) not in skip
    }


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) zeroing the ``sparsity`` fraction of smallest-magnitude weights."""
    import torch

    if scope == "layer":
        masks = {}
        for k, w in weights.items():
            n_zero = round(sparsity * w.numel())
            thr = w.detach().abs().flatten().kthvalue(n_zero).values if n_zero > 0 else torch.tensor(-1.0)
            masks[k] = w.detach().abs() > thr
        return masks
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    n_zero = round(sparsity * flat.numel())
    thr = flat.kthvalue(n_zero).values if n_zero > 0 else torch.tensor(-1.0)
    return {k: w.detach().abs() > thr for k, w in weights.items()}


def sparse_compressed_bytes(path: Path) -> int:
    """Size of the artifact after generic compression (xz): what a sparse model costs to ship as-is."""
    return len(lzma.compress(path.read_bytes(), preset=6))


class UnstructuredPrunePass(Pass[UnstructuredPruneConfig]):
    name: ClassVar[str] = "sparsify"
    summary: ClassVar[str] = (
        "unstructured magnitude pruning (global or per layer, gradual) with masked fine-tuning"
    )
    config_cls = UnstructuredPruneConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: UnstructuredPruneConfig, out_dir: Path
    ) -> Candidate:
        import torch

        from slimship.candidate import save_torch_candidate
        from slimship.errors import CompressionError
        from slimship.passes._common import recover, teacher_and_student

        teacher, student = teacher_and_student(candidate, workload)
        weights = prunable_weights(student, config.ignore)
        if not weights:
            raise CompressionError("no Linear or Conv weights left to prune after `ignore`")
        masks: dict[str, torch.Tensor] = {}

        def apply_masks() -> None:
            for k, w in weights.items():
                w.mul_(masks[k])

        schedule = [config.sparsity * (1 - (1 - (i + 1) / config.steps) ** 3) for i in range(config.steps)]
        trainings = []
        for i, target in enumerate(schedule):
            masks = magnitude_masks(weights, target, config.scope)
            with torch.no_grad():
                apply_masks()
            if config.finetune is not None:
                report = recover(
                    student,
                    teacher,
                    workload,
                    config.finetune,
                    after_step=apply_masks,
                    desc=f"sparse step {i + 1}/{config.steps}",
                )
                trainings.append({"target_sparsity": target, **(report.to_json() if report else {})})
        per_layer = {k: float((w == 0).float().mean()) for k, w in weights.items()}
        total = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        cand = save_torch_candidate(
            student,
            out_dir,
            name=f"sparse{round(config.sparsity * 100)}",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info={
                "sparsity": zeros / total,
                "sparsity_per_layer": per_layer,
                "finetune": trainings,
                "note": DENSE_NOTE,
            },
        )
        info: dict[str, Any] = {
            "file_bytes": cand.size_bytes,
            "compressed_bytes": sparse_compressed_bytes(cand.artifact_path),
            "parent_compressed_bytes": sparse_compressed_bytes(candidate.artifact_path)
            if candidate.format == "torch"
            else None,
        }
        return cand.with_info(**info).save()
