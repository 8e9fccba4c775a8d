"""The one predict contract every backend honours.

``runtime.predict(batch)`` takes a dict of input name -> numpy array (always batched, batch first)
and returns a dict of output name -> numpy array. Inputs are checked against the model's spec
(names, dtypes, ranks, fixed dims, consistent dynamic dims) before anything runs, so a wrong batch
gets an :class:`~slimship.errors.InputSpecError` that says what was expected, never a backend trace.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from slimship.errors import InputSpecError
from slimship.workload.base import Batch, TensorSpec


def validate_batch(batch: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> Batch:
    if not isinstance(batch, Mapping):
        raise InputSpecError(f"a batch is a dict of input name -> array, got {type(batch).__name__}")
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in batch]
    unknown = [n for n in batch if n not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise InputSpecError(f"wrong input names: {', '.join(parts)}; the model takes {expected}")
    dims: dict[str, tuple[int, str]] = {}
    out: Batch = {}
    for spec in specs:
        arr = batch[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputSpecError(f"input {spec.name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.dtype(spec.dtype):
            raise InputSpecError(
                f"input {spec.name!r} has dtype {arr.dtype}, expected {spec.dtype} "
                f"(convert with arr.astype(np.{spec.dtype}))"
            )
        if arr.ndim != len(spec.shape):
            raise InputSpecError(
                f"input {spec.name!r} has shape {list(arr.shape)} (rank {arr.ndim}); expected rank "
                f"{len(spec.shape)}: {list(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise InputSpecError(
                    f"input {spec.name!r} has shape {list(arr.shape)}; axis {axis} must be {want} "
                    f"(expected {list(spec.shape)})"
                )
            if isinstance(want, str):
                if got == 0:
                    raise InputSpecError(
                        f"input {spec.name!r} has an empty axis {axis} ({want}); shape {list(arr.shape)}"
                    )
                if want in dims and dims[want][0] != got:
                    raise InputSpecError(
                        f"dimension {want!r} disagrees: {dims[want][1]} has {dims[want][0]}, "
                        f"{spec.name!r} axis {axis} has {got}"
                    )
                dims.setdefault(want, (got, f"{spec.name!r} axis {axis}"))
        out[spec.name] = np.ascontiguousarray(arr)
    return out


class Runtime(ABC):
    """A loaded candidate that can run batches."""

    backend: str = ""

    def __init__(self, inputs: Sequence[TensorSpec], output_names: Sequence[str], threads: int) -> None:
        self.inputs = tuple(inputs)
        self.output_names = tuple(output_names)
        self.threads = threads

    def predict(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(validate_batch(batch, self.inputs))

    @abstractmethod
    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Run a validated batch."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, object]:
        return {"backend": self.backend, "threads": self.threads}
