"""Quantization-aware fine-tuning: fake-quantize Linear/Conv layers (int8 weights per output channel,
uint8 activations per tensor), fine-tune with a straight-through estimator on the workload's training
data, and export the result as an ONNX QDQ graph that ONNX Runtime runs in int8.

Classification workloads train on their labels plus distillation from the original; workloads without
labels distil the original's outputs. Built on PyTorch's maintained fake-quant primitives
(``torch.fake_quantize_per_*_affine``, which carry the STE gradient), not on the deprecated
``torch.ao.quantization`` flow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from slimship.errors import CompressionError
from slimship.measure.verify import RECORD_ONLY, VerifyThresholds
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    import torch

    from slimship.candidate import Candidate
    from slimship.workload import Workload


class QATConfig(PassConfig):
    epochs: int = Field(
        default=1, ge=1, description="passes over the workload's training data with fake quantization, ≥ 1"
    )
    lr: float = Field(
        default=1e-4, gt=0, description="learning rate of the AdamW optimiser during QAT, > 0, e.g. 1e-4"
    )
    batch_size: int = Field(default=64, ge=1, description="training batch size, ≥ 1")
    calibration_batches: int = Field(
        default=8, ge=1, description="batches used to initialise activation ranges before training"
    )
    range_momentum: float = Field(
        default=0.9, ge=0.0, lt=1.0, description="momentum of the running activation min/max during training"
    )
    distill_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="weight of distillation from the original model's outputs (classification also uses its labels)",
    )
    opset: int = Field(default=17, ge=13, le=21, description="ONNX opset of the exported QDQ graph, 13–21")
    verify: VerifyThresholds = Field(
        default=VerifyThresholds(min_cosine=0.999, atol=float("inf"), rtol=0.0, min_top1_agreement=0.98),
        description="the exported QDQ graph must match the fake-quantized PyTorch model this closely",
    )
    seed: int = Field(
        default=0,
        description="random seed for the training data order and initialisation (same seed, same result)",
    )


def _fake_quant_modules() -> tuple[type, type]:
    import torch
    from torch import nn

    class _ActRange(nn.Module):
        """Per-tensor uint8 activation fake-quant with running min/max (no gradient through the range)."""

        lo: torch.Tensor
        hi: torch.Tensor
        initialised: torch.Tensor

        def __init__(self, momentum: float) -> None:
            super().__init__()
            self.momentum = momentum
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("initialised", torch.tensor(False))
            self.observe = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.observe and not torch.jit.is_tracing():
                with torch.no_grad():
                    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
                    if bool(self.initialised):
                        self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                        self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
                    else:
                        self.lo.copy_(lo)
                        self.hi.copy_(hi)
                        self.initialised.fill_(True)
            scale = float(max((self.hi - self.lo).item() / 255.0, 1e-8))
            zero_point = int(min(255, max(0, round(-self.lo.item() / scale))))
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)

    class QuantWrapper(nn.Module):
        """Fake-quantized input activation and per-output-channel int8 weights around a Linear or Conv."""

        frozen_scale: torch.Tensor | None

        def __init__(self, layer: nn.Module, momentum: float) -> None:
            super().__init__()
            self.layer = layer
            self.act = _ActRange(momentum)
            self.register_buffer("frozen_scale", None)

        def freeze(self) -> None:
            """Fix the weight scales, so an export sees constants it can fold into int8 initialisers."""
            self.frozen_scale = self._scale().detach().clone()

        def _scale(self) -> torch.Tensor:
            w: torch.Tensor = self.layer.weight  # type: ignore[assignment]
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-8)
            return (amax / 127.0).to(torch.float32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w: torch.Tensor = self.layer.weight  # type: ignore[assignment]
            scale = self.frozen_scale if self.frozen_scale is not None else self._scale()
            zero = torch.zeros(w.shape[0], dtype=torch.int32)
            wq = torch.fake_quantize_per_channel_affine(
                w, scale, zero, 0, -128, 127
            )  # ONNX allows (-128, 127)
            xq = self.act(x)
            if isinstance(self.layer, nn.Linear):
                return nn.functional.linear(xq, wq, self.layer.bias)
            return self.layer._conv_forward(xq, wq, self.layer.bias)  # type: ignore[operator]

    return QuantWrapper, _ActRange


def prepare_qat(model: torch.nn.Module, momentum: float) -> list[Any]:
    """Replace every Linear / Conv2d in ``model`` (in place) by its fake-quantized wrapper."""
    from torch import nn

    wrapper_cls, _ = _fake_quant_modules()
    wrappers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, nn.Conv2d)) and not isinstance(parent, wrapper_cls):
                w = wrapper_cls(child, momentum)
                setattr(parent, name, w)
                wrappers.append(w)
    return wrappers


def fold_constant_quantize(model: Any) -> int:
    """Replace QuantizeLinear(constant fp32 weight) by the int8 initialiser it produces, so the file
    stores int8 weights and only DequantizeLinear runs. Returns how many weights were folded."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    keep, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            w, scale = value(node.input[0]), value(node.input[1])
            zp = value(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
            if w is not None and scale is not None and zp is not None:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                if scale.ndim == 1 and scale.size > 1:
                    shape[axis] = scale.size
                info = np.iinfo(zp.dtype)
                q = np.clip(
                    np.round(w / scale.reshape(shape))
                    + zp.astype(np.int64).reshape(shape if zp.size > 1 else ()),
                    info.min,
                    info.max,
                )
                model.graph.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), node.output[0]))
                folded += 1
                continue
        keep.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        live = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(live)
    return folded


