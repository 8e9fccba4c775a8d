"""INT8 and INT4 quantization of ONNX graphs, built on ONNX Runtime's quantization tooling.

* ``quantize-dynamic`` — INT8 weights, activations quantized at run time (transformers' MatMuls).
* ``quantize-static``  — INT8 QDQ with activation ranges calibrated on the workload's calibration data;
  ``calibration="auto"`` tries each method and keeps the one with the smallest output error on a
  held-out calibration slice (the comparison is recorded).
* ``quantize-int4``    — block-wise INT4 weight-only MatMuls (``MatMulNBits``).

The tooling's rough edges are handled here: symbolic shape inference that fails on transformer exports
is skipped, fused graphs get ``DefaultTensorType`` so tensors of unknown type still quantize, and the
FFN output projections (post-GELU activation outliers) can be kept in float with ``keep_float="ffn_out"``.
Quantization is lossy: the pass records fidelity against its parent on real inputs rather than failing,
unless ``min_cosine`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, cast

import numpy as np
from pydantic import Field

from slimship.errors import CompressionError, ConfigError
from slimship.measure.verify import RECORD_ONLY, VerificationReport
from slimship.passes._smoothing import GELU_OPS as _GELU_OPS
from slimship.passes._smoothing import smooth_matmuls
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload

__all__ = [
    "DynamicQuantConfig",
    "DynamicQuantPass",
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyPass",
    "StaticQuantConfig",
    "StaticQuantPass",
    "quantizable_nodes",
    "smooth_matmuls",
]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")


class _QuantCommon(PassConfig):
    op_types: tuple[str, ...] = Field(
        default=(), description="op types to quantize (empty = the tool's defaults for the pass)"
    )
    exclude_nodes: tuple[str, ...] = Field(
        default=(), description="node names kept in float (paste the list a diagnosis prints)"
    )
    exclude_patterns: tuple[str, ...] = Field(
        default=(), description="regular expressions on node names kept in float"
    )
    keep_float: Literal["none", "ffn_out", "first_layer"] = Field(
        default="none",
        description='structural mixed precision: "ffn_out" keeps MatMuls fed by a GELU in float (post-GELU outliers); '
        '"first_layer" keeps the Conv/MatMul/Gemm nodes fed by a graph input in float (a CNN\'s first conv: its '
        "quantized pixels and 3-channel weights; MobileNetV2 static INT8 on AVX2: top-1 agreement 87.7 → 89.2 % "
        "overall, 96.4 % confident either way, for 0.3 % of the MACs)",
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
        description="evaluation samples on which the quantized graph's fidelity to its parent is measured (and checked against min_cosine)",
    )


class DynamicQuantConfig(_QuantCommon):
    smooth: Literal["none", "ffn_out", "all"] = Field(
        default="none",
        description='SmoothQuant-style outlier handling: "ffn_out" migrates per-channel activation scale of the GELU outputs into the FFN output weights (X·W = (X/s)·(s·W)), so per-tensor activation scales fit; "all" smooths every group of MatMuls that share an input (QKV, FFN in, FFN out, attention out)',
    )
    # 0.7 measured best for minilm with smooth="all": cosine mean/min 0.9972/0.9921 vs 0.9866/0.9765 at 0.5
    smooth_alpha: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="migration strength: 0 = all difficulty stays in activations, 1 = all moves to the weights (0.7 measured best for minilm with smooth: all)",
    )
    smooth_samples: int = Field(
        default=64, ge=1, description="calibration samples used to measure activation ranges for smoothing"
    )
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8", description='"int8" (signed; the fast u8s8 path on VNNI/AMX CPUs) or "uint8"'
    )
    per_channel: bool = Field(
        default=True, description="one scale per output channel (keeps fidelity) or one per tensor"
    )
    reduce_range: bool = Field(
        default=False,
        description="7-bit weights for CPUs without VNNI (avoids u8s8 saturation); off on VNNI machines",
    )
    activation_scales: Literal["per-tensor", "per-row"] = Field(
        default="per-tensor",
        description='"per-tensor": ONNX Runtime\'s DynamicQuantizeLinear, one scale over the whole batch (padding '
        "included), so an answer can move slightly with its batch-mates (MiniLM on AVX2: cosine alone vs batched ≥ 0.9965, "
        'inside its fidelity floor to fp32); "per-row": one scale per row (token), answers independent of batch-mates and '
        "closer to fp32, but the extra element-wise ops cost ≈ 25–40 % at batch 32 (measured on AVX2; "
        "benchmarks/results/deployment_settings-avx2.md)",
    )


class StaticQuantConfig(_QuantCommon):
    calibration: Literal["auto", "minmax", "entropy", "percentile", "distribution"] = Field(
        default="auto",
        description='activation-range calibration; "auto" picks by output error on a held-out calibration slice',
    )
    auto_methods: tuple[str, ...] = Field(
        default=("minmax", "entropy", "percentile", "percentile@99.99"),
        description='methods "auto" compares: minmax, entropy, percentile (at `percentile`), distribution, or '
        '"percentile@P" for another percentile P from the same histogram (no extra calibration pass). The default adds '
        "percentile@99.99: MobileNetV2 on amx, 2 calibration sizes, top-1 agreement 92.5 / 89.5 % at 99.99 vs "
        "87.7 / 88.9 % at 99.999 (benchmarks/results/mobilenetv2_int8_limits-amx.md)",
    )
    percentile: float = Field(
        default=99.999, gt=90.0, le=100.0, description="percentile for the percentile method"
    )
    calibration_samples: int = Field(
        default=128,
        ge=1,
        description="calibration samples whose activations set the quantization ranges, e.g. 128",
    )
    calibration_batch_size: int = Field(
        default=16, ge=1, description="batch size used when running the calibration samples"
    )
    holdout_samples: int = Field(
        default=64, ge=1, description="samples held out (after the calibration samples) to choose the method"
    )
    activation_type: Literal["int8", "uint8"] = Field(
        default="uint8", description='activation integer type: "uint8" (the fast u8s8 path on CPUs) or "int8"'
    )
    activation_symmetric: bool = Field(
        default=False,
        description="symmetric activation ranges (zero point 0) instead of asymmetric min/max ranges",
    )
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8",
        description='weight integer type: "int8" (signed; the fast u8s8 path on VNNI/AMX CPUs) or "uint8"',
    )
    weight_symmetric: bool = Field(
        default=True, description="symmetric weight ranges (zero point 0), as the int8 kernels expect"
    )
    per_channel: bool = Field(
        default=True,
        description="one weight scale per output channel (keeps fidelity) or one per tensor; graphs below opset 13 "
        "are converted to 13 (per-channel DequantizeLinear needs it)",
    )
    bias_correction: bool = Field(
        default=False,
        description="empirical bias correction (Nagel et al. 2019): subtract the per-channel mean shift that int8 weights "
        "cause at each Conv output, measured on 32 calibration samples, layer after layer; helps depthwise CNNs "
        "(one ONNX Runtime run per Conv)",
    )
    equalize: Literal["none", "exact", "relu6_to_relu"] = Field(
        default="none",
        description="cross-layer equalization before calibration (Nagel et al. 2019): consecutive Convs rescaled so each "
        "channel's weight range is shared between them. exact: only pairs joined by ReLU or nothing (the float model is "
        "unchanged); relu6_to_relu: also pairs joined by ReLU6, whose Clips become ReLU first — this changes the float "
        "model (MobileNetV2: top-1 agreement with the original 96.1 % overall / 99.5 % confident before any "
        "quantization, measured on AVX2), so use it for per-tensor weights, where equalization matters most",
    )
    float_outputs: bool = Field(
        default=True,
        description="keep the graph's outputs (e.g. logits) in float: drop the QuantizeLinear/DequantizeLinear pair ORT "
        "puts on them (quantized logits flip near-tied top-1 answers)",
    )
    min_top1_agreement: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="fail the pass if top-1 agreement with the parent (classifier outputs) falls below this (0 = record "
        "only; a result below 0.9 is recorded with a loud FIDELITY warning either way)",
    )
    float_until_top1: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="accuracy-aware mixed precision (0 = off): while the top-1 agreement with the parent on the held-out "
        "calibration samples is below this floor (e.g. 0.95), keep float_step more nodes float, worst emulated static "
        "SQNR first, re-quantizing from the same calibration (calibration and bias correction run once), up to "
        "max_float_nodes; every step is recorded (info.mixed_precision) and a floor not reached is a warning. A float node's "
        "consumers read its float output and run float too. MobileNetV2 on AVX2 gained nothing from 4-16 float convs "
        "(benchmarks/results/mobilenetv2_mixed_precision-avx2.md)",
    )
    float_order: Literal["sqnr", "output_first"] = Field(
        default="sqnr",
        description='the order the float_until_top1 search returns nodes to float: "sqnr" = worst emulated static SQNR '
        'first (finds a few broken layers, e.g. an outlier channel); "output_first" = from the graph\'s output '
        "backwards, residual Adds included (error spread over a deep net builds up towards the logits: MobileNetV2 on "
        "avx512-vnni, the last 25 convs float: 92.5 → 94.9 % top-1 agreement at 1.43x fp32, "
        "benchmarks/results/mobilenetv2_float_tail-avx512-vnni.md)",
    )
    float_step: int = Field(
        default=2, ge=1, description="nodes returned to float per step of the float_until_top1 search, e.g. 2"
    )
    max_float_nodes: int = Field(
        default=16,
        ge=1,
        description="most nodes the float_until_top1 search keeps float (each float Conv costs speed), e.g. 16",
    )


class Int4WeightOnlyConfig(_QuantCommon):
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        default=32,
        description="weights per quantization block along the input dimension (16, 32, 64, 128, 256)",
    )
    symmetric: bool = Field(
        default=True,
        description="symmetric 4-bit blocks (no zero point) instead of asymmetric ones with a zero point per block",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=4,
        description="compute precision of MatMulNBits on CPU: 0 = default, 1 = fp32, 2 = fp16, 3 = bf16, 4 = int8",
    )
    quantize_embeddings: bool = Field(
        default=True,
        description="also store embedding tables (Gather) in 4 bits (GatherBlockQuantized); they are often most of the bytes",
    )


# ---- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tool_messages(record: list[str]) -> Iterator[None]:
    """ONNX Runtime's quantization tools log warnings and info on the root logger ("Failed to infer data
    type…", "Please consider pre-processing…"): collect them into the candidate's record instead."""

    class _Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            msg = rec.getMessage().strip().splitlines()[0][:200] if rec.getMessage().strip() else ""
            if msg and msg not in record and len(record) < 50:
                record.append(f"{rec.levelname}: {msg}")

    root = logging.getLogger()
    handler, level, handlers = _Collect(level=logging.WARNING), root.level, list(root.handlers)
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeHandler(handler)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _excluded_nodes(model: Any, cfg: _QuantCommon) -> list[str]:
    names = {n.name for n in model.graph.node}
    unknown = [n for n in cfg.exclude_nodes if n not in names]
    if unknown:
        sample = sorted(n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv"))[:5]
        raise ConfigError(
            f"exclude_nodes names nodes that aren't in the graph: {unknown[:5]}; node names look like {sample}"
        )
    excluded = set(cfg.exclude_nodes)
    for pattern in cfg.exclude_patterns:
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"exclude_patterns: {pattern!r} is not a valid regular expression ({err})"
            ) from err
        excluded.update(n.name for n in model.graph.node if rx.search(n.name))
    if cfg.keep_float == "first_layer":
        inputs = {i.name for i in model.graph.input}
        excluded.update(
            n.name
            for n in model.graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm") and n.input and n.input[0] in inputs
        )
    if cfg.keep_float == "ffn_out":
        producer = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if (
                n.op_type in ("MatMul", "Gemm")
                and n.input
                and n.input[0] in producer
                and producer[n.input[0]].op_type in _GELU_OPS
            ):
                excluded.add(n.name)
    return sorted(excluded)


