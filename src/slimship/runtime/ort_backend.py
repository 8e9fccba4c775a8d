"""ONNX Runtime CPU runtime with explicit thread settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import InferenceError
from slimship.runtime.base import Runtime
from slimship.runtime.settings import DeploymentSettings, decide_settings
from slimship.tensor_types import numpy_dtype_of
from slimship.workload.base import Batch, TensorSpec, dim_of


def session_options(
    threads: int,
    graph_level: str = "all",
    optimized_path: Path | None = None,
    spin: bool = True,
    model: Any = None,
) -> Any:
    """Session options for ``model`` (a path, bytes or ModelProto) on this machine, decided by
    :mod:`slimship.runtime.settings` (the precision entries included); without a model, speed settings only."""
    if model is None:
        settings = DeploymentSettings(
            intra_op_threads=threads, spinning=spin, graph_optimization_level=graph_level
        )
    else:
        settings = decide_settings(
            model, threads=threads, spinning=spin, graph_optimization_level=graph_level
        )
    return settings.session_options(optimized_path)


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_LOAD_PREFIX = re.compile(r"^Load model from \S+ failed:\s*")
#: ONNX Runtime messages that have a known cause, and the fix
_HINTS = (
    (
        re.compile(r"Unrecognized attribute: axis for operator (Deq|Q)uantizeLinear"),
        "per-channel QuantizeLinear / DequantizeLinear need opset 13 or later and this graph's opset is lower: quantize per-tensor "
        "(--per-tensor) or re-export the model at opset ≥ 13",
    ),
)


def describe_ort_error(err: BaseException, path: Path | None = None) -> str:
    """ONNX Runtime's message for a user: its status prefix and the "Load model from … failed" preamble dropped,
    a staging file (a hidden ``.name.onnx`` a pass writes on its way) named as such rather than by its file name,
    and the fix for causes known here appended."""
    text = _LOAD_PREFIX.sub("", _ORT_PREFIX.sub("", str(err).strip()))
    if path is not None and path.name.startswith("."):
        text = text.replace(str(path), "the graph being written").replace(
            path.name, "the graph being written"
        )
    for pattern, hint in _HINTS:
        if pattern.search(text):
            text += f" — {hint}"
    return text


def _shown(path: Path) -> str:
    """How a model file is named in a message: a pass's hidden staging file as the pass's output directory."""
    return f"the graph being written in {path.parent}" if path.name.startswith(".") else str(path)


class OrtRuntime(Runtime):
    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        threads: int,
        graph_level: str = "all",
        spin: bool = True,
        settings: DeploymentSettings | None = None,
    ) -> None:
        """``settings``: the candidate's deployment settings (threads and spinning given here override its
        speed settings, never its precision entries); without them they are decided from the graph here."""
        import onnxruntime as ort

        self.path = Path(path)
        if settings is None:
            settings = decide_settings(
                self.path, threads=threads, spinning=spin, graph_optimization_level=graph_level
            )
        else:
            settings = settings.with_overrides(threads=threads, spinning=spin)
        self.settings = settings
        try:
            self.session = ort.InferenceSession(
                str(self.path), settings.session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise InferenceError(
                f"ONNX Runtime can't load {_shown(self.path)}: {describe_ort_error(err, self.path)}"
            ) from err
        inputs = tuple(
            TensorSpec(
                i.name,
                numpy_dtype_of(i.type),
                tuple(dim_of(d, i.name, j) for j, d in enumerate(i.shape)),
            )
            for i in self.session.get_inputs()
        )
        super().__init__(inputs, [o.name for o in self.session.get_outputs()], threads)
        self.graph_level = settings.graph_optimization_level
        self.spin = settings.spinning

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(list(self.output_names), batch)
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            raise InferenceError(f"ONNX Runtime failed on a batch of shapes {shapes}: {err}") from err
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "graph_optimization_level": self.graph_level,
            "inter_op_threads": self.settings.inter_op_threads,
            "thread_spinning": self.spin,
            "deployment": self.settings.to_json(),
        }