class QATPass(Pass[QATConfig]):
    name: ClassVar[str] = "qat"
    summary: ClassVar[str] = (
        "quantization-aware fine-tuning (fake quant + STE) exported as an ONNX QDQ int8 graph"
    )
    config_cls = QATConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "onnx"

    def run(self, candidate: Candidate, workload: Workload, config: QATConfig, out_dir: Path) -> Candidate:
        import contextlib
        import io
        import warnings

        import numpy as np
        import onnx
        import torch

        from slimship.candidate import load_torch_model, new_candidate
        from slimship.machine import default_threads
        from slimship.measure.verify import compare_outputs, verification_batches
        from slimship.passes._onnx_graph import op_histogram, set_io_names_and_dims
        from slimship.runtime.ort_backend import OrtRuntime
        from slimship.runtime.torch_backend import TorchRuntime, call_model, forward_binding

        torch.manual_seed(config.seed)
        teacher = load_torch_model(candidate, workload).eval()
        student = load_torch_model(candidate, workload)
        wrappers = prepare_qat(student, config.range_momentum)
        if not wrappers:
            raise CompressionError(
                f"nothing to quantize in {candidate.id}: QAT wraps Linear and Conv2d layers, and the model has none"
            )
        names = [s.name for s in workload.inputs]
        out_names = [o.name for o in workload.outputs]

        def first_output(out: Any) -> torch.Tensor:
            if isinstance(out, torch.Tensor):
                return out
            return next(iter(out.values())) if isinstance(out, dict) else out[0]

        t0 = time.perf_counter()
        try:
            batches = workload.train_batches(config.batch_size, seed=config.seed)
            student.eval()
            with torch.no_grad():  # initialise activation ranges on real data
                for i, (inputs, _) in enumerate(batches):
                    if i >= config.calibration_batches:
                        break
                    call_model(student, {k: torch.from_numpy(v) for k, v in inputs.items()}, names)
        except Exception as err:
            if isinstance(err, CompressionError):
                raise
            raise CompressionError(
                f"QAT could not run {workload.name}'s model on its training data: {type(err).__name__}: {err}"
            ) from err
        opt = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0
        )
        losses: list[float] = []
        student.train()
        for epoch in range(config.epochs):
            for inputs, targets in workload.train_batches(config.batch_size, seed=config.seed + epoch):
                tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
                with torch.no_grad():
                    teacher_out = first_output(call_model(teacher, tensors, names))
                out = first_output(call_model(student, tensors, names))
                loss = config.distill_weight * torch.nn.functional.mse_loss(out, teacher_out)
                if targets is not None and out.ndim == 2:
                    loss = loss + torch.nn.functional.cross_entropy(
                        out, torch.from_numpy(np.asarray(targets))
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        student.eval()
        for w in wrappers:
            w.act.observe = False
            w.freeze()
        train_seconds = time.perf_counter() - t0

        path = out_dir / "model.onnx"
        example = workload.example_inputs(2, seq_len=16)
        order, _ = forward_binding(student, names)
        dyn_axes: dict[str, dict[int, str]] = {s.name: s.dynamic_axes for s in workload.inputs}
        tmp_out = [f"slimship_output_{i}" for i in range(len(out_names))]
        dyn_axes.update({t: s.dynamic_axes for t, s in zip(tmp_out, workload.outputs, strict=True)})
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    student,
                    tuple(torch.from_numpy(example[n]) for n in order),
                    str(path),
                    input_names=order,
                    output_names=tmp_out,
                    opset_version=config.opset,
                    dynamo=False,
                    dynamic_axes=dyn_axes,
                    do_constant_folding=True,
                )
            model = onnx.load(str(path))
            folded = fold_constant_quantize(model)
            set_io_names_and_dims(model, workload.inputs, workload.outputs)
            onnx.save_model(model, str(path))
            onnx.checker.check_model(model)
        except Exception as err:
            path.unlink(missing_ok=True)
            from slimship.passes.export import exporter_failure_reason

            raise CompressionError(
                f"exporting the fake-quantized model to ONNX QDQ failed: {exporter_failure_reason(err)}"
            ) from err
        threads = default_threads()
        batches_v = verification_batches(workload, 48)
        report = compare_outputs(
            TorchRuntime(student, workload.inputs, out_names, threads),
            OrtRuntime(path, threads),
            batches_v,
            config.verify,
        )
        if not report.passed:
            path.unlink(missing_ok=True)
            raise CompressionError(
                "the exported QDQ graph disagrees with the fake-quantized PyTorch model: "
                + "; ".join(report.failures)
            )
        fidelity = compare_outputs(
            TorchRuntime(teacher, workload.inputs, out_names, threads),
            OrtRuntime(path, threads),
            batches_v,
            RECORD_ONLY,
        )
        ops = op_histogram(onnx.load(str(path)))
        info = {
            "wrapped_layers": len(wrappers),
            "weights_stored_int8": folded,
            "train_seconds": round(train_seconds, 1),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "steps": len(losses),
            "export_verification": report.to_json(),
            "fidelity_to_parent": fidelity.to_json(),
            "ops_after": ops,
            "size_ratio_vs_parent": candidate.size_bytes / path.stat().st_size,
        }
        if not ops.get("QuantizeLinear"):
            raise CompressionError(
                "the exported graph holds no QuantizeLinear nodes; the QAT export did not produce a QDQ model"
            )
        return new_candidate(
            out_dir,
            name="int8-qat",
            format="onnx",
            artifact="model.onnx",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )
