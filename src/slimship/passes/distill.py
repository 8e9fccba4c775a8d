"""Knowledge distillation into a smaller student built from the teacher: fewer transformer layers, a
narrower FFN, fewer CNN channels. The student starts from the teacher's weights (the kept layers, the
most important channels) or from scratch (``init: random``, the classic Hinton et al. 2015 setting),
then learns from the teacher's outputs through the shared trainer (:mod:`slimship.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimship.passes.base import Pass, StructuralPassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


class StudentSpec(BaseModel):
    """The student's shape relative to the teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: int | None = Field(
        default=None,
        ge=1,
        description="transformer layers to keep (evenly spaced teacher layers initialise them); null keeps all",
    )
    width: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="fraction of FFN neurons (transformers) or channels (CNNs) the student keeps, in (0, 1]",
    )
    init: Literal["teacher", "random"] = Field(
        default="teacher",
        description="teacher: start from the teacher's weights (kept layers, largest-magnitude channels); random: from scratch",
    )


class DistillConfig(StructuralPassConfig):
    student: StudentSpec = Field(
        default=StudentSpec(width=0.5),
        description="shape of the student relative to the teacher: num_layers, width (0, 1], init (teacher | random), e.g. {width: 0.5}",
    )
    finetune: FinetuneConfig = Field(
        default=FinetuneConfig(epochs=10, patience=3),
        description="how the student is trained from the teacher's outputs (see FinetuneConfig), e.g. {epochs: 10, patience: 3}",
    )
    teacher: Literal["parent", "original"] = Field(
        default="parent",
        description="parent: distil from the input model; original: from the first model of the lineage (e.g. recover a pruned model from the unpruned one — the student may then keep the input's shape unchanged)",
    )
    feature_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of hidden-state matching between kept layers and their teacher layers (transformers)",
    )

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if (
            self.teacher == "parent"
            and self.student.num_layers is None
            and self.student.width == 1.0
            and self.student.init == "teacher"
        ):
            raise ValueError(
                "the student equals the teacher: set student.num_layers or student.width < 1 (e.g. 0.5), "
                "or teacher: original to recover the input model from the lineage's first model"
            )
        return self


class DistillPass(Pass[DistillConfig]):
    name: ClassVar[str] = "distill"
    summary: ClassVar[str] = (
        "build a smaller student (fewer layers / narrower) from the teacher and distil into it"
    )
    config_cls = DistillConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: DistillConfig, out_dir: Path
    ) -> Candidate:
        import torch

        from slimship.errors import ConfigError
        from slimship.passes._common import structural_result, teacher_and_student
        from slimship.passes.prune import (
            DepthPruneConfig,
            StructuredPruneConfig,
            choose_layers,
            layer_list,
            structured_prune,
        )
        from slimship.structure import apply_edits

        spec = config.student
        teacher, student = teacher_and_student(candidate, workload)
        if config.teacher == "original":
            from slimship.candidate import load_torch_model

            root = candidate.lineage()[-1]
            if root.id == candidate.id:
                raise ConfigError(
                    "teacher: original, but the input model has no ancestors — it is the original"
                )
            if root.format != "torch":
                raise ConfigError(
                    f"teacher: original needs a PyTorch original; the lineage starts with a {root.format} model"
                )
            teacher = load_torch_model(root, workload).eval()
        edits = []
        fmap: dict[str, str] = {}
        if spec.num_layers is not None:
            path, layers = layer_list(student, None)
            if spec.num_layers >= len(layers):
                raise ConfigError(
                    f"student.num_layers={spec.num_layers} but the teacher has {len(layers)} layers in {path}"
                )
            keep, _ = choose_layers(
                student, workload, DepthPruneConfig(keep_layers=spec.num_layers), path, len(layers)
            )
            edit = {"op": "keep_layers", "module": path, "keep": keep}
            apply_edits(student, [edit])
            edits.append(edit)
            fmap = {f"{path}.{i}": f"{path}.{orig}" for i, orig in enumerate(keep)}
        if spec.width < 1.0:
            more, _ = structured_prune(
                student, workload, StructuredPruneConfig(channel_ratio=1.0 - spec.width, finetune=None)
            )
            edits += more
        if spec.init == "random":
            torch.manual_seed(config.finetune.seed)
            for m in student.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()  # type: ignore[operator]
        ft = config.finetune
        if config.teacher == "original" and any(
            e.get("op") == "keep_layers" for e in candidate.info.get("structure", [])
        ):
            fmap = {}  # layer i of the input is not layer i of the original: no hidden-state matching
        if config.feature_weight > 0 and fmap:
            ft = ft.model_copy(update={"feature_weight": config.feature_weight})
        return structural_result(
            candidate,
            workload,
            config,
            out_dir,
            pass_name=self.name,
            teacher=teacher,
            student=student,
            name="student",
            edits=edits,
            info={"student": spec.model_dump(), "teacher": config.teacher},
            finetune=ft,
            feature_map=fmap or None,
            desc="distil",
        )
