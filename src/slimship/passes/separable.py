"""Depthwise-separable conversion: a standard k×k convolution (``Cin → Cout``, groups 1) becomes a depthwise
k×k convolution (one filter per input channel) followed by a pointwise 1×1 convolution (``Cin → Cout``) —
``k²·Cin + Cin·Cout`` multiply-accumulates per output pixel instead of ``k²·Cin·Cout`` (MobileNet's building
block, Howard et al. 2017).

Initialisation: the pair computes ``y_o = Σ_c p[o, c] · (d_c ⋆ x_c)``, i.e. it is the original conv with
``W[o, c] = p[o, c] · d_c`` — each input channel's ``Cout × k²`` slice ``M_c = W[:, c].reshape(Cout, k²)``
restricted to rank 1. The best rank-1 approximation (Eckart–Young) is ``s₁ u₁ v₁ᵀ`` from the slice's SVD:
``d_c = √s₁ · v₁`` (reshaped k×k) and ``p[:, c] = √s₁ · u₁``. It is exact when every slice has rank 1; otherwise
it keeps ``Σ_c s₁,c² / ‖W‖²`` of the kernel's energy (recorded per layer, with the relative reconstruction error
``‖W − Ŵ‖ / ‖W‖ = √(1 − energy)``), and distillation from the unconverted model through the shared trainer
recovers the rest. Stride, padding, dilation and padding mode stay on the depthwise conv; the bias moves to the
pointwise one. Quality before and after recovery and the fidelity to the input model are measured on the
workload's evaluation data and recorded; a fidelity below ``min_fidelity`` is a warning in ``info["warnings"]``.

Fewer MACs are not the same speed-up: a depthwise conv does little arithmetic per byte it moves, so the pass
records measured PyTorch latency beside the MAC counts (``info["complexity"]``); time the exported model with
``slimship bench``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field

from slimship.errors import CompressionError, ConfigError
from slimship.passes.base import Pass, StructuralPassConfig
from slimship.train import FinetuneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimship.candidate import Candidate
    from slimship.workload import Workload


class SeparableConfig(StructuralPassConfig):
    min_kernel_size: int = Field(
        default=3,
        ge=2,
        description="convert only convolutions whose smaller kernel side is at least this (3: every 3×3 and larger; 1×1 convs have nothing to separate)",
    )
    min_in_channels: int = Field(
        default=8,
        ge=1,
        description="leave convolutions with fewer input channels than this whole (a first conv on 1-3 image channels would keep only a rank-1 filter bank per channel and saves little)",
    )
    layers: list[str] = Field(
        default_factory=list,
        description='convert only convolutions whose names match one of these glob patterns; empty: every eligible Conv2d; e.g. ["features.*"]',
    )
    ignore: list[str] = Field(
        default_factory=list,
        description='glob patterns of convolution names left whole even when eligible, e.g. ["3"]',
    )
    only_if_fewer_macs: bool = Field(
        default=True,
        description="convert a conv only when depthwise + pointwise needs fewer MACs (k²·Cin + Cin·Cout < k²·Cin·Cout per output pixel)",
    )
    min_energy: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="convert a conv only when its rank-1 initialisation keeps at least this fraction of the kernel's squared norm (energy); 0 converts every eligible conv and leaves the rest to recovery",
    )
    min_fidelity: float = Field(
        default=0.95,
        ge=0.0,
        le=1.0,
        description="warn when the result's fidelity to the input model on the evaluation data (the workload's first fidelity metric: top-1 agreement for classification) is below this",
    )
    eval_limit: int | None = Field(
        default=1000,
        ge=1,
        description="evaluation samples for the quality / fidelity recorded before and after recovery; null: all",
    )
    finetune: FinetuneConfig | None = Field(
        default=FinetuneConfig(),
        description="recovery fine-tuning by distillation from the unconverted model (see FinetuneConfig); null to skip, e.g. {epochs: 3}",
    )


def rank1_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Depthwise kernel ``(Cin, 1, kh, kw)`` and pointwise kernel ``(Cout, Cin, 1, 1)`` of the best rank-1
    approximation of each input channel's ``Cout × kh·kw`` slice of ``weight`` ``(Cout, Cin, kh, kw)``, and the
    energy figures of that approximation."""
    import torch

    cout, cin, kh, kw = weight.shape
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = s[:, 0].sqrt()
    depthwise = (root[:, None] * vh[:, 0, :]).reshape(cin, 1, kh, kw)
    pointwise = (u[:, :, 0] * root[:, None]).T.reshape(cout, cin, 1, 1)
    sq = (s**2).sum(dim=1)
    total = float(sq.sum())
    kept = float((s[:, 0] ** 2).sum()) / total if total > 0 else 1.0
    per_channel = torch.where(sq > 0, s[:, 0] ** 2 / sq.clamp_min(1e-300), torch.ones_like(sq))
    figures = {
        "energy_kept": kept,
        "relative_error": float(np.sqrt(max(0.0, 1.0 - kept))),
        "energy_kept_min_channel": float(per_channel.min()),
    }
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype), figures


def eligible_convs(model: nn.Module, cfg: SeparableConfig) -> dict[str, dict[str, Any]]:
    """Every Conv2d the config selects, with why it is or isn't converted (``decision``) and its per-pixel MACs."""
    import torch

    found: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Conv2d) or not name:
            continue
        if cfg.layers and not any(fnmatch.fnmatch(name, p) for p in cfg.layers):
            continue
        kh, kw = mod.kernel_size
        cin, cout = mod.in_channels, mod.out_channels
        d: dict[str, Any] = {
            "in": cin,
            "out": cout,
            "kernel": [kh, kw],
            "macs_per_pixel_before": kh * kw * cin * cout // mod.groups,
            "macs_per_pixel_after": kh * kw * cin + cin * cout,
        }
        if mod.groups != 1:
            d["decision"] = f"kept: groups={mod.groups} (already grouped)"
        elif min(kh, kw) < cfg.min_kernel_size:
            d["decision"] = f"kept: kernel {kh}x{kw} < min_kernel_size {cfg.min_kernel_size}"
        elif cin < cfg.min_in_channels:
            d["decision"] = f"kept: {cin} input channels < min_in_channels {cfg.min_in_channels}"
        elif any(fnmatch.fnmatch(name, p) for p in cfg.ignore):
            d["decision"] = "kept: ignored"
        elif cfg.only_if_fewer_macs and d["macs_per_pixel_after"] >= d["macs_per_pixel_before"]:
            d["decision"] = "kept: separable needs no fewer MACs"
        found[name] = d
    if cfg.layers and not found:
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        raise ConfigError(f"layers {cfg.layers} match no Conv2d; the model's convolutions: {convs[:8]}")
    return found


def separate(model: nn.Module, name: str) -> dict[str, float]:
    """Replace conv ``name`` (in place) by depthwise + pointwise convs initialised from the rank-1 SVD of each
    input channel's slice; the energy figures of the initialisation."""
    import torch

    from slimship.structure import apply_edits, get_module

    conv: Any = get_module(model, name)
    depthwise, pointwise, figures = rank1_factors(conv.weight)
    bias = conv.bias.detach().clone() if conv.bias is not None else None
    apply_edits(model, [{"op": "separable", "module": name}])
    new: Any = get_module(model, name)
    with torch.no_grad():
        new.depthwise.weight.copy_(depthwise)
        new.pointwise.weight.copy_(pointwise)
        if bias is not None:
            new.pointwise.bias.copy_(bias)
    return figures


