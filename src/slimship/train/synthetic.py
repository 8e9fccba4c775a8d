"""Synthetic inputs matched to a network's BatchNorm statistics (ZeroQ, Cai et al. CVPR 2020; DeepInversion,
Yin et al. CVPR 2020), for recovery or calibration where real data is scarce.

Random images are optimised (Adam on the pixels, the network frozen in eval mode) so that at every
BatchNorm layer the batch mean and variance of its input match the layer's running statistics — what the
network saw in training — plus a small total-variation prior (DeepInversion's image prior) and a random
horizontal flip per step. No labels and no real images are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship.errors import CompressionError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SyntheticReport", "synthesize_bn_inputs"]


@dataclass
class SyntheticReport:
    """What a synthesis did, stored beside the recovery's report."""

    samples: int
    steps: int
    seconds: float
    bn_layers: int
    #: BatchNorm statistics loss (sum over layers of mean and std distances), first and last batch
    bn_loss_start: float
    bn_loss_end: float
    stopped_by: str
    history: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "steps": self.steps,
            "seconds": self.seconds,
            "bn_layers": self.bn_layers,
            "bn_loss_start": self.bn_loss_start,
            "bn_loss_end": self.bn_loss_end,
            "stopped_by": self.stopped_by,
        }


def synthesize_bn_inputs(
    model: nn.Module,
    shape: tuple[int, ...],
    samples: int,
    *,
    steps: int = 100,
    batch_size: int = 32,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    max_seconds: float = 300.0,
    seed: int = 0,
) -> tuple[np.ndarray, SyntheticReport]:
    """``samples`` inputs of ``shape`` (one sample, e.g. ``(3, 224, 224)``) whose BatchNorm input statistics in
    ``model`` match its running statistics. ``max_seconds`` bounds the whole synthesis: batches not reached in
    time are not made (fewer samples come back, said in the report)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    if not bns:
        raise CompressionError(
            "synthetic inputs are matched to BatchNorm statistics and this model has no BatchNorm layer; "
            "recover on the workload's own data (synthetic_samples: 0)"
        )
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []

    def hook(mod: Any, inputs: Any, _out: Any) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        losses.append(
            torch.norm(mean - mod.running_mean, 2)
            + torch.norm(var.sqrt() - (mod.running_var + mod.eps).sqrt(), 2)
        )

    handles = [m.register_forward_hook(hook) for m in bns]
    params = [p for p in model.parameters()]
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    history: list[float] = []
    t0 = time.perf_counter()
    stopped = "steps"
    total_steps = 0
    try:
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            x = torch.randn((n, *shape), generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                losses.clear()
                flip = bool(torch.rand((), generator=gen) < 0.5) and x.ndim == 4
                model(x.flip(3) if flip else x)
                bn_loss = torch.stack(losses).sum()
                loss = bn_loss + tv_weight * _total_variation(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_steps += 1
                history.append(float(bn_loss.detach()))
                if time.perf_counter() - t0 > max_seconds:
                    stopped = "time budget"
                    break
            out.append(x.detach().numpy().astype(np.float32))
            if stopped != "steps":
                break
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)
        model.train(was_training)
    data = np.concatenate(out)
    return data, SyntheticReport(
        samples=len(data),
        steps=total_steps,
        seconds=round(time.perf_counter() - t0, 1),
        bn_layers=len(bns),
        bn_loss_start=history[0],
        bn_loss_end=history[-1],
        stopped_by=stopped,
        history=history,
    )


def _total_variation(x: Any) -> Any:
    if x.ndim != 4:
        return x.new_zeros(())
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
