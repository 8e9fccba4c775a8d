"""PyTorch → ONNX export with verification.

The exporter that works for the model is used: ``auto`` tries the torch.export-based (dynamo)
exporter first and falls back to the TorchScript one, recording why. Every artifact is checked
with ``onnx.checker`` and then compared with PyTorch on real inputs at several batch sizes (and
sequence lengths); a mismatch raises :class:`~slimship.errors.VerificationError` with the numbers.

Pitfalls handled here so users don't have to: output names that collide with internal value names
under dynamo (outputs are renamed after export), dynamic dims named after the workload's spec, one
self-contained file unless the weights pass 2 GB, exporter chatter captured into the candidate's
record instead of the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from slimship.errors import ExportError, SlimshipError, VerificationError
from slimship.measure.verify import VerifyThresholds
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    import torch

    from slimship.candidate import Candidate
    from slimship.measure.verify import VerificationReport
    from slimship.workload import Workload

_TWO_GB = 2 * 1024**3


class ExportConfig(PassConfig):
    """How to export a PyTorch candidate to ONNX."""

    opset: int = Field(
        default=18,
        ge=14,
        le=21,
        description="ONNX opset of the exported graph (ONNX Runtime 1.20+ runs 14–21 on CPU)",
    )
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description='"auto" tries dynamo then torchscript; or force one'
    )
    verify: VerifyThresholds = Field(
        default=VerifyThresholds(),
        description="real-input comparison with PyTorch; the export fails when it doesn't hold",
    )
    verify_samples: int = Field(
        default=48,
        ge=1,
        description="evaluation samples used for verification (on top of a few fixed-shape batches)",
    )


@contextlib.contextmanager
def _quiet_exporter(record: list[str]) -> Iterator[None]:
    """Capture the exporters' warnings and chatter into ``record`` instead of the terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            logger.setLevel(level)
            seen: set[str] = set()
            for w in caught:
                msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"
                if msg not in seen:
                    seen.add(msg)
                    record.append(msg)


def _export_once(
    exporter: str,
    model: torch.nn.Module,
    workload: Workload,
    cfg: ExportConfig,
    path: Path,
    record: list[str],
) -> dict[str, Any]:
    import torch

    example = workload.example_inputs(2, seq_len=16)
    from slimship.runtime.torch_backend import forward_binding

    names, as_kw = forward_binding(model, [s.name for s in workload.inputs])
    tensors = {n: torch.from_numpy(example[n]) for n in names}
    tmp_out = [f"slimship_output_{i}" for i in range(len(workload.outputs))]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = param_bytes > 0.9 * _TWO_GB
    with _quiet_exporter(record):
        if exporter == "dynamo":
            dyn = {
                s.name: {axis: torch.export.Dim.DYNAMIC for axis in s.dynamic_axes} or None
                for s in workload.inputs
            }
            torch.onnx.export(
                model,
                () if as_kw else tuple(tensors[n] for n in names),
                str(path),
                kwargs=tensors if as_kw else None,
                input_names=names,
                output_names=tmp_out,
                opset_version=cfg.opset,
                dynamo=True,
                external_data=external,
                dynamic_shapes={n: dyn[n] for n in names} if as_kw else tuple(dyn[n] for n in names),
                verbose=False,
            )
        else:
            dyn_axes: dict[str, dict[int, str]] = {s.name: s.dynamic_axes for s in workload.inputs}
            dyn_axes.update({t: s.dynamic_axes for t, s in zip(tmp_out, workload.outputs, strict=True)})
            torch.onnx.export(
                model,
                tuple(tensors[n] for n in names),
                str(path),
                input_names=names,
                output_names=tmp_out,
                opset_version=cfg.opset,
                dynamo=False,
                dynamic_axes=dyn_axes,
                do_constant_folding=True,
            )
    return {"external_data": external, "parameter_bytes": param_bytes}


