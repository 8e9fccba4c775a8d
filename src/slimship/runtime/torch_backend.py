"""PyTorch eager runtime (CPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from slimship.errors import InferenceError
from slimship.runtime.base import Runtime
from slimship.workload.base import Batch, TensorSpec

if TYPE_CHECKING:
    import torch


class TorchRuntime(Runtime):
    """Runs a module under ``torch.inference_mode``. ``torch.set_num_threads`` is process-wide, so the
    thread count is applied before every batch (another runtime in the process may have changed it)."""

    backend = "torch"

    def __init__(
        self, model: torch.nn.Module, inputs: Sequence[TensorSpec], output_names: Sequence[str], threads: int
    ) -> None:
        super().__init__(inputs, output_names, threads)
        self.model = model.eval()

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = call_model(
                    self.model,
                    {k: torch.from_numpy(v) for k, v in batch.items()},
                    [s.name for s in self.inputs],
                )
        except Exception as err:
            raise InferenceError(
                f"the PyTorch model failed on a batch of shapes {_shapes(batch)}: {type(err).__name__}: {err}"
            ) from err
        if isinstance(out, torch.Tensor):
            tensors = [out]
        elif isinstance(out, Mapping):
            tensors = list(out.values())
        else:
            tensors = list(out)  # type: ignore[call-overload]
        if len(tensors) != len(self.output_names):
            raise InferenceError(
                f"the model returned {len(tensors)} outputs, expected {list(self.output_names)}"
            )
        return {name: t.detach().numpy() for name, t in zip(self.output_names, tensors, strict=True)}


def forward_binding(model: torch.nn.Module, names: list[str]) -> tuple[list[str], bool]:
    """How to pass inputs named ``names`` to ``model``: (order, as_keywords).

    Keywords when forward() has a parameter for every input name (in forward's order); otherwise
    positionally in the spec's order (e.g. ``nn.Sequential``, whose parameter is ``input``)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return list(names), False
    if all(n in params for n in names):
        return [p for p in params if p in names], True
    return list(names), False


def call_model(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], names: list[str]) -> object:
    order, as_kw = forward_binding(model, names)
    if as_kw:
        return model(**{n: tensors[n] for n in order})
    return model(*(tensors[n] for n in order))


def _shapes(batch: Batch) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in batch.items()}
