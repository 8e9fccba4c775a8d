from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from slimship.candidate import original_candidate
from slimship.errors import CompressionError, ConfigError
from slimship.measure.evaluate import evaluate
from slimship.measure.preflight import preflight
from slimship.passes import DynamicQuantConfig, Int4WeightOnlyConfig, StaticQuantConfig, run_pass
from slimship.workload import resolve_workload
from slimship.workload.vision import DigitsWorkload
from tests.conftest import FIXTURES


@pytest.mark.parametrize(
    "cfg",
    [DynamicQuantConfig(), StaticQuantConfig(calibration="entropy"), Int4WeightOnlyConfig(block_size=64)],
)
def test_quant_configs_round_trip(cfg):
    assert type(cfg).parse(json.loads(json.dumps(cfg.to_json_dict()))) == cfg


def _ops(cand):
    return {n.op_type for n in onnx.load(str(cand.artifact_path)).graph.node}


def test_dynamic_int8_on_digits(digits, digits_chain, tmp_path):
    q = run_pass("quantize-dynamic", digits_chain[1], digits, {}, tmp_path / "dyn")
    assert q.info["int8_initializers"] >= 2 and "MatMulInteger" in _ops(q)
    assert q.info["fidelity_to_parent"]["outputs"]["logits"]["top1_agreement"] >= 0.95
    assert q.info["size_ratio_vs_parent"] > 1.0
    assert q.parent_id == digits_chain[1].id and q.pass_config["per_channel"] is True


def test_static_int8_on_mnist_keeps_accuracy(mnist, mnist_exported, tmp_path):
    exp = mnist_exported[1]
    q = run_pass("quantize-static", exp, mnist, {}, tmp_path / "static")
    ops = _ops(q)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    comparison = q.info["calibration_comparison"]
    assert (
        set(comparison) == {"minmax", "entropy", "percentile", "percentile@99.99"}
        and q.info["calibration_method"] in comparison
    )
    fp32 = evaluate(exp, mnist, progress=False)["quality"]["accuracy"]
    int8 = evaluate(q, mnist, progress=False)["quality"]["accuracy"]
    assert abs(fp32 - int8) <= 0.5, (fp32, int8)
    assert q.size_bytes * 3 < exp.size_bytes


def test_preflight_flags_dynamic_quantization_of_convolutions(digits_chain):
    report = preflight(digits_chain[1].artifact_path)
    codes = {w["code"] for w in report["warnings"]}
    assert "dynamic-conv" in codes
    assert report["would_quantize"]["static"]["Conv"] == 2
    from slimship.measure.preflight import format_preflight

    static_view = format_preflight(report, "static")
    assert "[small-model]" in static_view and "[dynamic-conv]" not in static_view
    no_vnni = preflight(digits_chain[2].artifact_path, isa={"avx2": True})
    codes = {w["code"] for w in no_vnni["warnings"]}
    assert {"no-int8-dot-product", "fused-before-quantize"} <= codes


class _Float64Calibration(DigitsWorkload):
    name = "digits"

    def calibration_batches(self, num_samples=128, batch_size=16):
        for batch in super().calibration_batches(num_samples, batch_size):
            yield {"pixels": batch["pixels"].astype(np.float64)}


class _WrongShapeCalibration(DigitsWorkload):
    name = "digits"

    def calibration_batches(self, num_samples=128, batch_size=16):
        yield {"pixels": np.zeros((4, 1, 28, 28), np.float32)}


@pytest.mark.parametrize(
    ("cls", "needle"),
    [(_Float64Calibration, "dtype float64, expected float32"), (_WrongShapeCalibration, "axis 2 must be 8")],
)
def test_calibration_data_that_does_not_fit(digits_chain, tmp_path, cls, needle):
    with pytest.raises(ConfigError) as info:
        run_pass("quantize-static", digits_chain[1], cls(), {"calibration": "minmax"}, tmp_path / "q")
    assert "calibration batch 0 doesn't fit the model" in str(info.value) and needle in str(info.value)
    assert not list((tmp_path / "q").glob("*.onnx")) and not list((tmp_path / "q").glob(".*.onnx"))


def test_unknown_calibration_method(digits, digits_chain, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        run_pass("quantize-static", digits_chain[1], digits, {"calibration": "magic"}, tmp_path / "q")
    with pytest.raises(ConfigError, match=r"unknown calibration method\(s\) \['kl'\]"):
        run_pass(
            "quantize-static", digits_chain[1], digits, {"auto_methods": ["minmax", "kl"]}, tmp_path / "q2"
        )
    for bad in ("percentile@80", "percentile@high", "entropy@99"):
        with pytest.raises(ConfigError, match=r"\"percentile@P\" with 90 < P <= 100"):
            run_pass("quantize-static", digits_chain[1], digits, {"auto_methods": [bad]}, tmp_path / "q3")
    assert not (tmp_path / "q3").exists()  # refused before anything was written


def test_a_model_with_nothing_to_quantize(tmp_path):
    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_nondeterministic")
    # the export of x + rand fails verification, so quantize a graph with no weights made by hand
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["output_0"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, ["batch", 6])],
    )
    (tmp_path / "relu").mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
        tmp_path / "relu" / "model.onnx",
    )
    from slimship.candidate import new_candidate

    cand = new_candidate(tmp_path / "relu", name="relu", format="onnx", artifact="model.onnx", workload=w)
    for pass_name in ("quantize-dynamic", "quantize-static", "quantize-int4"):
        with pytest.raises(CompressionError, match="nothing to quantize"):
            run_pass(pass_name, cand, w, {}, tmp_path / pass_name)