def _finalise(path: Path, workload: Workload) -> dict[str, Any]:
    """Rename outputs/dims to the spec, save as one file (or with external data past 2 GB), check."""
    import onnx

    from slimship.passes._onnx_graph import op_histogram, set_io_names_and_dims

    model = onnx.load(str(path), load_external_data=True)
    edits = set_io_names_and_dims(model, workload.inputs, workload.outputs)
    external_files: list[str] = []
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    if model.ByteSize() > 0.9 * _TWO_GB:
        data_name = path.name + ".data"
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
        )
        external_files.append(data_name)
        onnx.checker.check_model(str(path))
    else:
        onnx.save_model(model, str(path))
        onnx.checker.check_model(model)
    return {"graph_edits": edits, "external_data_files": external_files, "ops": op_histogram(model)}


def exporter_failure_reason(err: BaseException) -> str:
    """The root cause of an exporter failure in one line (exporters wrap it in several layers)."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(root).__name__}: {text[:400]}"


class ExportPass(Pass[ExportConfig]):
    name: ClassVar[str] = "export"
    summary: ClassVar[str] = (
        "PyTorch → ONNX (dynamo, TorchScript fallback), checked and verified against PyTorch on real inputs"
    )
    config_cls = ExportConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "onnx"

    def run(self, candidate: Candidate, workload: Workload, config: ExportConfig, out_dir: Path) -> Candidate:
        from slimship.candidate import load_torch_model, new_candidate
        from slimship.measure.verify import compare_outputs, verification_batches
        from slimship.runtime.ort_backend import OrtRuntime
        from slimship.runtime.torch_backend import TorchRuntime

        model = load_torch_model(candidate, workload)
        order = ["dynamo", "torchscript"] if config.exporter == "auto" else [config.exporter]
        attempts: dict[str, str] = {}
        last_report: VerificationReport | None = None
        batches = verification_batches(workload, config.verify_samples)
        from slimship.machine import default_threads

        threads = default_threads()
        parent_rt = TorchRuntime(model, workload.inputs, [o.name for o in workload.outputs], threads)
        path = out_dir / "model.onnx"
        for exporter in order:
            record: list[str] = []
            t0 = time.perf_counter()
            try:
                meta = _export_once(exporter, model, workload, config, path, record)
                meta.update(_finalise(path, workload))
            except Exception as err:  # any exporter failure is recorded; the next exporter is tried
                attempts[exporter] = f"export failed: {exporter_failure_reason(err)}"
                continue
            seconds = time.perf_counter() - t0
            try:
                child_rt = OrtRuntime(path, threads)
                report = compare_outputs(parent_rt, child_rt, batches, config.verify)
            except SlimshipError as err:
                attempts[exporter] = f"exported but could not run on ONNX Runtime: {err}"
                continue
            if not report.passed:
                attempts[exporter] = "outputs disagree with PyTorch: " + "; ".join(report.failures)
                last_report = report
                continue
            attempts[exporter] = "ok"
            info = {
                "exporter": exporter,
                "exporter_attempts": attempts,
                "opset": config.opset,
                "export_seconds": round(seconds, 2),
                "verification": report.to_json(),
                "exporter_warnings": record,
                **meta,
            }
            return new_candidate(
                out_dir,
                name="exported",
                format="onnx",
                artifact="model.onnx",
                workload=workload,
                parent=candidate,
                pass_name=self.name,
                pass_config=config.to_json_dict(),
                info=info,
            )
        path.unlink(missing_ok=True)
        summary = "; ".join(f"{k}: {v}" for k, v in attempts.items())
        if last_report is not None:
            raise VerificationError(
                f"exported ONNX outputs disagree with PyTorch on real inputs ({summary}). "
                "Common causes: randomness or Python-side control flow in forward(), in-place ops on inputs, "
                "or ops the exporter approximates. Thresholds are in ExportConfig.verify.",
                report=last_report.to_json(),
                attempts=attempts,
            )
        raise ExportError(
            f"could not export {workload.name} to ONNX with {' or '.join(order)}: {summary}. "
            "Try exporter='torchscript' or a different opset, or make forward() free of data-dependent Python control flow.",
            attempts=attempts,
        )
