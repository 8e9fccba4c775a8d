"""Model complexity that structural passes record beside measured latency: multiply-accumulates of the
Linear and Conv layers for one batch, parameter counts, and a quick interleaved PyTorch timing.

MACs count dense Linear and Conv work only (attention score matmuls, norms and activations are left out
and are small for the models here); they are a property of the architecture, not a speed. A pass
records both so that "3.8x fewer MACs" is always shown beside the speed-up actually measured.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from slimship.workload import Workload
    from slimship.workload.base import Batch


COMPLEXITY_NOTE = (
    "MACs count Linear/Conv work; the speed-up is measured (PyTorch eager, interleaved, median). "
    "Benchmark the exported ONNX candidates with `slimship bench` for the deployment runtime."
)


@dataclass(frozen=True)
class ComplexityRecord:
    """MACs, parameters and measured PyTorch latency of a model before and after a structural pass, stored in
    candidate.json as ``complexity``."""

    batch_size: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    torch_latency_ms_before: float
    torch_latency_ms_after: float
    note: str = COMPLEXITY_NOTE

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(1, self.params_after)

    @property
    def torch_speedup(self) -> float:
        return self.torch_latency_ms_before / self.torch_latency_ms_after

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "torch_latency_ms_before": self.torch_latency_ms_before,
            "torch_latency_ms_after": self.torch_latency_ms_after,
            "torch_speedup": self.torch_speedup,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComplexityRecord:
        """Read the stored dict shape (the ratios are recomputed from the counts)."""
        return cls(
            batch_size=int(data["batch_size"]),
            macs_before=int(data["macs_before"]),
            macs_after=int(data["macs_after"]),
            params_before=int(data["params_before"]),
            params_after=int(data["params_after"]),
            torch_latency_ms_before=float(data["torch_latency_ms_before"]),
            torch_latency_ms_after=float(data["torch_latency_ms_after"]),
            note=str(data.get("note", COMPLEXITY_NOTE)),
        )


def count_macs(model: nn.Module, workload: Workload, batch: Batch) -> int:
    """Multiply-accumulates of all Linear and Conv layers for one forward pass on ``batch``."""
    import torch

    from slimship.runtime.torch_backend import call_model

    total = 0

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features
        elif isinstance(mod, torch.nn.Conv1d | torch.nn.Conv2d):
            k = int(np.prod(mod.kernel_size))
            total += out.numel() * (mod.in_channels // mod.groups) * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            call_model(
                model.eval(),
                {k: torch.from_numpy(v) for k, v in batch.items()},
                [s.name for s in workload.inputs],
            )
    finally:
        for h in handles:
            h.remove()
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero_params(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def time_interleaved(
    models: Mapping[str, nn.Module], workload: Workload, batch: Batch, threads: int, rounds: int = 15
) -> dict[str, float]:
    """Median PyTorch eager latency (ms) of each model on ``batch``, timed round-robin so noise hits all alike."""
    import torch

    from slimship.runtime.torch_backend import call_model

    names = [s.name for s in workload.inputs]
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in models}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
                call_model(m, tensors, names)  # warm-up
            keys = list(models)
            for r in range(rounds):
                for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                    t0 = time.perf_counter()
                    call_model(models[k], tensors, names)
                    times[k].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
        torch.set_num_threads(prev)
    return {k: float(np.median(v) * 1000.0) for k, v in times.items()}