def _is_fused(model: Any) -> bool:
    return any(n.domain == "com.microsoft" for n in model.graph.node)


#: ops ORT's graph optimiser creates at level "extended" that its quantizer does not know
_UNQUANTIZABLE_FUSED = {"FusedConv", "FusedGemm", "FusedMatMul"}


def _prepare(candidate: Candidate, out_dir: Path) -> tuple[Any, Path, list[str]]:
    """Pre-process the parent graph for ONNX Runtime's quantizer (ONNX shape inference) into a staging file. Symbolic shape inference is skipped: it fails on transformer exports
    ("Incomplete symbolic shape inference"). If pre-processing itself fails, the graph is staged with its
    ``value_info`` dropped (graphs saved by ORT's optimiser carry shapes the quantizer's ONNX shape
    inference rejects: "Inferred shape and existing shape differ")."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(candidate.artifact_path))
    warnings: list[str] = []
    inits = {t.name for t in model.graph.initializer}
    fused = [
        n
        for n in model.graph.node
        if n.op_type in _UNQUANTIZABLE_FUSED and any(i in inits for i in n.input[1:])
    ]
    if fused:
        kinds = sorted({n.op_type for n in fused})
        warnings.append(
            f"{len(fused)} weight node(s) were fused by graph optimisation at level 'extended' ({', '.join(kinds)}) and stay float: "
            "quantize the exported graph, or run `optimize` with level='basic' first"
        )
    staged = out_dir / ".input.onnx"
    try:
        # skip_optimization: ORT's optimiser would rename nodes (Gemm → MatMul + Add), and exclusions,
        # diagnoses and accuracy-aware reverts all address nodes by the names in the parent graph
        quant_pre_process(
            str(candidate.artifact_path),
            str(staged),
            skip_optimization=True,
            skip_onnx_shape=False,
            skip_symbolic_shape=True,
        )
        model = onnx.load(str(staged))
    except Exception as err:
        warnings.append(
            f"ONNX Runtime's quantization pre-processing failed ({type(err).__name__}); quantized the graph as is"
        )
    # stale value_info makes the quantizer's own shape inference fail after it rewrites Gemm/MatMul weights
    del model.graph.value_info[:]
    onnx.save_model(model, str(staged))
    return model, staged, warnings


def quantizable_nodes(model: Any, op_types: tuple[str, ...]) -> list[str]:
    """Nodes of the given types that have a constant (initializer) weight input."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in op_types
        and any(i in inits for i in (n.input[:1] if n.op_type == "Gather" else n.input[1:]))
    ]


