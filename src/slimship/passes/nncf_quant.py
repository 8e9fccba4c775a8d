"""NNCF post-training quantization: of an OpenVINO IR candidate → an OpenVINO INT8 IR (``quantize-nncf``), and of an
ONNX candidate → an ONNX QDQ graph that ONNX Runtime runs (``quantize-nncf-onnx``, NNCF's ONNX backend).

``nncf.quantize`` runs the workload's calibration inputs through the IR (``calibration_samples`` of them, one per
item, so ``subset_size`` counts samples), places FakeQuantize nodes and, by default, applies what NNCF's defaults
apply for the model type: for transformer workloads (``model_type: auto`` on a BERT-family workload) SmoothQuant on
MatMuls and the mixed preset; fast bias correction everywhere. The INT8 IR is compiled with the candidate's
deployment settings (the precision hint stays f32 for the parts left in float) and its fidelity to its parent is
measured on real inputs and recorded (``fidelity_to_parent``); ``min_cosine`` turns that record into a floor.

Whether the INT8 IR is *faster* depends on the CPU: without VNNI/AMX OpenVINO's int8 kernels can be slower than fp32
(measured on an AMD EPYC Zen 3, MiniLM b1: 36.8 ms vs 27.8 ms). Time it on the machine that will run it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from slimship.errors import CompressionError, ConfigError, RuntimeUnavailableError
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

__all__ = ["NNCFOnnxQuantizeConfig", "NNCFOnnxQuantizePass", "NNCFQuantizeConfig", "NNCFQuantizePass"]


class NNCFQuantizeConfig(PassConfig):
    calibration_samples: int = Field(
        default=300,
        ge=1,
        description="calibration samples NNCF collects activation statistics on (its subset_size, one sample per "
        "item), e.g. 300",
    )
    model_type: Literal["auto", "transformer", "generic"] = Field(
        default="auto",
        description="NNCF model type: transformer enables its transformer scheme (SmoothQuant, mixed preset); auto = "
        "transformer for BERT-family workloads, generic otherwise",
    )
    preset: Literal["auto", "performance", "mixed"] = Field(
        default="auto",
        description="quantization preset: performance (symmetric activations), mixed (asymmetric activations); auto = "
        "NNCF's default for the model type",
    )
    fast_bias_correction: bool = Field(
        default=True,
        description="NNCF's fast bias correction (on by default); off runs the slower full bias correction",
    )
    smooth_quant: bool = Field(
        default=True,
        description="SmoothQuant on MatMuls where NNCF's defaults apply it (transformer model type); off disables it",
    )
    ignored_names: tuple[str, ...] = Field(
        default=(), description="node names NNCF keeps in float (its IgnoredScope names)"
    )
    ignored_patterns: tuple[str, ...] = Field(
        default=(),
        description="regular expressions on node names NNCF keeps in float (IgnoredScope patterns)",
    )
    min_cosine: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="fail the pass if the per-sample cosine to the parent falls below this (0 = record only)",
    )
    verify_samples: int = Field(
        default=48,
        ge=1,
        description="evaluation samples on which the INT8 IR's fidelity to its parent is measured (and checked against min_cosine)",
    )


def _import_nncf() -> Any:
    try:
        logging.getLogger("nncf").setLevel(logging.WARNING)  # NNCF logs progress at INFO
        import nncf
    except ImportError as err:
        raise RuntimeUnavailableError(
            f"NNCF is not installed ({err}); install it with `pip install 'slimship[openvino]'`"
        ) from err
    return nncf


def _run_nncf(
    nncf: Any, model: Any, candidate: Candidate, workload: Workload, config: NNCFQuantizeConfig
) -> tuple[Any, dict[str, Any], float, list[Any]]:
    """(quantized model, the nncf.quantize arguments, seconds, calibration batches)."""
    batches = list(workload.calibration_batches(config.calibration_samples, 1))
    if not batches:
        raise ConfigError(f"workload {workload.name} gave no calibration data")
    kwargs = _quantize_kwargs(nncf, workload, config)
    t0 = time.perf_counter()
    try:
        # NNCF draws progress bars on stdout; stdout belongs to the CLI's results, so they go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(model, nncf.Dataset(batches), **kwargs)
    except Exception as err:
        raise CompressionError(
            f"NNCF could not quantize {candidate.artifact_path}: {type(err).__name__}: {err}"
        ) from err
    return quantized, kwargs, round(time.perf_counter() - t0, 2), batches


def _quantize_kwargs(nncf: Any, workload: Workload, config: NNCFQuantizeConfig) -> dict[str, Any]:
    transformer = config.model_type == "transformer" or (
        config.model_type == "auto" and workload.model_info.family == "bert"
    )
    kwargs: dict[str, Any] = {
        "subset_size": config.calibration_samples,
        "fast_bias_correction": config.fast_bias_correction,
    }
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if config.preset != "auto":
        kwargs["preset"] = {
            "performance": nncf.QuantizationPreset.PERFORMANCE,
            "mixed": nncf.QuantizationPreset.MIXED,
        }[config.preset]
    if config.ignored_names or config.ignored_patterns:
        kwargs["ignored_scope"] = nncf.IgnoredScope(
            names=list(config.ignored_names), patterns=list(config.ignored_patterns), validate=True
        )
    if not config.smooth_quant:
        kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)
        )
    return kwargs


class NNCFQuantizePass(Pass[NNCFQuantizeConfig]):
    name: ClassVar[str] = "quantize-nncf"
    summary: ClassVar[str] = (
        "NNCF post-training INT8 quantization of an OpenVINO IR with the workload's calibration data"
    )
    config_cls = NNCFQuantizeConfig
    input_format: ClassVar[str] = "openvino"
    output_format: ClassVar[str] = "openvino"
    requires: ClassVar[tuple[str, ...]] = ("openvino",)

    def run(
        self, candidate: Candidate, workload: Workload, config: NNCFQuantizeConfig, out_dir: Path
    ) -> Candidate:
        from slimship.machine import default_threads
        from slimship.measure.verify import RECORD_ONLY, compare_outputs, verification_batches
        from slimship.passes.openvino import save_ir_candidate
        from slimship.runtime import create_runtime
        from slimship.runtime.openvino_backend import OpenVINORuntime, import_openvino
        from slimship.runtime.settings import settings_for_candidate

        ov = import_openvino()
        nncf = _import_nncf()
        model = ov.Core().read_model(str(candidate.artifact_path))
        quantized, kwargs, seconds, batches = _run_nncf(nncf, model, candidate, workload, config)
        out = out_dir / "model.xml"
        ov.save_model(quantized, str(out), compress_to_fp16=False)
        threads = default_threads()
        settings, _ = settings_for_candidate(candidate.info, candidate.artifact_path)
        child = OpenVINORuntime(
            out, threads, settings=settings, output_names=tuple(o.name for o in workload.outputs)
        )
        thresholds = RECORD_ONLY.model_copy(update={"min_cosine": config.min_cosine})
        report = compare_outputs(
            create_runtime(candidate, workload, threads=threads),
            child,
            verification_batches(workload, config.verify_samples),
            thresholds,
        )
        if config.min_cosine and not report.passed:
            out.unlink(missing_ok=True)
            out.with_suffix(".bin").unlink(missing_ok=True)
            raise CompressionError(
                f"quantize-nncf: fidelity to the parent is below min_cosine={config.min_cosine}: "
                + "; ".join(report.failures)
                + ". Keep more of the model in float (ignored_names / ignored_patterns) or calibrate on more samples"
            )
        fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
        info = {
            "calibration_samples": len(batches),
            "nncf": {
                "version": str(nncf.__version__),
                "model_type": "transformer" if "model_type" in kwargs else "generic",
                "preset": config.preset,
                "fast_bias_correction": config.fast_bias_correction,
                "smooth_quant": config.smooth_quant,
            },
            "fake_quantize_nodes": fq,
            "seconds": seconds,
            "fidelity_to_parent": report.to_json(),
            "size_ratio_vs_parent": round(
                candidate.size_bytes / (out.stat().st_size + out.with_suffix(".bin").stat().st_size), 3
            ),
            "inference_precision": str(candidate.info.get("inference_precision", "f32")),
            "openvino": {"version": str(ov.__version__), "executed": child.executed},
        }
        return save_ir_candidate(
            out_dir,
            name="nncf-int8",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )


class NNCFOnnxQuantizeConfig(NNCFQuantizeConfig):
    """The same fields as ``quantize-nncf``; the result is an ONNX QDQ graph for ONNX Runtime."""


class NNCFOnnxQuantizePass(Pass[NNCFOnnxQuantizeConfig]):
    name: ClassVar[str] = "quantize-nncf-onnx"
    summary: ClassVar[str] = (
        "NNCF post-training INT8 of an ONNX graph into QDQ form (runs on ONNX Runtime), with the workload's calibration data"
    )
    config_cls = NNCFOnnxQuantizeConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"
    requires: ClassVar[tuple[str, ...]] = ("openvino",)

    def run(
        self, candidate: Candidate, workload: Workload, config: NNCFOnnxQuantizeConfig, out_dir: Path
    ) -> Candidate:
        import onnx

        from slimship.candidate import new_candidate
        from slimship.machine import default_threads
        from slimship.measure.verify import RECORD_ONLY, compare_outputs, verification_batches
        from slimship.passes._onnx_graph import op_histogram
        from slimship.runtime import create_runtime
        from slimship.runtime.ort_backend import OrtRuntime

        nncf = _import_nncf()
        model = onnx.load(str(candidate.artifact_path))
        quantized, kwargs, seconds, batches = _run_nncf(nncf, model, candidate, workload, config)
        out = out_dir / "model.onnx"
        onnx.save_model(quantized, str(out))
        threads = default_threads()
        report = compare_outputs(
            create_runtime(candidate, workload, threads=threads),
            OrtRuntime(out, threads),
            verification_batches(workload, config.verify_samples),
            RECORD_ONLY.model_copy(update={"min_cosine": config.min_cosine}),
        )
        if config.min_cosine and not report.passed:
            out.unlink(missing_ok=True)
            raise CompressionError(
                f"quantize-nncf-onnx: fidelity to the parent is below min_cosine={config.min_cosine}: "
                + "; ".join(report.failures)
                + ". Keep more of the model in float (ignored_names / ignored_patterns) or calibrate on more samples"
            )
        ops = op_histogram(quantized)
        info = {
            "calibration_samples": len(batches),
            "nncf": {
                "version": str(nncf.__version__),
                "backend": "onnx",
                "model_type": "transformer" if "model_type" in kwargs else "generic",
                "preset": config.preset,
                "fast_bias_correction": config.fast_bias_correction,
                "smooth_quant": config.smooth_quant,
            },
            "seconds": seconds,
            "ops_after": ops,
            "fidelity_to_parent": report.to_json(),
            "size_ratio_vs_parent": round(candidate.size_bytes / out.stat().st_size, 3),
        }
        return new_candidate(
            out_dir,
            name="nncf-qdq",
            format="onnx",
            artifact="model.onnx",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )
