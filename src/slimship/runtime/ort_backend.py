"""ONNX Runtime CPU runtime with explicit thread settings."""

from __future__ import annotations

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
            raise InferenceError(f"ONNX Runtime can't load {self.path}: {err}") from err
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
