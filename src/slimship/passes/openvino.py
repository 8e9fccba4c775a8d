"""ONNX → OpenVINO IR (``model.xml`` + ``model.bin``), verified against its parent on real inputs.

``openvino.convert_model`` reads the ONNX candidate and ``openvino.save_model`` writes the IR; weights stay fp32
unless ``compress_to_fp16`` asks for half-size storage. The IR is then compiled on this host with the settings it
will be deployed with (explicit threads, one stream, LATENCY, the precision hint — see
:func:`slimship.runtime.settings.decide_openvino_settings`) and compared with the parent run on ONNX Runtime; the
precision the compiled model reports it uses is recorded beside the verification (``info["openvino"]``).
A graph the converter refuses is an :class:`~slimship.errors.ExportError` naming the operations it could not convert.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from slimship.errors import ExportError, VerificationError
from slimship.measure.verify import VerifyThresholds
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

__all__ = ["OpenVINOConvertConfig", "OpenVINOConvertPass", "refused_operations", "save_ir_candidate"]


class OpenVINOConvertConfig(PassConfig):
    compress_to_fp16: bool = Field(
        default=False,
        description="store the IR's weights as fp16 (half the .bin; computed in the inference precision); off: fp32 "
        "weights, numerically the parent's",
    )
    inference_precision: Literal["f32", "bf16", "f16"] = Field(
        default="f32",
        description="INFERENCE_PRECISION_HINT the candidate is deployed with; f32 stops OpenVINO running an fp32 model "
        "in bf16 on AMX hosts (bf16/f16 need looser verify thresholds)",
    )
    verify: VerifyThresholds = Field(
        default=VerifyThresholds(),
        description="thresholds the IR must meet against its ONNX parent on real inputs; the pass fails when they don't hold",
    )
    verify_samples: int = Field(
        default=48,
        ge=1,
        description="evaluation samples the IR is verified on against its parent (on top of a few fixed-shape batches), e.g. 48",
    )


_REFUSAL = re.compile(r"(?:No conversion rule found for operations|Conversion is failed for):?\s*(.+)")


def refused_operations(message: str) -> list[str]:
    """The operations an OpenVINO converter error names (``com.example.FancyOp``, ``Foo-13``, ...)."""
    ops: list[str] = []
    for line in message.splitlines():
        m = _REFUSAL.search(line)
        if m:
            ops += [o.strip() for o in m.group(1).split(",") if o.strip()]
    return ops


def convert_onnx(src: Path, out: Path, compress_to_fp16: bool) -> None:
    """Write the IR of the ONNX file ``src`` at ``out`` (.xml, with its .bin beside it)."""
    from slimship.runtime.openvino_backend import import_openvino

    ov = import_openvino()
    try:
        model = ov.convert_model(str(src))
    except Exception as err:
        ops = refused_operations(str(err))
        what = f"operations {ops}" if ops else "the graph"
        raise ExportError(
            f"OpenVINO's ONNX converter refused {what} of {src}: "
            f"{' '.join(str(err).split())[-400:]}. Replace or remove those operations (or keep this model on "
            "ONNX Runtime, which runs it)",
            attempts={"openvino": f"refused: {', '.join(ops) or 'see message'}"},
        ) from err
    _keep_onnx_names(model, src)
    ov.save_model(model, str(out), compress_to_fp16=compress_to_fp16)


def _keep_onnx_names(model: Any, src: Path) -> None:
    """Give every input/output port exactly its ONNX graph name (the converter may attach internal aliases)."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    for ports, values in ((model.inputs, graph.input), (model.outputs, graph.output)):
        names = {v.name for v in values}
        for port in ports:
            keep = names & set(port.get_names())
            if keep:
                port.get_tensor().set_names(keep)


def save_ir_candidate(
    out_dir: Path,
    *,
    name: str,
    workload: Workload,
    parent: Candidate,
    pass_name: str,
    pass_config: dict[str, Any],
    info: dict[str, Any],
) -> Candidate:
    """Record ``out_dir/model.xml`` + ``model.bin`` as an OpenVINO candidate (the .bin hashed with it)."""
    from slimship._util import sha256_file
    from slimship.candidate import new_candidate

    return new_candidate(
        out_dir,
        name=name,
        format="openvino",
        artifact="model.xml",
        workload=workload,
        parent=parent,
        pass_name=pass_name,
        pass_config=pass_config,
        info={
            **info,
            "external_data_files": ["model.bin"],
            "companion_sha256": {"model.bin": sha256_file(out_dir / "model.bin")},
        },
    )


class OpenVINOConvertPass(Pass[OpenVINOConvertConfig]):
    name: ClassVar[str] = "convert-openvino"
    summary: ClassVar[str] = (
        "ONNX → OpenVINO IR (.xml + .bin), compiled with explicit settings and verified against its parent"
    )
    config_cls = OpenVINOConvertConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "openvino"
    requires: ClassVar[tuple[str, ...]] = ("openvino",)

    def run(
        self, candidate: Candidate, workload: Workload, config: OpenVINOConvertConfig, out_dir: Path
    ) -> Candidate:
        from slimship.machine import default_threads
        from slimship.measure.verify import compare_outputs, verification_batches
        from slimship.runtime import create_runtime
        from slimship.runtime.openvino_backend import OpenVINORuntime
        from slimship.runtime.settings import decide_openvino_settings

        out = out_dir / "model.xml"
        t0 = time.perf_counter()
        convert_onnx(candidate.artifact_path, out, config.compress_to_fp16)
        seconds = round(time.perf_counter() - t0, 2)
        threads = default_threads()
        child = OpenVINORuntime(
            out,
            threads,
            settings=decide_openvino_settings(precision=config.inference_precision),
            output_names=tuple(o.name for o in workload.outputs),
        )
        parent = create_runtime(candidate, workload, threads=threads)
        report = compare_outputs(
            parent, child, verification_batches(workload, config.verify_samples), config.verify
        )
        if not report.passed:
            out.unlink(missing_ok=True)
            out.with_suffix(".bin").unlink(missing_ok=True)
            raise VerificationError(
                "the OpenVINO IR's outputs disagree with its ONNX parent's: " + "; ".join(report.failures),
                report=report.to_json(),
            )
        info = {
            "convert_seconds": seconds,
            "compress_to_fp16": config.compress_to_fp16,
            "inference_precision": config.inference_precision,
            "verification": report.to_json(),
            "openvino": {"version": _ov_version(), "executed": child.executed},
        }
        return save_ir_candidate(
            out_dir,
            name="openvino",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )


def _ov_version() -> str:
    from slimship.runtime.openvino_backend import import_openvino

    return str(import_openvino().__version__)
