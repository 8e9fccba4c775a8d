"""Depthwise-separable conversion: the rank-1 initialisation, the layer choice, and the pass on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.candidate import load_torch_model, original_candidate
from slimship.errors import CompressionError, ConfigError
from slimship.passes import run_pass
from slimship.passes.separable import SeparableConfig, eligible_convs, rank1_factors, separate


def _separable_kernel(cout: int, cin: int, kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(cout, cin, generator=g)
    d = torch.randn(cin, kh, kw, generator=g)
    return torch.einsum("oc,ckl->ockl", p, d)  # W[:, c] = outer(p_c, d_c): every slice has rank 1


@pytest.mark.parametrize(
    ("kernel", "conv_kwargs"),
    [
        ((3, 3), {"padding": 1}),
        ((5, 3), {"stride": 2, "padding": (2, 1), "bias": True}),
        ((3, 3), {"dilation": 2, "padding": 2, "padding_mode": "reflect", "bias": True}),
    ],
)
def test_initialisation_is_exact_for_a_separable_kernel(kernel, conv_kwargs):
    cout, cin = 12, 6
    conv = torch.nn.Conv2d(cin, cout, kernel, **{"bias": False, **conv_kwargs})
    with torch.no_grad():
        conv.weight.copy_(_separable_kernel(cout, cin, *kernel))
    model = torch.nn.Sequential(conv)
    x = torch.randn(3, cin, 11, 13, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    figures = separate(model, "0")
    pair = model.get_submodule("0")
    assert type(pair).__name__ == "SeparableConv2d"
    assert pair.depthwise.groups == cin and pair.depthwise.weight.shape == (cin, 1, *kernel)
    assert pair.pointwise.weight.shape == (cout, cin, 1, 1)
    assert pair.depthwise.stride == conv.stride and pair.depthwise.dilation == conv.dilation
    assert (pair.pointwise.bias is not None) == (conv.bias is not None)
    assert figures["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    assert figures["relative_error"] < 1e-4
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_energy_kept_is_the_rank1_reconstruction_of_a_random_kernel():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    depthwise, pointwise, figures = rank1_factors(w)
    approx = pointwise[:, :, 0, 0, None, None] * depthwise[None, :, 0]  # Ŵ[o, c] = p[o, c] · d_c
    rel = float((w - approx).norm() / w.norm())
    assert 0 < figures["energy_kept"] < 1
    assert figures["relative_error"] == pytest.approx(rel, rel=1e-5)
    assert figures["energy_kept"] == pytest.approx(1 - rel**2, rel=1e-5)
    # the SVD's rank-1 term beats any other rank-1 choice, e.g. the channel's mean filter spread over outputs
    mean_filter = w.mean(dim=0, keepdim=True)
    scale = (w * mean_filter).sum(dim=(2, 3), keepdim=True) / (mean_filter**2).sum(dim=(2, 3), keepdim=True)
    assert float((w - scale * mean_filter).norm() / w.norm()) > rel


def test_layer_choice_follows_the_config():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),  # too few input channels
        torch.nn.Conv2d(16, 32, 3),  # converted
        torch.nn.Conv2d(32, 32, 1),  # 1x1: nothing to separate
        torch.nn.Conv2d(32, 32, 3, groups=4),  # already grouped
        torch.nn.Conv2d(32, 1, 3),  # 9·32 + 32·1 > 9·32·1: more MACs
    )
    decided = eligible_convs(model, SeparableConfig())
    assert [n for n, d in decided.items() if "decision" not in d] == ["1"]
    assert "min_in_channels" in decided["0"]["decision"] and "min_kernel_size" in decided["2"]["decision"]
    assert "groups=4" in decided["3"]["decision"] and "MACs" in decided["4"]["decision"]
    assert decided["1"]["macs_per_pixel_before"] == 9 * 16 * 32
    assert decided["1"]["macs_per_pixel_after"] == 9 * 16 + 16 * 32
    always = eligible_convs(model, SeparableConfig(only_if_fewer_macs=False, ignore=["1"]))
    assert [n for n, d in always.items() if "decision" not in d] == ["4"]
    with pytest.raises(ConfigError, match="match no Conv2d"):
        eligible_convs(model, SeparableConfig(layers=["head.*"]))


def test_nothing_to_convert_is_an_error_that_says_why(digits, tmp_path):
    orig = original_candidate(digits, tmp_path / "o")
    with pytest.raises(CompressionError, match="min_in_channels"):
        run_pass("separable", orig, digits, {"min_in_channels": 64, "finetune": None}, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # ≈ 32 s on 2 loaded cores: one export, a few seconds of recovery, three evaluations
def test_separable_mnist_fewer_macs_exports_and_recovers(mnist, tmp_path):
    orig = original_candidate(mnist, tmp_path / "o")
    cfg = {
        "measure_batch_size": 32,
        "eval_limit": 500,
        "finetune": {"epochs": 1, "max_seconds": 4, "max_batches_per_epoch": 12, "max_val_batches": 4},
    }
    c = run_pass("separable", orig, mnist, cfg, tmp_path / "sep")
    layers = c.info["layers"]
    assert "min_in_channels" in layers["0"]["decision"]  # the 1-channel first conv is kept
    assert layers["4"]["decision"] == "separable" and 0 < layers["4"]["energy_kept"] < 1
    assert c.info["structure"] == [{"op": "separable", "module": "4"}]
    cx = c.info["complexity"]
    assert cx["macs_after"] < cx["macs_before"] / 3 and cx["params_after"] < cx["params_before"]
    assert c.info["export_check"]["passed"] and c.info["export_check"]["max_abs_error"] < 1e-3
    rebuilt = load_torch_model(c, mnist).get_submodule("4")
    assert rebuilt.depthwise.groups == 32 and rebuilt.pointwise.weight.shape == (64, 32, 1, 1)
    assert c.info["finetune"]["steps"] > 0
    assert c.info["quality_after_recovery"]["accuracy"] >= 95.0
    assert c.info["fidelity_after_recovery"]["top1_agreement"] >= 0.95
    assert c.info["quality_input_model"]["accuracy"] - c.info["quality_after_recovery"]["accuracy"] < 2.0
    assert c.info["warnings"] == []
    x = torch.from_numpy(mnist.example_inputs(8)["pixels"])
    with torch.no_grad():
        assert np.isfinite(load_torch_model(c, mnist)(x).numpy()).all()


def test_a_fidelity_below_the_floor_is_a_warning(digits, tmp_path):
    orig = original_candidate(digits, tmp_path / "o")
    c = run_pass(
        "separable",
        orig,
        digits,
        {"min_fidelity": 1.0, "min_in_channels": 1, "finetune": None, "verify_export": False},
        tmp_path / "s",
    )
    assert c.info["converted"] == 2
    (warning,) = c.info["warnings"]
    assert "top1_agreement" in warning and "min_fidelity" in warning
    assert c.info["quality_after_recovery"] == c.info["quality_after_init"]  # no recovery asked for


@pytest.mark.slow  # two CLI processes (≈ 37 s on 2 loaded cores)
def test_separable_command_explains_and_converts(tmp_path):
    from tests.test_cli import slimship

    listing = slimship("passes", "separable").stdout
    assert "depthwise" in listing and "rank-1" in listing and "min_in_channels" in listing
    out = slimship(
        "separable", "-w", "digits", "--no-finetune", "--no-eval", "--no-export", "-o", str(tmp_path)
    ).stdout
    assert "rank-1 keeps" in out and "— separable" in out and "fewer" in out
    assert "accuracy on" in out and (tmp_path / "separable" / "candidate.json").is_file()
