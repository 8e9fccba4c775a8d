"""Static INT8 for CNNs: Clip folded, float logits, real histogram calibration, bias correction, errors in words;
and the mobilenetv2 workload it is measured on."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from slimship.errors import CompressionError, ConfigError
from slimship.passes import run_pass
from slimship.passes._static_int8 import (
    calibrate_ranges,
    correct_biases,
    ranges_differ,
    translate_ort_error,
)
from slimship.workload import list_workloads, resolve_workload
from slimship.workload.imagenet import CALIB_PHOTOS, EVAL_PHOTOS, KNOWN_CLASSES, image_quality


@pytest.fixture(scope="module")
def mobilenetv2():
    return resolve_workload("mobilenetv2")


@pytest.mark.slow  # cold cache: the fp32 reference on 112 crops (≈ 25 s idle, 56 s loaded)
def test_mobilenetv2_loads_and_fp32_knows_the_cat_and_the_coffee(mobilenetv2):
    assert "mobilenetv2" in {w["name"] for w in list_workloads()}
    assert not set(EVAL_PHOTOS) & set(CALIB_PHOTOS)
    model = mobilenetv2.build_model()  # strict load_state_dict: every torchvision key matched
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    n = 112  # the first two evaluation photos (chelsea, coffee): 56 crops each
    assert EVAL_PHOTOS[:2] == ("chelsea", "coffee") and set(EVAL_PHOTOS[:2]) <= set(KNOWN_CLASSES)
    ref = mobilenetv2.reference_logits(n)
    q = mobilenetv2.quality({"logits": ref}, limit=n)
    assert q["top1_agreement"] == 100.0 and q["known_class_accuracy"] >= 80.0, q
    noisy = ref + np.random.default_rng(0).normal(0, 2.0, ref.shape).astype(np.float32)
    worse = image_quality(noisy, ref, np.repeat([0, 1], 56))
    assert worse["top1_agreement"] < 100.0 and worse["top1_agreement_confident"] >= worse["top1_agreement"]
    assert next(mobilenetv2.calibration_batches(8, 8))["pixels"].shape == (8, 3, 224, 224)


def _q_ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_histogram_calibration_is_not_minmax_in_disguise(digits_chain, digits, tmp_path):
    batches = list(digits.calibration_batches(64, 16))
    ranges = calibrate_ranges(
        digits_chain[1].artifact_path,
        batches,
        ["minmax", "entropy", "percentile"],
        ["Conv", "Relu"],
        tmp_path,
        99.9,
    )
    assert ranges_differ(ranges["entropy"], ranges["minmax"]) > 0.01
    assert ranges_differ(ranges["percentile"], ranges["minmax"]) > 0.01
    assert not list(tmp_path.glob(".augmented*"))


def test_percentile_candidates_take_their_own_percentile_from_the_shared_histogram(
    digits_chain, digits, tmp_path
):
    batches = list(digits.calibration_batches(64, 16))
    args = (digits_chain[1].artifact_path, batches)
    both = calibrate_ranges(*args, ["percentile", "percentile@99.0"], ["Conv", "Relu"], tmp_path, 99.99)
    alone = calibrate_ranges(*args, ["percentile"], ["Conv", "Relu"], tmp_path, 99.0)
    assert (
        ranges_differ(both["percentile@99.0"], alone["percentile"]) == 0.0
    )  # same thresholds as percentile=99
    assert ranges_differ(both["percentile@99.0"], both["percentile"]) > 0.01  # not the 99.99 ones


@pytest.mark.slow  # three calibrations + bias correction + three held-out scorings (≈ 20 s idle)
def test_static_int8_on_digits_folds_relu_and_keeps_logits_float(digits_chain, digits, tmp_path):
    q = run_pass(
        "quantize-static",
        digits_chain[1],
        digits,
        {"calibration": "auto", "bias_correction": True, "equalize": "exact"},
        tmp_path / "q",
    )
    model = onnx.load(str(q.artifact_path))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producer[model.graph.output[0].name] != "DequantizeLinear"  # logits stay float
    assert _q_ops(q.artifact_path)["Relu"] == 0  # folded into the conv outputs' ranges
    assert q.info["bias_correction"]["corrected_convs"] == 2
    assert q.info["equalization"]["equalized_pairs"] == 1  # conv → ReLU → conv, exactly
    assert q.info["fidelity_to_parent"]["outputs"]["logits"]["top1_agreement"] >= 0.95
    assert set(q.info["calibration_comparison"]) == {"minmax", "entropy", "percentile", "percentile@99.99"}


def test_bias_correction_matches_the_float_means(digits_chain, digits):
    import onnxruntime as ort

    model = onnx.load(str(digits_chain[1].artifact_path))
    batches = list(digits.calibration_batches(32, 16))
    corrected, info = correct_biases(model, batches, per_channel=True)
    assert info["corrected_convs"] == 2 and info["max_bias_shift"] > 0
    # the corrected float graph differs from the original only in its biases
    before = {t.name for t in model.graph.initializer}
    assert before <= {t.name for t in corrected.graph.initializer}
    sess = ort.InferenceSession(corrected.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, batches[0])[0].shape == (16, 10)


def test_ort_errors_are_translated_without_temp_files():
    raw = ValueError(
        "Unable to get valid quantization scale for input 'hardtanh_1' when quantizing bias "
        "features.1.conv.1.weight_bias in /tmp/ort.quant.abc123/augmented_model.onnx"
    )
    err = translate_ort_error(raw, "minmax", "optimized")
    assert isinstance(err, CompressionError)
    text = str(err)
    assert "hardtanh_1" in text and "exclude_nodes" in text and "exported" in text
    assert "ort.quant." not in text and "augmented_model" not in text
    axis = translate_ort_error(
        RuntimeError("Unrecognized attribute: axis for operator DequantizeLinear in runs/q/.minmax.onnx"),
        "minmax",
        "m",
    )
    assert "opset" in str(axis) and ".minmax.onnx" not in str(axis)


class _BadCalibration:
    name = "bad"
    inputs = ()

    def calibration_batches(self, num_samples=128, batch_size=16):
        yield {"pixels": np.zeros((4, 1, 5, 5), np.float32)}


def test_a_failed_static_pass_leaves_no_empty_directory(digits_chain, tmp_path):
    with pytest.raises(ConfigError):
        run_pass(
            "quantize-static", digits_chain[1], _BadCalibration(), {"calibration": "minmax"}, tmp_path / "q"
        )
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_mobilenetv2_static_int8_folds_clips_and_keeps_answers(mobilenetv2, tmp_path):
    from slimship.candidate import original_candidate
    from slimship.passes import export

    orig = original_candidate(mobilenetv2, tmp_path / "original")
    exp = export(orig, mobilenetv2, out_dir=tmp_path / "exported")
    q = run_pass(
        "quantize-static",
        exp,
        mobilenetv2,
        {
            "calibration": "minmax",
            "bias_correction": True,
            "keep_float": "first_layer",
            "calibration_samples": 64,
            "verify_samples": 56,
        },
        tmp_path / "static",
    )
    model = onnx.load(str(q.artifact_path))
    first = [n for n in model.graph.node if n.input and n.input[0] == model.graph.input[0].name]
    assert [n.op_type for n in first] == ["Conv"]  # the first conv stays float: fed the raw pixels
    assert q.info["excluded_nodes"] == [first[0].name]
    ops = _q_ops(q.artifact_path)
    # ORT's own default layout: 65 Q, 0 Clip; the float first conv keeps its ReLU6 Clip (nothing to fold it into)
    assert ops["Clip"] == 1 and ops["QuantizeLinear"] <= 70, ops
    # on the cat's 56 crops (the first evaluation photo)
    assert q.info["fidelity_to_parent"]["outputs"]["logits"]["top1_agreement"] >= 0.85


def _three_convs(path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        inits += [
            numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(4, np.float32), f"b{i}"),
        ]
        nodes.append(
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}", pads=[1] * 4)
        )
        prev = f"y{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("x", "y2")]
    model = helper.make_model(
        helper.make_graph(nodes, "three", io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    onnx.save_model(model, str(path))


def _session_ops(path, tmp_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "session.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _q_ops(tmp_path / "session.onnx")


def test_an_excluded_conv_between_quantized_tensors_stays_float_in_onnx_runtime(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from slimship.passes._static_int8 import unquantize_outputs

    _three_convs(tmp_path / "f.onnx")
    batches = [{"x": np.random.default_rng(i).normal(size=(1, 4, 8, 8)).astype(np.float32)} for i in range(4)]

    class Reader:
        it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(tmp_path / "f.onnx"),
        str(tmp_path / "q.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        nodes_to_exclude=["conv1"],
    )
    # ONNX Runtime quantizes the "excluded" conv itself at session time (its weights, between a DQ and a Q)
    assert _session_ops(tmp_path / "q.onnx", tmp_path)["QLinearConv"] == 3
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert unquantize_outputs(q, ["conv1"]) == ["y1"]
    onnx.save_model(q, str(tmp_path / "q2.onnx"))
    ops = _session_ops(tmp_path / "q2.onnx", tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 2, ops  # conv1 float; conv2 reads its float output


def test_calibration_is_fed_in_bounded_chunks_and_minmax_ranges_equal_one_call(digits_chain, tmp_path):
    """ORT's calibrators hold every intermediate output of one collect_data call (560 MobileNetV2 crops: 24 GB,
    OOM-killed), so slimship feeds at most CALIBRATION_CHUNK_ROWS rows per call; MinMax ranges merge to exactly the
    one-call result."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from slimship.passes._static_int8 import _Reader, calibrate_ranges, calibration_chunks

    path = digits_chain[1].artifact_path
    inp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) else 50 for d in inp.shape]
    rng = np.random.default_rng(0)
    batches = [{inp.name: rng.random(shape, dtype=np.float32)} for _ in range(6)]  # 300 rows
    chunks = calibration_chunks(batches)
    assert [len(c) for c in chunks] == [2, 2, 2]  # 100 rows per chunk, at most 128
    assert (
        calibration_chunks([{inp.name: np.zeros((300, *shape[1:]), np.float32)}], 128)[0][0][inp.name].shape[
            0
        ]
        == 300
    )
    got = calibrate_ranges(path, batches, ["minmax"], ["Conv", "MatMul", "Gemm"], tmp_path, 99.999)["minmax"]
    cal = create_calibrator(
        path,
        ["Conv", "MatMul", "Gemm"],
        augmented_model_path=str(tmp_path / "aug.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    cal.collect_data(_Reader(batches))
    want = cal.compute_data()
    assert set(got.data) == set(want.data) and len(want.data) > 3
    for name in want.data:
        np.testing.assert_array_equal(np.asarray(got[name].range_value), np.asarray(want[name].range_value))