@dataclass(frozen=True)
class QuantizationReport:
    """What every ONNX quantization pass records, as flat keys of candidate.json's ``info`` beside the pass's
    own (``calibration_method``, ``smoothing``, ...). :meth:`from_info` reads a stored candidate's info."""

    excluded_nodes: list[str]
    warnings: list[str]
    seconds: float
    #: op type → count in the quantized graph
    ops_after: dict[str, int]
    int8_initializers: int
    fidelity_to_parent: VerificationReport
    size_ratio_vs_parent: float
    #: nodes the quantizer was asked to quantize (dynamic and int4; the static pass doesn't count them)
    quantized_nodes: int | None = None

    def to_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.quantized_nodes is not None:
            out["quantized_nodes"] = self.quantized_nodes
        out.update(
            {
                "excluded_nodes": list(self.excluded_nodes),
                "seconds": self.seconds,
                "warnings": list(self.warnings),
                "ops_after": dict(self.ops_after),
                "int8_initializers": self.int8_initializers,
                "fidelity_to_parent": self.fidelity_to_parent.to_json(),
                "size_ratio_vs_parent": self.size_ratio_vs_parent,
            }
        )
        return out

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> QuantizationReport:
        q = info.get("quantized_nodes")
        return cls(
            excluded_nodes=list(info.get("excluded_nodes") or []),
            warnings=list(info.get("warnings") or []),
            seconds=float(info.get("seconds", 0.0)),
            ops_after=dict(info.get("ops_after") or {}),
            int8_initializers=int(info.get("int8_initializers", 0)),
            fidelity_to_parent=VerificationReport.from_json(info.get("fidelity_to_parent")),
            size_ratio_vs_parent=float(info.get("size_ratio_vs_parent", 0.0)),
            quantized_nodes=None if q is None else int(q),
        )


