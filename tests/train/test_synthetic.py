"""Synthetic inputs matched to BatchNorm statistics, and recovery on them with BatchNorm frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.errors import CompressionError
from slimship.train import FinetuneConfig, finetune
from slimship.train.synthetic import synthesize_bn_inputs
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def ir_workload():
    from slimship.workload import resolve_workload

    return resolve_workload(f"{FIXTURES / 'factories.py'}:build_inverted_residual")


def _bn_gap(model, x):
    """Sum over BatchNorm layers of the distances between batch and running mean and std on inputs ``x``."""
    gaps = []

    def gap(mod, i, _o):
        mean, std = i[0].mean((0, 2, 3)), i[0].std((0, 2, 3), unbiased=False)
        run_std = (mod.running_var + mod.eps).sqrt()
        gaps.append(float(torch.norm(mean - mod.running_mean) + torch.norm(std - run_std)))

    hooks = [m.register_forward_hook(gap) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return sum(gaps)


def test_synthetic_inputs_match_the_batchnorm_statistics_better_than_noise(ir_workload):
    model = ir_workload.build_model()
    x, report = synthesize_bn_inputs(
        model, (3, 32, 32), 16, steps=60, batch_size=16, lr=0.1, max_seconds=1e6
    )  # bounded by steps, not by the clock (a loaded machine would cut it short)
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert report.steps == 60 and report.stopped_by == "steps"
    assert report.bn_loss_end < 0.85 * report.bn_loss_start, report.to_json()  # 34.8 → 27.5 measured
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    assert _bn_gap(model, x) < _bn_gap(model, noise)
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it came


def test_recovery_on_synthetic_inputs_only_with_batchnorm_frozen(ir_workload):
    teacher = ir_workload.build_model()
    student = ir_workload.build_model()
    with torch.no_grad():
        student.fc.weight.mul_(0.5)  # something to recover
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    cfg = FinetuneConfig(
        epochs=2,
        lr=1e-3,
        batch_size=16,
        batchnorm="frozen",
        synthetic_samples=32,
        synthetic_use="only",
        synthetic_steps=10,
        synthetic_max_seconds=1e6,
        max_seconds=1e6,
    )
    report = finetune(student, teacher, ir_workload, cfg)
    assert report.synthetic is not None and report.synthetic["samples"] == 32
    assert report.train_batches == 2  # the synthetic inputs alone; validation stays on real data
    after = student.state_dict()
    assert all(torch.equal(stats[k], after[k]) for k in stats)  # running statistics untouched


def test_synthetic_inputs_need_batchnorm():
    with pytest.raises(CompressionError, match="no BatchNorm"):
        synthesize_bn_inputs(torch.nn.Sequential(torch.nn.Linear(4, 2)), (4,), 4, steps=1)


def test_batchnorm_recalibration_averages_the_statistics_of_the_inputs(ir_workload):
    from slimship.train.trainer import recalibrate_batchnorm

    model = ir_workload.build_model()
    x = np.random.default_rng(2).normal(2.0, 3.0, size=(32, 3, 32, 32)).astype(np.float32)
    n = recalibrate_batchnorm(model, [{"pixels": x[:16]}, {"pixels": x[16:]}], ["pixels"])
    assert n == 8 and not model.training
    with torch.no_grad():
        expected = model.stem[0](torch.from_numpy(x)).mean((0, 2, 3))
    torch.testing.assert_close(model.stem[1].running_mean, expected, rtol=1e-4, atol=1e-4)
    assert model.stem[1].momentum == 0.1  # restored
