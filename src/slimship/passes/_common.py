"""Shared pieces of the PyTorch passes that change a model: layer lookup with helpful errors, the
complexity/latency record every structural pass writes, optional recovery training, and
:func:`structural_result`, the one skeleton every structural pass ends with (complexity → recover →
save → export check)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slimship.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.measure.complexity import ComplexityRecord
    from slimship.train import FinetuneConfig, FinetuneReport
    from slimship.workload import Workload


class StructuralConfig(Protocol):
    """What :func:`structural_result` reads from a structural pass's config."""

    @property
    def measure_batch_size(self) -> int | None: ...

    @property
    def verify_export(self) -> bool: ...

    def to_json_dict(self) -> dict[str, Any]: ...


def resolve_layers(model: nn.Module, paths: Iterable[str], what: str) -> list[nn.Module]:
    """Modules named by ``paths``; a name that doesn't exist is a ConfigError listing close names."""
    names = {n for n, _ in model.named_modules() if n}
    weighted = [
        n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None
    ]
    mods = []
    for p in paths:
        if p not in names:
            close = difflib.get_close_matches(p, weighted, n=4, cutoff=0.5)
            hint = (
                f"; did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else f"; layers with weights: {weighted[:6]}"
            )
            raise ConfigError(
                f"{what}: the model has no layer named {p!r}{hint} (list them with `slimship layers -w WORKLOAD`)"
            )
        mods.append(model.get_submodule(p))
    return mods


def executed_layers(model: nn.Module, workload: Workload) -> list[str]:
    """Names of Linear/Conv layers in the order a forward pass runs them."""
    import torch

    from slimship.runtime.torch_backend import call_model

    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n)))
    try:
        batch = workload.example_inputs(2, seq_len=16)
        with torch.inference_mode():
            call_model(
                model, {k: torch.from_numpy(v) for k, v in batch.items()}, [s.name for s in workload.inputs]
            )
    finally:
        for h in handles:
            h.remove()
    return order


def measure_batch_size(workload: Workload, requested: int | None) -> int:
    return requested or (256 if workload.task == "classification" else 8)


def complexity_record(
    before: nn.Module, after: nn.Module, workload: Workload, batch_size: int, threads: int, rounds: int = 15
) -> ComplexityRecord:
    """MACs, parameters and measured PyTorch latency of ``before`` and ``after``, side by side."""
    from slimship.measure.complexity import ComplexityRecord, count_macs, count_params, time_interleaved

    batch = workload.example_inputs(batch_size)
    macs_b, macs_a = count_macs(before, workload, batch), count_macs(after, workload, batch)
    ms = time_interleaved({"before": before, "after": after}, workload, batch, threads, rounds)
    return ComplexityRecord(
        batch_size=batch_size,
        macs_before=macs_b,
        macs_after=macs_a,
        params_before=count_params(before),
        params_after=count_params(after),
        torch_latency_ms_before=ms["before"],
        torch_latency_ms_after=ms["after"],
    )


def recover(
    student: nn.Module,
    teacher: nn.Module,
    workload: Workload,
    cfg: FinetuneConfig | None,
    *,
    feature_map: dict[str, str] | None = None,
    after_step: Any = None,
    desc: str,
) -> FinetuneReport | None:
    """Fine-tune ``student`` against ``teacher`` when ``cfg`` is set; the trainer's report, or None."""
    if cfg is None:
        return None
    from slimship.train import finetune

    return finetune(
        student, teacher, workload, cfg, feature_map=feature_map, after_step=after_step, desc=desc
    )


def export_check(candidate: Any, workload: Workload) -> dict[str, Any]:
    """Export a restructured PyTorch candidate to ONNX in a scratch directory and verify it against PyTorch;
    a model that no longer exports is a CompressionError now, not a surprise at deployment."""
    import shutil
    import tempfile
    from pathlib import Path

    from slimship.errors import CompressionError, ExportError
    from slimship.measure.verify import VerificationReport
    from slimship.passes.export import ExportConfig, ExportPass

    scratch = Path(tempfile.mkdtemp(prefix="slimship-export-check-"))
    try:
        onnx_c = ExportPass()(candidate, workload, ExportConfig(verify_samples=16), scratch / "onnx")
        onnx_bytes = onnx_c.size_bytes
    except ExportError as err:
        raise CompressionError(
            f"the compressed model no longer exports to ONNX or disagrees with PyTorch after export: {err}"
        ) from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ver = VerificationReport.from_json(onnx_c.info.get("verification"))
    return {
        "passed": ver.passed,
        "exporter": onnx_c.info.get("exporter"),
        "onnx_bytes": onnx_bytes,
        "cosine_min": ver.cosine_min,
        "max_abs_error": ver.max_abs_error,
    }


def with_export_check(candidate: Any, workload: Workload, enabled: bool) -> Any:
    """The candidate with its ``export_check`` recorded (when ``enabled``), saved."""
    if not enabled:
        return candidate
    return candidate.with_info(export_check=export_check(candidate, workload)).save()


def teacher_and_student(candidate: Any, workload: Workload) -> tuple[nn.Module, nn.Module]:
    """The candidate's model loaded once: the frozen teacher, and an independent copy to compress and train."""
    import copy

    from slimship.candidate import load_torch_model

    teacher = load_torch_model(candidate, workload)
    return teacher, copy.deepcopy(teacher)


def structural_result(
    candidate: Candidate,
    workload: Workload,
    config: StructuralConfig,
    out_dir: Path,
    *,
    pass_name: str,
    teacher: nn.Module,
    student: nn.Module,
    name: str,
    edits: list[dict[str, Any]],
    info: dict[str, Any],
    finetune: FinetuneConfig | None,
    feature_map: dict[str, str] | None = None,
    desc: str = "recover (distil)",
    threads: int | None = None,
) -> Candidate:
    """The end every structural pass shares, once ``student`` has been restructured: record its complexity
    against ``teacher`` (``info["complexity"]``), recover it by distillation from ``teacher`` when
    ``finetune`` is set (``info["finetune"]``), save it as a PyTorch candidate with ``edits`` appended to
    its parent's architecture edits, then export-check it when ``config.verify_export``."""
    from slimship.candidate import save_torch_candidate
    from slimship.machine import default_threads

    record = complexity_record(
        teacher,
        student,
        workload,
        measure_batch_size(workload, config.measure_batch_size),
        threads if threads is not None else default_threads(),
    )
    training = recover(student, teacher, workload, finetune, feature_map=feature_map, desc=desc)
    cand = save_torch_candidate(
        student,
        out_dir,
        name=name,
        workload=workload,
        parent=candidate,
        pass_name=pass_name,
        pass_config=config.to_json_dict(),
        edits=edits,
        info={
            **info,
            "complexity": record.to_json(),
            "finetune": training.to_json() if training is not None else None,
        },
    )
    return with_export_check(cand, workload, config.verify_export)
