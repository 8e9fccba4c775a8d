"""ONNX Runtime CPU runtime with explicit thread settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import InferenceError
from slimship.runtime.base import Runtime
from slimship.workload.base import Batch, TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int, graph_level: str = "all", optimized_path: Path | None = None, spin: bool = True) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_level]
    if not spin:
        # idle worker threads block instead of spinning: a spinning pool steals cores from whatever runs next
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only; warnings are reported through slimship's own records
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


class OrtRuntime(Runtime):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int, graph_level: str = "all", spin: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads, graph_level, spin=spin), providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise InferenceError(f"ONNX Runtime can't load {self.path}: {err}") from err
        inputs = tuple(
            TensorSpec(
                i.name,
                _ORT_TYPES.get(i.type, "float32"),
                tuple(d if isinstance(d, int) else (d or f"{i.name}_dim{j}") for j, d in enumerate(i.shape)),
            )
            for i in self.session.get_inputs()
        )
        super().__init__(inputs, [o.name for o in self.session.get_outputs()], threads)
        self.graph_level = graph_level
        self.spin = spin

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(list(self.output_names), batch)
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            raise InferenceError(f"ONNX Runtime failed on a batch of shapes {shapes}: {err}") from err
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "graph_optimization_level": self.graph_level, "inter_op_threads": 1, "thread_spinning": self.spin}