def measured_quality(
    model: nn.Module, workload: Workload, reference: dict[str, np.ndarray] | None, limit: int | None
) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """(quality, fidelity to ``reference``, outputs) of a PyTorch model on the workload's evaluation data."""
    from slimship.machine import default_threads
    from slimship.measure.evaluate import collect_outputs
    from slimship.runtime.torch_backend import TorchRuntime

    rt = TorchRuntime(model, workload.inputs, [o.name for o in workload.outputs], default_threads())
    outputs = collect_outputs(rt, workload, limit, progress=False)
    quality = workload.quality(outputs, limit)
    fidelity = workload.fidelity(outputs, reference) if reference is not None else {}
    return quality, fidelity, outputs


class SeparablePass(Pass[SeparableConfig]):
    name: ClassVar[str] = "separable"
    summary: ClassVar[str] = (
        "k×k Conv2d → depthwise k×k + pointwise 1×1, initialised by each input channel's rank-1 SVD, then distillation"
    )
    config_cls = SeparableConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "torch"

    def run(
        self, candidate: Candidate, workload: Workload, config: SeparableConfig, out_dir: Path
    ) -> Candidate:
        from slimship.passes._common import structural_result, teacher_and_student

        teacher, student = teacher_and_student(candidate, workload)
        decisions = eligible_convs(student, config)
        edits = []
        for name, d in decisions.items():
            if "decision" in d:
                continue
            conv: Any = student.get_submodule(name)
            _, _, figures = rank1_factors(conv.weight)
            d.update(figures)
            if figures["energy_kept"] < config.min_energy:
                d["decision"] = (
                    f"kept: rank-1 keeps {figures['energy_kept']:.3f} < min_energy {config.min_energy}"
                )
                continue
            separate(student, name)
            d["decision"] = "separable"
            edits.append({"op": "separable", "module": name})
        if not edits:
            raise CompressionError(
                "no convolution was converted: "
                + (
                    "; ".join(f"{n}: {d['decision']}" for n, d in list(decisions.items())[:6])
                    or "the model has no Conv2d"
                )
                + " (lower min_in_channels / min_kernel_size / min_energy, or set only_if_fewer_macs false)"
            )
        ref_quality, _, ref_outputs = measured_quality(teacher, workload, None, config.eval_limit)
        init_quality, init_fidelity, _ = measured_quality(student, workload, ref_outputs, config.eval_limit)
        result = structural_result(
            candidate,
            workload,
            config,
            out_dir,
            pass_name=self.name,
            teacher=teacher,
            student=student,
            name="separable",
            edits=edits,
            info={"layers": decisions, "converted": len(edits)},
            finetune=config.finetune,
        )
        quality, fidelity, _ = measured_quality(student, workload, ref_outputs, config.eval_limit)
        return result.with_info(
            **quality_record(config, ref_quality, init_quality, init_fidelity, quality, fidelity)
        ).save()


def quality_record(
    cfg: SeparableConfig,
    ref_quality: dict[str, float],
    init_quality: dict[str, float],
    init_fidelity: dict[str, float],
    quality: dict[str, float],
    fidelity: dict[str, float],
) -> dict[str, Any]:
    """The ``info`` entries of quality / fidelity before and after recovery, and a warning below ``min_fidelity``."""
    warnings = []
    if fidelity:
        metric, value = next(iter(fidelity.items()))
        if value < cfg.min_fidelity:
            warnings.append(
                f"after recovery the separable model's {metric} to its input model is {value:.4f} < min_fidelity "
                f"{cfg.min_fidelity} on {cfg.eval_limit or 'all'} evaluation samples: recover longer (finetune.epochs / "
                "max_seconds), convert fewer layers (ignore, min_energy), or keep the original"
            )
    return {
        "quality_eval_samples": cfg.eval_limit,
        "quality_input_model": ref_quality,
        "quality_after_init": init_quality,
        "fidelity_after_init": init_fidelity,
        "quality_after_recovery": quality,
        "fidelity_after_recovery": fidelity,
        "warnings": warnings,
    }
