"""Deployment settings: what a runtime must be told for a candidate's numbers to hold on a given machine.

Decided in one place from the machine and the graph, recorded with the candidate (``info["deployment"]``),
and applied identically by every consumer (eval, bench, passes' verification, run, tune, the server and its
Ray replicas), so the fidelity measured offline is the fidelity served.

ONNX Runtime settings decided here:

``session.x64quantprecision``
    On x86-64 without VNNI/AMX, ORT's u8s8 int8 kernels (MatMulInteger, QLinearConv, ...) sum pairs of
    products in 16-bit intermediates, which can saturate. ``"1"`` selects kernels that don't (measured on an
    AMD EPYC Zen 3, MiniLM INT8: cosine to fp32 min 0.9886 → 0.9941, ≈ 8 % slower at batch 1). It is set only
    where the graph has int8 matmuls/convolutions *and* the host lacks VNNI/AMX: elsewhere it changes nothing.
intra/inter-op threads, spinning, graph optimisation level
    Speed settings: recorded so that a number can be reproduced; a consumer may override threads and
    spinning (an interleaved benchmark turns spinning off), never the precision-affecting entries.

A candidate recorded on one CPU class and loaded on another keeps its speed settings; the precision entries
are re-decided for the host (they are a pure function of graph and ISA) and the difference is reported.

OpenVINO settings decided here (``runtime: "openvino"``, the compile properties in ``openvino_config``):

``INFERENCE_PRECISION_HINT``
    Always explicit. On AMX (and some AVX-512 bf16) hosts OpenVINO's CPU plugin runs an fp32 model in bf16 unless
    told otherwise, which changes its numbers; slimship asks for ``f32`` unless a candidate was made for another
    precision, and the runtime records the precision the compiled model reports it actually uses.
``NUM_STREAMS`` = 1, ``PERFORMANCE_HINT`` = ``LATENCY``, ``ENABLE_CPU_PINNING`` = ``NO``
    One stream with ``intra_op_threads`` threads (``INFERENCE_NUM_THREADS``), latency-oriented; threads are not
    pinned to cores, because the cores are shared with whatever else runs (like ORT's spinning off).

ExecuTorch settings (``runtime: "executorch"``, a ``.pte`` with the XNNPACK delegate): the thread count of XNNPACK's
process-wide thread pool (``intra_op_threads``), set before every call. Nothing in them affects precision: an fp32
program computes in fp32 whatever the host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimship.errors import ConfigError
from slimship.machine import cpu_class, has_int8_dot_product

__all__ = [
    "GRAPH_LEVELS",
    "INT8_COMPUTE_OPS",
    "DeploymentSettings",
    "decide_executorch_settings",
    "decide_openvino_settings",
    "decide_settings",
    "deployed_precision",
    "settings_for_candidate",
]

GRAPH_LEVELS = ("disable", "basic", "extended", "all")

#: ONNX op types whose CPU kernels do int8 dot products (QDQ pairs around Conv/MatMul become QLinear* in ORT)
INT8_COMPUTE_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
        "QuantizeLinear",
    }
)

#: session config entries slimship knows; anything else in a recorded setting is refused with this list
KNOWN_SESSION_ENTRIES = {
    "session.x64quantprecision": "use int8 kernels without 16-bit intermediate saturation on x86-64 without VNNI",
    "session.intra_op.allow_spinning": "0: idle worker threads block instead of spinning",
}

X64_QUANT_PRECISION = "session.x64quantprecision"

#: OpenVINO compile properties slimship decides and records (``openvino_config``); threads come from intra_op_threads
KNOWN_OPENVINO_PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "precision the CPU plugin computes float parts in (f32, bf16, f16)",
    "NUM_STREAMS": "parallel inference streams (1: one request at a time uses every thread)",
    "PERFORMANCE_HINT": "LATENCY or THROUGHPUT",
    "ENABLE_CPU_PINNING": "YES/NO: pin the inference threads to cores",
}
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")
RUNTIMES = ("onnxruntime", "openvino", "executorch")


@dataclass(frozen=True)
class DeploymentSettings:
    """Runtime settings for one candidate on one machine (a JSON record in ``candidate.json``)."""

    runtime: str = "onnxruntime"
    intra_op_threads: int | None = None  # None: the machine's physical cores when loaded
    inter_op_threads: int = 1
    spinning: bool = True
    graph_optimization_level: str = "all"
    #: ONNX Runtime session config entries (``SessionOptions.add_session_config_entry``)
    session_config: Mapping[str, str] = field(default_factory=dict)
    #: why each decided entry is (or is not) set, in words
    reasons: Mapping[str, str] = field(default_factory=dict)
    #: the CPU class these settings were decided for
    cpu_class: str = ""
    int8_ops: tuple[str, ...] = ()
    #: OpenVINO compile properties (runtime "openvino" only), see KNOWN_OPENVINO_PROPERTIES
    openvino_config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"deployment runtime {self.runtime!r} is not one of {list(RUNTIMES)}")
        unknown_ov = sorted(set(self.openvino_config) - set(KNOWN_OPENVINO_PROPERTIES))
        if unknown_ov:
            raise ConfigError(
                f"unknown OpenVINO setting(s) {unknown_ov}; slimship knows {sorted(KNOWN_OPENVINO_PROPERTIES)} "
                '(e.g. {"INFERENCE_PRECISION_HINT": "f32"})'
            )
        if self.graph_optimization_level not in GRAPH_LEVELS:
            raise ConfigError(
                f"graph_optimization_level {self.graph_optimization_level!r} is not one of {list(GRAPH_LEVELS)}"
            )
        unknown = sorted(set(self.session_config) - set(KNOWN_SESSION_ENTRIES))
        if unknown:
            raise ConfigError(
                f"unknown ONNX Runtime session setting(s) {unknown}; slimship knows {sorted(KNOWN_SESSION_ENTRIES)} "
                '(e.g. {"session.x64quantprecision": "1"})'
            )
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ConfigError(
                f"intra_op_threads must be ≥ 1 (or null for the machine's cores), got {self.intra_op_threads}"
            )

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "spinning": self.spinning,
            "graph_optimization_level": self.graph_optimization_level,
            "session_config": dict(self.session_config),
            "reasons": dict(self.reasons),
            "cpu_class": self.cpu_class,
            "int8_ops": list(self.int8_ops),
            **({"openvino_config": dict(self.openvino_config)} if self.runtime == "openvino" else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeploymentSettings:
        if not isinstance(data, Mapping):
            raise ConfigError(f"deployment settings must be a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown deployment setting(s) {unknown}; expected some of {sorted(known)}")
        d = dict(data)
        if "int8_ops" in d:
            d["int8_ops"] = tuple(d["int8_ops"])
        for key in ("session_config", "reasons", "openvino_config"):
            if key in d and not isinstance(d[key], Mapping):
                raise ConfigError(f"deployment setting {key!r} must be an object of strings, got {d[key]!r}")
            if key in d:
                d[key] = {str(k): str(v) for k, v in d[key].items()}
        try:
            return cls(**d)
        except TypeError as err:
            raise ConfigError(f"invalid deployment settings {dict(data)}: {err}") from err

    def with_overrides(self, threads: int | None = None, spinning: bool | None = None) -> DeploymentSettings:
        """Speed overrides a consumer may make (threads, spinning); precision entries stay."""
        out = self
        if threads is not None:
            out = replace(out, intra_op_threads=threads)
        if spinning is not None:
            out = replace(out, spinning=spinning)
        return out

    def describe(self) -> str:
        if self.runtime == "executorch":
            return f"executorch (XNNPACK) on {self.cpu_class or 'this CPU'}: threads {self.intra_op_threads or 'all cores'}"
        if self.runtime == "openvino":
            props = ", ".join(f"{k}={v}" for k, v in self.openvino_config.items())
            return f"openvino on {self.cpu_class or 'this CPU'}: {props}; threads {self.intra_op_threads or 'all cores'}"
        entries = ", ".join(f"{k}={v}" for k, v in self.session_config.items()) or "no precision entries"
        threads = self.intra_op_threads or "all cores"
        return (
            f"{self.runtime} on {self.cpu_class or 'this CPU'}: {entries}; threads {threads}/{self.inter_op_threads}, "
            f"spinning {'on' if self.spinning else 'off'}, graph optimisation {self.graph_optimization_level}"
        )

    # ---- applying -----------------------------------------------------------------------------
    def session_options(self, optimized_path: Path | None = None) -> Any:
        """An ``onnxruntime.SessionOptions`` carrying exactly these settings."""
        if self.runtime != "onnxruntime":
            raise ConfigError(
                f"these are {self.runtime} settings; ONNX Runtime session options need onnxruntime's"
            )
        import onnxruntime as ort

        from slimship.machine import default_threads

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads or default_threads()
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization_level]
        if not self.spinning:
            # idle worker threads block instead of spinning: a spinning pool steals cores from whatever runs next
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, value)
        so.log_severity_level = 3  # errors only; warnings are reported through slimship's own records
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        return so

    def openvino_properties(self) -> dict[str, Any]:
        """The properties ``openvino.Core.compile_model`` is given: ``openvino_config`` plus the thread count."""
        if self.runtime != "openvino":
            raise ConfigError(
                f"these are {self.runtime} settings; OpenVINO compile properties need openvino's"
            )
        from slimship.machine import default_threads

        props: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.intra_op_threads or default_threads()}
        for key, value in self.openvino_config.items():
            props[key] = int(value) if key == "NUM_STREAMS" else value
        return props


def decide_openvino_settings(
    *,
    threads: int | None = None,
    precision: str = "f32",
    flags: Iterable[str] | None = None,
    arch: str | None = None,
) -> DeploymentSettings:
    """OpenVINO CPU settings for a candidate made to compute its float parts in ``precision`` (f32 unless the
    candidate asks otherwise) on this machine (or on the CPU described by ``flags``/``arch``)."""
    if precision not in OPENVINO_PRECISIONS:
        raise ConfigError(f"OpenVINO precision {precision!r} is not one of {list(OPENVINO_PRECISIONS)}")
    cls = cpu_class(None if flags is None else set(flags), arch)
    hint_reason = (
        "explicit: OpenVINO runs fp32 models in bf16 on AMX/bf16-capable CPUs unless told f32"
        if precision == "f32"
        else f"explicit: the candidate was made to compute in {precision}"
    )
    return DeploymentSettings(
        runtime="openvino",
        intra_op_threads=threads,
        spinning=False,
        cpu_class=cls,
        openvino_config={
            "INFERENCE_PRECISION_HINT": precision,
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": "NO",
        },
        reasons={
            "INFERENCE_PRECISION_HINT": hint_reason,
            "NUM_STREAMS": "one stream: a request uses every thread (latency); the server batches",
            "ENABLE_CPU_PINNING": "off: the cores are shared with other processes",
        },
    )


def decide_executorch_settings(
    *, threads: int | None = None, flags: Iterable[str] | None = None, arch: str | None = None
) -> DeploymentSettings:
    """ExecuTorch settings for a ``.pte`` on this machine (or on the CPU described by ``flags``/``arch``)."""
    return DeploymentSettings(
        runtime="executorch",
        intra_op_threads=threads,
        spinning=False,
        cpu_class=cpu_class(None if flags is None else set(flags), arch),
        reasons={
            "intra_op_threads": "XNNPACK's thread pool is process-wide: set to this count before every call",
        },
    )


def graph_int8_ops(model: Any) -> tuple[str, ...]:
    """The int8-compute op types in an ONNX model (a path, bytes or a ModelProto), sorted."""
    import onnx

    if isinstance(model, str | Path):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    return tuple(sorted(ops & INT8_COMPUTE_OPS))


def decide_settings(
    model: Any,
    *,
    threads: int | None = None,
    spinning: bool = True,
    graph_optimization_level: str = "all",
    flags: Iterable[str] | None = None,
    arch: str | None = None,
) -> DeploymentSettings:
    """Decide ONNX Runtime settings for ``model`` (path, bytes or ModelProto) on this machine (or on the CPU
    described by ``flags``/``arch``)."""
    cls = cpu_class(None if flags is None else set(flags), arch)
    int8 = graph_int8_ops(model)
    return _with_precision(
        DeploymentSettings(
            intra_op_threads=threads,
            spinning=spinning,
            graph_optimization_level=graph_optimization_level,
            cpu_class=cls,
            int8_ops=int8,
        ),
        cls,
        int8,
    )


def _with_precision(base: DeploymentSettings, cls: str, int8: tuple[str, ...]) -> DeploymentSettings:
    entries = {k: v for k, v in base.session_config.items() if k != X64_QUANT_PRECISION}
    reasons = {k: v for k, v in base.reasons.items() if k != X64_QUANT_PRECISION}
    if not int8:
        reasons[X64_QUANT_PRECISION] = "not set: the graph has no int8 matmuls or convolutions"
    elif has_int8_dot_product(cls):
        reasons[X64_QUANT_PRECISION] = (
            f"not set: {cls} has int8 dot-product instructions (no 16-bit intermediate sums)"
        )
    else:
        entries[X64_QUANT_PRECISION] = "1"
        reasons[X64_QUANT_PRECISION] = (
            f"set: {cls} has no VNNI/AMX, so ONNX Runtime's u8s8 kernels for {', '.join(int8)} would sum in 16 bits "
            "and can saturate"
        )
    return replace(base, session_config=entries, reasons=reasons, cpu_class=cls, int8_ops=int8)


def settings_for_candidate(
    info: Mapping[str, Any], model_path: Path, flags: Iterable[str] | None = None
) -> tuple[DeploymentSettings, list[str]]:
    """The settings to run a candidate with on this host: its recorded ones (``info["deployment"]``) with the
    precision entries re-decided for this host's CPU class; plus notes on what differs from the record."""
    recorded = info.get("deployment")
    cls = cpu_class(None if flags is None else set(flags))
    if recorded is None:
        if Path(model_path).suffix == ".xml":
            return decide_openvino_settings(flags=flags), []
        if Path(model_path).suffix == ".pte":
            return decide_executorch_settings(flags=flags), []
        return decide_settings(model_path, flags=flags), []
    rec = DeploymentSettings.from_json(recorded)
    if rec.runtime in ("openvino", "executorch"):
        # OpenVINO's precision hint is a property of the candidate, never of the host: it stays as recorded
        # (ExecuTorch's settings hold no precision entry at all)
        return replace(rec, cpu_class=cls), (
            [f"recorded on {rec.cpu_class}, loaded on {cls}"]
            if rec.cpu_class and rec.cpu_class != cls
            else []
        )
    int8 = rec.int8_ops if "int8_ops" in recorded else graph_int8_ops(model_path)
    here = _with_precision(rec, cls, int8)
    notes = []
    if rec.cpu_class and rec.cpu_class != cls:
        notes.append(f"recorded on {rec.cpu_class}, loaded on {cls}")
    if dict(here.session_config) != dict(rec.session_config):
        notes.append(
            f"precision entries for {cls}: {dict(here.session_config) or 'none'} (recorded: {dict(rec.session_config) or 'none'})"
        )
    return here, notes


def deployed_precision(fmt: str, artifact: Path, settings: DeploymentSettings | None = None) -> str:
    """The arithmetic a candidate's heavy ops run in on its runtime, in one word: ``int8`` (int8 matmuls or
    convolutions: ORT's integer/QDQ ops, OpenVINO FakeQuantize), ``int4`` (ORT MatMulNBits), else the float
    precision — ``fp32`` for PyTorch and ONNX graphs, an OpenVINO IR's ``INFERENCE_PRECISION_HINT`` (f32 → fp32),
    with `` (int8 dequantized)`` for an IR that holds int8 values but no FakeQuantize (what OpenVINO makes of ORT's
    dynamic INT8 ops: the matmuls run in float)."""
    if fmt == "torch":
        return "fp32"
    if fmt == "openvino":
        xml = Path(artifact).read_text(errors="replace")
        if 'type="FakeQuantize"' in xml:
            return "int8"
        ov = settings.openvino_config if settings is not None else {}
        word = {"f32": "fp32", "f16": "fp16"}.get(ov.get("INFERENCE_PRECISION_HINT", "f32"), "bf16")
        return f"{word} (int8 dequantized)" if re.search(r'element_type="[iu]8"', xml) else word
    import onnx

    model = onnx.load(str(artifact), load_external_data=False)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    if ops & INT8_COMPUTE_OPS:
        return "int8"
    if "MatMulNBits" in ops:
        return "int4"
    return "fp32"