def _lossy_report(parent: Candidate, out: Path, workload: Workload, cfg: _QuantCommon) -> VerificationReport:
    from slimship.machine import default_threads
    from slimship.measure.verify import compare_outputs, verification_batches
    from slimship.runtime.ort_backend import OrtRuntime

    threads = default_threads()
    thresholds = RECORD_ONLY.model_copy(
        update={"min_cosine": cfg.min_cosine, "min_top1_agreement": getattr(cfg, "min_top1_agreement", 0.0)}
    )
    report = compare_outputs(
        OrtRuntime(parent.artifact_path, threads),
        OrtRuntime(out, threads),
        verification_batches(workload, cfg.verify_samples),
        thresholds,
    )
    return report


def _finish(
    pass_name: str,
    name: str,
    parent: Candidate,
    workload: Workload,
    cfg: _QuantCommon,
    out_dir: Path,
    info: dict[str, Any],
) -> Candidate:
    import onnx

    from slimship.candidate import new_candidate
    from slimship.passes._onnx_graph import op_histogram

    out = out_dir / "model.onnx"
    model = onnx.load(str(out))
    report = _lossy_report(parent, out, workload, cfg)
    record = QuantizationReport(
        excluded_nodes=list(info.get("excluded_nodes") or []),
        warnings=list(info.get("warnings") or []),
        seconds=float(info.get("seconds", 0.0)),
        ops_after=op_histogram(model),
        int8_initializers=sum(
            1
            for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        ),
        fidelity_to_parent=report,
        size_ratio_vs_parent=parent.size_bytes / out.stat().st_size,
        quantized_nodes=info.get("quantized_nodes"),
    )
    info = {**info, **record.to_info()}
    top1_floor = getattr(cfg, "min_top1_agreement", 0.0)
    if (cfg.min_cosine or top1_floor) and not report.passed:
        out.unlink(missing_ok=True)
        raise CompressionError(
            f"{pass_name}: fidelity to the parent is below min_cosine={cfg.min_cosine}"
            f"{f' or min_top1_agreement={top1_floor}' if top1_floor else ''}: "
            + "; ".join(report.failures)
            + ". Try keep_float='ffn_out', per-channel weights, bias_correction (CNNs), another calibration, "
            "or exclude the nodes a diagnosis ranks worst."
        )
    info["warnings"] = list(info["warnings"]) + _fidelity_warnings(pass_name, report)
    return new_candidate(
        out_dir,
        name=name,
        format="onnx",
        artifact="model.onnx",
        workload=workload,
        parent=parent,
        pass_name=pass_name,
        pass_config=cfg.to_json_dict(),
        info=info,
    )