def test_exclusions_are_checked(digits, digits_chain, tmp_path):
    with pytest.raises(ConfigError, match="aren't in the graph"):
        run_pass(
            "quantize-dynamic", digits_chain[1], digits, {"exclude_nodes": ["no_such_node"]}, tmp_path / "q"
        )
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        run_pass("quantize-dynamic", digits_chain[1], digits, {"exclude_patterns": ["("]}, tmp_path / "q2")


def test_fidelity_floor_refuses_a_bad_result(digits, digits_chain, tmp_path):
    with pytest.raises(CompressionError, match="below min_cosine"):
        run_pass(
            "quantize-dynamic",
            digits_chain[1],
            digits,
            {"min_cosine": 0.9999999, "per_channel": False},
            tmp_path / "q",
        )
    assert not (tmp_path / "q" / "model.onnx").exists()


def test_minilm_int8_and_int4(minilm, minilm_chain, minilm_int8, tmp_path):
    _, _, opt = minilm_chain
    dyn = minilm_int8  # run_pass("quantize-dynamic", opt, minilm, {}): shared with the rollout test
    assert dyn.parent_id == opt.id and dyn.pass_config == DynamicQuantConfig().to_json_dict()
    assert opt.size_bytes / dyn.size_bytes >= 3.5
    ffn = run_pass("quantize-dynamic", opt, minilm, {"keep_float": "ffn_out"}, tmp_path / "ffn")
    assert len(ffn.info["excluded_nodes"]) == 6
    f_dyn = dyn.info["fidelity_to_parent"]["outputs"]["sentence_embedding"]
    f_ffn = ffn.info["fidelity_to_parent"]["outputs"]["sentence_embedding"]
    assert f_dyn["cosine_mean"] > 0.98 and f_ffn["cosine_mean"] > f_dyn["cosine_mean"]
    int4 = run_pass("quantize-int4", opt, minilm, {}, tmp_path / "int4")
    assert "MatMulNBits" in _ops(int4) and "GatherBlockQuantized" in _ops(int4)
    assert opt.size_bytes / int4.size_bytes > 5.0  # embeddings are 4-bit too
    assert int4.info["fidelity_to_parent"]["outputs"]["sentence_embedding"]["cosine_mean"] > 0.9


def test_smoothing_is_exact_in_float(minilm, minilm_chain, tmp_path):
    """X·W = (X/s)·(s·W): the smoothed fp32 graph gives the same outputs before any quantization."""
    import shutil

    from slimship.passes.quantize import smooth_matmuls
    from slimship.runtime.ort_backend import OrtRuntime

    opt = minilm_chain[2]
    staged = tmp_path / "staged.onnx"
    shutil.copyfile(opt.artifact_path, staged)
    stats = smooth_matmuls(staged, minilm, alpha=0.7, samples=16, scope="all")
    assert len(stats) == 6 * 4  # per layer: QKV, attention out, FFN in, FFN out
    assert all(s["smoothed_absmax_max_over_median"] < s["activation_absmax_max_over_median"] for s in stats)
    batch = minilm.example_inputs(4, seq_len=64)
    a = OrtRuntime(opt.artifact_path, 2).predict(batch)["sentence_embedding"]
    b = OrtRuntime(staged, 2).predict(batch)["sentence_embedding"]
    assert np.abs(a - b).max() < 1e-4


def test_smoothing_all_meets_the_fidelity_targets_on_minilm(minilm, minilm_chain, tmp_path):
    q = run_pass(
        "quantize-dynamic", minilm_chain[2], minilm, {"smooth": "all", "smooth_alpha": 0.7}, tmp_path / "q"
    )
    f = q.info["fidelity_to_parent"]["outputs"]["sentence_embedding"]
    assert f["cosine_mean"] >= 0.995 and f["cosine_min"] >= 0.99
    assert minilm_chain[2].size_bytes / q.size_bytes >= 3.5


def test_smoothing_needs_matmuls(digits, digits_chain, tmp_path):
    with pytest.raises(ConfigError, match="found no MatMul"):
        run_pass("quantize-dynamic", digits_chain[1], digits, {"smooth": "all"}, tmp_path / "q")


def test_a_failed_pass_leaves_no_staging_files(digits, digits_chain, tmp_path):
    with pytest.raises(ConfigError):
        run_pass("quantize-dynamic", digits_chain[1], digits, {"smooth": "all"}, tmp_path / "q")
    assert not list((tmp_path / "q").glob("*.onnx")) and not list((tmp_path / "q").glob(".*.onnx"))


def test_qat_exports_an_int8_qdq_graph_that_keeps_accuracy(mnist, tmp_path):
    from slimship.passes import QATConfig

    assert QATConfig.parse(json.loads(json.dumps(QATConfig().to_json_dict()))) == QATConfig()
    orig = original_candidate(mnist, tmp_path / "original")
    q = run_pass("qat", orig, mnist, {}, tmp_path / "qat")
    ops = _ops(q)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    model = onnx.load(str(q.artifact_path))
    assert (
        sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
        == q.info["weights_stored_int8"]
        == 4
    )
    assert q.info["export_verification"][
        "passed"
    ]  # ONNX Runtime's QDQ graph equals the fake-quantized PyTorch model
    assert orig.size_bytes / q.size_bytes > 3.0
    fp32 = evaluate(orig, mnist, "torch", progress=False)["quality"]["accuracy"]
    int8 = evaluate(q, mnist, progress=False)["quality"]["accuracy"]
    assert abs(fp32 - int8) <= 0.5, (fp32, int8)


def test_qat_needs_layers_to_wrap(tmp_path):
    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_nondeterministic")
    orig = original_candidate(w, tmp_path / "original")
    with pytest.raises(CompressionError, match="nothing to quantize"):
        run_pass("qat", orig, w, {}, tmp_path / "qat")
