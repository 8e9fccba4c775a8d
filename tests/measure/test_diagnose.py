from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from slimship.errors import ConfigError
from slimship.measure.diagnose import _fake_quant_weight_s8, diagnose, format_diagnosis
from slimship.measure.sqnr import fake_quant_act_u8
from slimship.passes import run_pass
from slimship.pipeline.accuracy_aware import quantize_accuracy_aware


def test_fake_quantizers_are_exact_on_the_grid():
    w = np.array([[1.27, -0.5], [0.0, 0.25]], np.float32)
    q = _fake_quant_weight_s8(w, per_channel=True)
    assert np.allclose(q[:, 0], [1.27, 0.0], atol=1e-6)  # the column's max maps to 127 exactly
    x = np.linspace(-1, 3, 256, dtype=np.float32)
    err = np.abs(fake_quant_act_u8(x) - x).max()
    assert err <= (4.0 / 255) / 2 + 1e-6


def test_diagnosis_ranks_nodes_and_suggests_exclusions(digits, digits_chain, tmp_path):
    report = diagnose(digits_chain[1], digits, {"per_channel": False}, measure_top=2, samples=64)
    sqnrs = [r["sqnr_db"] for r in report["nodes"]]
    assert (
        sqnrs == sorted(sqnrs) and len(sqnrs) == 2
    )  # the two Gemms (convolutions are not dynamic-quantized by default)
    for row in report["nodes"][:2]:
        assert 0 < row["fidelity_only_this_quantized"] <= 1.0 and "gain_from_reverting" in row
    text = format_diagnosis(report)
    assert "exclude_nodes" in text and "worst groups" in text
    assert {g["group"] for g in report["groups"]} == {"Gemm"}  # a CNN has no transformer sub-layers
    json.dumps(report)
    q = run_pass(
        "quantize-dynamic",
        digits_chain[1],
        digits,
        {"per_channel": False, **report["paste_into_config"]},
        tmp_path / "q",
    )
    assert set(q.info["excluded_nodes"]) == set(report["suggested_exclude_nodes"])


def _full_fidelity(digits, digits_chain, tmp_path):
    q = run_pass("quantize-dynamic", digits_chain[1], digits, {"per_channel": False}, tmp_path / "full")
    return q.info["fidelity_to_parent"]["outputs"]["logits"]["cosine_min"]


def test_accuracy_aware_meets_a_floor_the_full_model_misses(digits, digits_chain, tmp_path):
    full = _full_fidelity(digits, digits_chain, tmp_path)
    gemms = [n.name for n in onnx.load(str(digits_chain[1].artifact_path)).graph.node if n.op_type == "Gemm"]
    best_single_revert = max(
        run_pass(
            "quantize-dynamic",
            digits_chain[1],
            digits,
            {"per_channel": False, "exclude_nodes": [g]},
            tmp_path / f"r{i}",
        ).info["fidelity_to_parent"]["outputs"]["logits"]["cosine_min"]
        for i, g in enumerate(gemms)
    )
    assert full < best_single_revert
    floor = (full + best_single_revert) / 2
    result = quantize_accuracy_aware(
        digits_chain[1], digits, tmp_path / "aa", {"per_channel": False}, min_fidelity=floor
    )
    assert result["met_budget"] and result["reverted_nodes"]
    assert result["chosen"]["fidelity"] >= floor and result["steps"][0]["fidelity"] < floor
    assert all((tmp_path / "aa" / f"step-{s['step']:02d}" / "model.onnx").exists() for s in result["steps"])
    saved = json.loads((tmp_path / "aa" / "accuracy_aware.json").read_text())
    assert saved["reverted_nodes"] == result["reverted_nodes"]


def test_a_budget_no_configuration_can_meet(digits, digits_chain, tmp_path):
    result = quantize_accuracy_aware(
        digits_chain[1], digits, tmp_path / "aa", {"per_channel": False}, min_fidelity=1.01, max_steps=1
    )
    assert not result["met_budget"]
    assert "no configuration met the budget" in result["message"]
    assert (tmp_path / "aa" / f"step-{result['chosen']['step']:02d}" / "model.onnx").exists()


def test_a_quality_budget_uses_the_task_metric(digits, digits_chain, tmp_path):
    result = quantize_accuracy_aware(digits_chain[1], digits, tmp_path / "aa", {}, max_quality_drop=0.5)
    assert result["met_budget"] and result["chosen"]["quality_drop"] <= 0.5 and result["parent_quality"] > 90


def test_accuracy_aware_needs_a_budget(digits, digits_chain, tmp_path):
    with pytest.raises(ConfigError, match="needs a budget"):
        quantize_accuracy_aware(digits_chain[1], digits, tmp_path / "aa")


def test_transformer_nodes_get_natural_groups(minilm_chain):
    from collections import Counter

    from slimship.measure.diagnose import node_roles

    for cand in minilm_chain[1:]:  # the exported graph (GELU as Erf) and the fused one (BiasGelu)
        roles = node_roles(onnx.load(str(cand.artifact_path)))
        assert Counter(r["role"] for r in roles.values()) == {
            "qkv": 18,
            "attn_out": 6,
            "ffn_in": 6,
            "ffn_out": 6,
        }
        assert Counter(r["layer"] for r in roles.values()) == dict.fromkeys(range(6), 6)