#: top-1 agreement with the parent below which a quantized classifier is recorded with a loud warning
LOUD_TOP1_AGREEMENT = 0.9


def _fidelity_warnings(pass_name: str, report: VerificationReport) -> list[str]:
    """A loud warning (also logged) for a classifier whose top-1 answers moved a lot, whatever the floors."""
    out = []
    for name, entry in report.outputs.items():
        if entry.top1_agreement is not None and entry.top1_agreement < LOUD_TOP1_AGREEMENT:
            msg = (
                f"FIDELITY: {pass_name} changed the top-1 answer of '{name}' on {1 - entry.top1_agreement:.0%} of "
                f"{report.samples} samples (agreement {entry.top1_agreement:.3f} < {LOUD_TOP1_AGREEMENT}); set "
                "min_top1_agreement to make this an error, or keep sensitive nodes float"
            )
            logging.getLogger(__name__).warning(msg)
            out.append(msg)
    return out


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


# ---- dynamic ----------------------------------------------------------------------------------------


_Run = TypeVar("_Run", bound=Callable[..., "Candidate"])


def _quiet_run(run: _Run) -> _Run:
    """Decorate a pass's run(): tool chatter goes to ``info["tool_messages"]`` of the new candidate."""

    @functools.wraps(run)
    def wrapped(
        self: Pass[Any], candidate: Candidate, workload: Workload, config: PassConfig, out_dir: Path
    ) -> Candidate:
        messages: list[str] = []
        with _tool_messages(messages):
            result = run(self, candidate, workload, config, out_dir)
        if messages:
            result = result.with_info(tool_messages=messages).save()
        return result

    return cast(_Run, wrapped)


def _per_row(path: Path) -> int:
    """Rewrite the quantized file at ``path`` to per-row activation scales (see passes/rowquant.py)."""
    import onnx

    from slimship.passes.rowquant import per_row_activation_scales

    try:
        model, n = per_row_activation_scales(onnx.load(str(path)))
    except (
        CompressionError
    ):  # no MatMul activation is quantized at run time (e.g. only Gather/Conv): nothing to do
        return 0
    tmp = path.with_name(f".{path.name}.rowq")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return n


class DynamicQuantPass(Pass[DynamicQuantConfig]):
    name: ClassVar[str] = "quantize-dynamic"
    summary: ClassVar[str] = (
        "INT8 weights, activations quantized at run time (ORT quantize_dynamic), fidelity recorded"
    )
    config_cls = DynamicQuantConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"

    @_quiet_run
    def run(
        self, candidate: Candidate, workload: Workload, config: DynamicQuantConfig, out_dir: Path
    ) -> Candidate:
        import onnx
        from onnxruntime.quantization import quantize_dynamic

        model, staged, warnings = _prepare(candidate, out_dir)
        try:
            smoothing = (
                smooth_matmuls(staged, workload, config.smooth_alpha, config.smooth_samples, config.smooth)
                if config.smooth != "none"
                else []
            )
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if smoothing:
            model = onnx.load(str(staged))
        op_types = config.op_types or ("MatMul", "Gemm", "Attention", "Gather")
        targets = quantizable_nodes(model, op_types)
        excluded = _excluded_nodes(model, config)
        if not [n for n in targets if n not in excluded]:
            raise CompressionError(
                f"nothing to quantize in {candidate.id}: no {'/'.join(op_types)} node with constant weights "
                f"{'is left after exclusions' if targets else 'exists'}; op types in the graph: "
                f"{sorted({n.op_type for n in model.graph.node})}"
            )
        gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
        extra: dict[str, Any] = {"MatMulConstBOnly": True}
        if _is_fused(model):
            extra["DefaultTensorType"] = (
                onnx.TensorProto.FLOAT
            )  # fused ops lack type info the quantizer needs
        t0 = time.perf_counter()
        try:
            quantize_dynamic(
                str(staged),
                str(out_dir / "model.onnx"),
                op_types_to_quantize=list(op_types),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=_qtype(config.weight_type),
                # dynamic mode rewrites Gemm as MatMul named "<gemm>_MatMul" before it applies exclusions
                nodes_to_exclude=excluded + [f"{n}_MatMul" for n in excluded if n in gemms],
                extra_options=extra,
            )
        except Exception as err:
            raise CompressionError(
                f"ONNX Runtime's quantize_dynamic failed on {candidate.id}: {type(err).__name__}: {err}"
            ) from err
        finally:
            staged.unlink(missing_ok=True)
        per_row = _per_row(out_dir / "model.onnx") if config.activation_scales == "per-row" else None
        conv = [n for n in quantizable_nodes(model, ("Conv",)) if n not in excluded and "Conv" in op_types]
        info: dict[str, Any] = {
            "activation_scales": config.activation_scales,
            **({"per_row_rewritten": per_row} if per_row is not None else {}),
            "quantized_nodes": len([n for n in targets if n not in excluded]),
            "excluded_nodes": excluded,
            "smoothing": smoothing,
            "seconds": round(time.perf_counter() - t0, 2),
            "warnings": warnings,
        }
        if conv:
            info["warnings"].append(
                f"{len(conv)} convolution(s) dynamically quantized (ConvInteger): usually slower than float on CPU; "
                "use quantize-static for CNNs"
            )
        return _finish(self.name, "int8-dynamic", candidate, workload, config, out_dir, info)


