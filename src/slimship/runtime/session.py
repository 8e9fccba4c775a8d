"""Any :class:`~slimship.runtime.Runtime` seen through the small part of ONNX Runtime's ``InferenceSession`` interface
that the server, its verification at load and its drift monitor use: ``get_inputs()`` / ``get_outputs()`` (name,
ONNX Runtime type string, shape) and ``run(output_names, feeds) -> list``. Every call goes through the runtime's own
``predict`` contract, so a served OpenVINO candidate runs exactly as eval and bench run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from slimship.runtime.base import Runtime
from slimship.tensor_types import ORT_TO_NUMPY
from slimship.workload.base import TensorSpec

__all__ = ["RuntimeSession", "SessionArg"]

_NUMPY_TO_ORT = {np.dtype(v).name: k for k, v in ORT_TO_NUMPY.items()}


@dataclass(frozen=True)
class SessionArg:
    """An input or output as ONNX Runtime's ``NodeArg`` describes it (type ``tensor(float)``, dims int or name)."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


def _arg(spec: TensorSpec) -> SessionArg:
    return SessionArg(
        spec.name, _NUMPY_TO_ORT.get(np.dtype(spec.dtype).name, f"tensor({spec.dtype})"), spec.shape
    )


class RuntimeSession:
    """An ONNX Runtime-session-shaped view of ``runtime`` (see the module docstring)."""

    def __init__(self, runtime: Runtime, output_specs: Sequence[TensorSpec] | None = None) -> None:
        self.runtime = runtime
        specs = output_specs or [TensorSpec(n, "float32", ()) for n in runtime.output_names]
        self._inputs = [_arg(s) for s in runtime.inputs]
        self._outputs = [_arg(s) for s in specs]

    def get_inputs(self) -> list[SessionArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[SessionArg]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runtime.predict(feeds)
        return [out[n] for n in (output_names or self.runtime.output_names)]