# ---- static -----------------------------------------------------------------------------------------


class _Reader:
    """ORT CalibrationDataReader over a list of batches, checked against the model's inputs."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _calibration_batches(
    candidate: Candidate, workload: Workload, cfg: StaticQuantConfig
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    from slimship.errors import InputSpecError
    from slimship.runtime.base import validate_batch
    from slimship.runtime.ort_backend import OrtRuntime

    specs = OrtRuntime(candidate.artifact_path, 1).inputs
    specs = tuple({s.name: s for s in workload.inputs}.get(s.name, s) for s in specs)
    total = cfg.calibration_samples + cfg.holdout_samples
    batches = list(workload.calibration_batches(total, cfg.calibration_batch_size))
    calib: list[dict[str, np.ndarray]] = []
    held: list[dict[str, np.ndarray]] = []
    seen = 0
    for i, batch in enumerate(batches):
        try:
            checked = validate_batch(batch, specs)
        except InputSpecError as err:
            raise ConfigError(f"calibration batch {i} doesn't fit the model: {err}") from err
        (calib if seen < cfg.calibration_samples else held).append(checked)
        seen += next(iter(checked.values())).shape[0]
    if not calib:
        raise ConfigError(f"workload {workload.name} gave no calibration data")
    return calib, held


class StaticQuantPass(Pass[StaticQuantConfig]):
    name: ClassVar[str] = "quantize-static"
    summary: ClassVar[str] = (
        "INT8 QDQ with calibrated activation ranges (MinMax/Entropy/Percentile/Distribution, or auto); "
        "activations fused through Clip/Relu/Add, per-channel weights, optional bias correction"
    )
    config_cls = StaticQuantConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"

    @_quiet_run
    def run(
        self, candidate: Candidate, workload: Workload, config: StaticQuantConfig, out_dir: Path
    ) -> Candidate:
        from slimship.passes._static_int8 import valid_method

        unknown = [m for m in config.auto_methods if not valid_method(m, CALIBRATION_METHODS)]
        if unknown:
            raise ConfigError(
                f"unknown calibration method(s) {unknown}; choose from {list(CALIBRATION_METHODS)} or "
                '"percentile@P" with 90 < P <= 100 (e.g. percentile@99.99)'
            )
        existed = out_dir.exists() and any(out_dir.iterdir())
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(candidate, workload, config, out_dir)
        except BaseException:
            for leftover in out_dir.glob(".*.onnx*"):
                leftover.unlink(missing_ok=True)
            if not existed and out_dir.exists() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # never leave an empty output directory behind
            raise

    def _run(
        self, candidate: Candidate, workload: Workload, config: StaticQuantConfig, out_dir: Path
    ) -> Candidate:
        import onnx

        from slimship.passes._static_int8 import calibrate_ranges, correct_biases, upgrade_opset

        model, staged, warnings = _prepare(candidate, out_dir)
        try:
            op_types = config.op_types or _static_op_types()
            excluded = _excluded_nodes(model, config)
            if not [n for n in quantizable_nodes(model, op_types) if n not in excluded]:
                raise CompressionError(
                    f"nothing to quantize in {candidate.id}: no {'/'.join(op_types[:6])} node with constant weights; "
                    f"op types in the graph: {sorted({n.op_type for n in model.graph.node})}"
                )
            calib, held = _calibration_batches(candidate, workload, config)
            t0 = time.perf_counter()
            prep: dict[str, Any] = {}
            if config.per_channel:
                model, old = upgrade_opset(model)
                if old is not None:
                    prep["opset_upgraded_from"] = old
            if config.equalize != "none":
                from slimship.passes._equalize import equalize_convs

                relu6: Literal["keep", "to_relu"] = "keep" if config.equalize == "exact" else "to_relu"
                model, prep["equalization"] = equalize_convs(model, relu6)
            if config.bias_correction:
                model, prep["bias_correction"] = correct_biases(model, calib, config.per_channel)
            if prep:
                onnx.save_model(model, str(staged))
            methods: list[str] = (
                list(config.auto_methods) if config.calibration == "auto" else [str(config.calibration)]
            )
            ranges = calibrate_ranges(staged, calib, methods, op_types, out_dir, config.percentile)
            for method in methods:
                self._quantize(
                    staged, out_dir / f".{method}.onnx", ranges[method], method, config, op_types, excluded
                )
            chosen, comparison, tie = _choose_method(
                candidate.artifact_path, out_dir, methods, ranges, held or calib
            )
            if config.float_until_top1 > 0:
                search = self._float_search(
                    candidate,
                    workload,
                    config,
                    (staged, out_dir),
                    ranges[chosen],
                    chosen,
                    held or calib,
                    excluded,
                )
                prep["mixed_precision"] = search.to_info()
                excluded = sorted({*excluded, *search.float_nodes})
                if not search.met:
                    warnings.append(
                        f"float_until_top1: top-1 agreement {search.steps[-1].get('top1_agreement', 0):.3f} on the held-out "
                        f"calibration samples with {len(search.float_nodes)} node(s) float, below the floor "
                        f"{config.float_until_top1}; raise max_float_nodes or use quantization-aware training (qat)"
                    )
        finally:
            staged.unlink(missing_ok=True)
        (out_dir / f".{chosen}.onnx").replace(out_dir / "model.onnx")
        for method in methods:
            (out_dir / f".{method}.onnx").unlink(missing_ok=True)
        if tie:
            warnings.append(tie)
        info = {
            "calibration_method": chosen,
            "calibration_comparison": comparison,
            "calibration_samples": sum(next(iter(b.values())).shape[0] for b in calib),
            "holdout_samples": sum(next(iter(b.values())).shape[0] for b in held),
            "excluded_nodes": excluded,
            **prep,
            "seconds": round(time.perf_counter() - t0, 2),
            "warnings": warnings,
        }
        return _finish(self.name, "int8-static", candidate, workload, config, out_dir, info)

    def _float_search(
        self,
        candidate: Candidate,
        workload: Workload,
        config: StaticQuantConfig,
        paths: tuple[Path, Path],
        ranges: Any,
        method: str,
        held: list[dict[str, np.ndarray]],
        excluded: list[str],
    ) -> Any:
        """Run the float_until_top1 search; its chosen graph replaces ``.<method>.onnx`` in the output directory."""
        import onnx

        from slimship.passes._mixed_precision import rank_for_float, rank_from_output, search_float_nodes

        staged, out_dir = paths
        op_types = config.op_types or _static_op_types()
        model = onnx.load(str(staged))
        targets = [n for n in quantizable_nodes(model, ("Conv", "MatMul", "Gemm")) if n not in excluded]
        if config.float_order == "output_first":
            ranking = rank_from_output(model, targets, excluded, op_types)
        else:
            ranking = rank_for_float(staged, workload, targets, config.per_channel)
        search, path = search_float_nodes(
            ranking,
            excluded,
            config.float_until_top1,
            config.float_step,
            config.max_float_nodes,
            lambda ex, dst: self._quantize(staged, dst, ranges, method, config, op_types, ex),
            lambda p: _holdout_error(candidate.artifact_path, p, held),
            out_dir,
        )
        path.replace(out_dir / f".{method}.onnx")
        return search

    @staticmethod
    def _quantize(
        src: Path,
        dst: Path,
        ranges: Any,
        method: str,
        cfg: StaticQuantConfig,
        op_types: tuple[str, ...],
        excluded: list[str],
    ) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data

        from slimship.passes._static_int8 import float_graph_outputs, translate_ort_error, unquantize_outputs

        extra: dict[str, Any] = {
            "ActivationSymmetric": cfg.activation_symmetric,
            "WeightSymmetric": cfg.weight_symmetric,
        }
        cache = dst.with_name(dst.name + ".ranges.json")
        save_tensors_data(ranges, cache)
        from slimship.passes._static_int8 import method_base

        cal = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "distribution": CalibrationMethod.Distribution,
        }[method_base(method)]
        model = onnx.load(str(src))
        if _is_fused(model):
            extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(src),
                    str(dst),
                    None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types),
                    per_channel=cfg.per_channel,
                    activation_type=_qtype(cfg.activation_type),
                    weight_type=_qtype(cfg.weight_type),
                    nodes_to_exclude=excluded,
                    calibrate_method=cal,
                    extra_options=extra,
                    calibration_cache_path=str(cache),
                )
        except Exception as err:
            raise translate_ort_error(err, method, src.parent.name or str(src)) from err
        finally:
            cache.unlink(missing_ok=True)
        q = onnx.load(str(dst))
        changed = bool(cfg.float_outputs and float_graph_outputs(q))
        # an excluded node fed by a DequantizeLinear would be re-quantized by ONNX Runtime at session time
        producer = {o: n.op_type for n in q.graph.node for o in n.output}
        between = [
            n.name
            for n in q.graph.node
            if n.name in set(excluded) and n.input and producer.get(n.input[0]) == "DequantizeLinear"
        ]
        changed |= bool(between and unquantize_outputs(q, between))
        if changed:
            onnx.save_model(q, str(dst))


def _static_op_types() -> tuple[str, ...]:
    """Every op type ONNX Runtime's QDQ quantizer handles (its own default): Conv, Gemm, MatMul, and the ops
    whose QDQ pairs it folds or passes through (Clip, Relu, Add, GlobalAveragePool, MaxPool, Reshape, ...)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


def _choose_method(
    parent: Path,
    out_dir: Path,
    methods: list[str],
    ranges: Mapping[str, Any],
    held: list[dict[str, np.ndarray]],
) -> tuple[str, dict[str, Any], str]:
    """Score each method's graph on held-out calibration samples; the best top-1 agreement, then the best
    cosine min wins. Methods whose scores tie exactly are reported as a tie and the first listed wins."""
    from slimship.passes._static_int8 import ranges_differ

    if len(methods) == 1:
        return methods[0], {}, ""
    comparison: dict[str, Any] = {}
    for method in methods:
        comparison[method] = _holdout_error(parent, out_dir / f".{method}.onnx", held)
        if method != methods[0]:
            comparison[method]["range_difference_vs_" + methods[0]] = ranges_differ(
                ranges[method], ranges[methods[0]]
            )

    def key(m: str) -> tuple[float, float]:
        score = comparison[m]
        return (-score.get("top1_agreement", 0.0), -score["cosine_min"])

    ordered = sorted(methods, key=lambda m: (key(m), methods.index(m)))
    tied = [m for m in methods if key(m) == key(ordered[0])]
    tie = ""
    if len(tied) > 1:
        tie = (
            f"calibration methods {', '.join(tied)} tie on the held-out samples (same top-1 agreement and cosine min); "
            f"kept {ordered[0]}, the first listed in auto_methods"
        )
    return ordered[0], comparison, tie


def _holdout_error(parent: Path, child: Path, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    from slimship.machine import default_threads
    from slimship.measure.verify import compare_outputs
    from slimship.runtime.ort_backend import OrtRuntime

    threads = default_threads()
    report = compare_outputs(OrtRuntime(parent, threads), OrtRuntime(child, threads), batches, RECORD_ONLY)
    first = next(iter(report.outputs.values())).to_json()
    return {
        k: v
        for k, v in first.items()
        if k in ("cosine_min", "cosine_mean", "max_abs_error", "top1_agreement")
    }


# ---- int4 weight-only -----------------------------------------------------------------------------


class Int4WeightOnlyPass(Pass[Int4WeightOnlyConfig]):
    name: ClassVar[str] = "quantize-int4"
    summary: ClassVar[str] = "block-wise INT4 weight-only MatMuls (MatMulNBits); activations stay float"
    config_cls = Int4WeightOnlyConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"

    @_quiet_run
    def run(
        self, candidate: Candidate, workload: Workload, config: Int4WeightOnlyConfig, out_dir: Path
    ) -> Candidate:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        model, staged, _ = _prepare(candidate, out_dir)
        staged.unlink(missing_ok=True)
        excluded = _excluded_nodes(model, config)
        targets = [n for n in quantizable_nodes(model, ("MatMul",)) if n not in excluded]
        if not targets:
            raise CompressionError(
                f"nothing to quantize in {candidate.id}: INT4 weight-only needs MatMul nodes with constant weights"
            )
        t0 = time.perf_counter()
        op_types: tuple[str, ...] = ("MatMul", "Gather") if config.quantize_embeddings else ("MatMul",)
        axes = (("MatMul", 0), ("Gather", 1))
        try:
            algo = DefaultWeightOnlyQuantConfig(
                block_size=config.block_size,
                is_symmetric=config.symmetric,
                accuracy_level=config.accuracy_level or None,
                op_types_to_quantize=op_types,
                quant_axes=axes,
            )
            q = MatMulNBitsQuantizer(
                model,
                bits=4,
                block_size=config.block_size,
                is_symmetric=config.symmetric,
                accuracy_level=config.accuracy_level or None,
                nodes_to_exclude=excluded,
                algo_config=algo,
                op_types_to_quantize=op_types,
                quant_axes=axes,
            )
            q.process()
            onnx.save_model(q.model.model, str(out_dir / "model.onnx"))
        except Exception as err:
            raise CompressionError(
                f"ONNX Runtime's MatMulNBits quantizer failed: {type(err).__name__}: {err}"
            ) from err
        info = {
            "quantized_nodes": len(targets),
            "excluded_nodes": excluded,
            "seconds": round(time.perf_counter() - t0, 2),
            "warnings": [],
        }
        return _finish(self.name, "int4-weight-only", candidate, workload, config, out_dir, info)
