"""Per-row activation scales: a dynamic INT8 graph whose answers don't depend on batch-mates."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimship.errors import CompressionError
from slimship.passes.rowquant import per_row_activation_scales
from slimship.runtime.settings import decide_settings


def _fp32(path):
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.3, (32, 24)).astype(np.float32), rng.normal(0, 0.1, 24).astype(np.float32)
    w2 = rng.normal(0, 0.3, (24, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


def _session(path):
    return ort.InferenceSession(
        str(path), decide_settings(path).session_options(), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tmp_path_factory.mktemp("rowq")
    fp32 = _fp32(d / "fp32.onnx")
    dyn = d / "dyn.onnx"
    quantize_dynamic(
        str(fp32),
        str(dyn),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"MatMulConstBOnly": True},
    )
    model, n = per_row_activation_scales(onnx.load(str(dyn)))
    assert n == 2 and not any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.node)
    row = d / "row.onnx"
    onnx.save(model, str(row))
    return fp32, dyn, row


def _alone_vs_batched(sess):
    rng = np.random.default_rng(1)
    short = rng.normal(0, 1, (1, 4, 32)).astype(np.float32)
    loud = rng.normal(0, 1, (3, 4, 32)).astype(np.float32) * 40  # batch-mates with much larger activations
    alone = sess.run(["y"], {"x": short})[0][0]
    batched = sess.run(["y"], {"x": np.concatenate([short, loud])})[0][0]
    return float(np.abs(alone - batched).max()), float(np.abs(alone).max())


def test_per_row_scales_make_answers_independent_of_batch_mates(graphs):
    _, dyn, row = graphs
    diff_dyn, scale = _alone_vs_batched(_session(dyn))
    diff_row, _ = _alone_vs_batched(_session(row))
    assert diff_dyn > 0.05 * scale  # per-tensor scales: loud batch-mates coarsen the short row's quantization
    assert diff_row <= 1e-5 * max(1.0, scale)


def test_per_row_scales_keep_fidelity_to_fp32(graphs):
    fp32, dyn, row = graphs
    x = np.random.default_rng(2).normal(0, 1, (8, 6, 32)).astype(np.float32)
    ref = _session(fp32).run(["y"], {"x": x})[0].reshape(-1, 8)

    def cos_min(path):
        y = _session(path).run(["y"], {"x": x})[0].reshape(-1, 8)
        return float(((y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)).min())

    assert cos_min(row) >= 0.995 and cos_min(row) >= cos_min(dyn) - 0.002


def test_a_graph_without_dynamic_quantization_is_refused(graphs):
    fp32, _, _ = graphs
    with pytest.raises(CompressionError, match="DynamicQuantizeLinear"):
        per_row_activation_scales(onnx.load(str(fp32)))


@pytest.mark.slow
def test_minilm_batch_effect_per_row_none_per_tensor_inside_the_fidelity_floor(
    minilm, minilm_chain, tmp_path
):
    """A short text alone vs batched with the longest texts: per-row scales agree to float precision; ORT's
    per-tensor scales (the default: faster) move it, but by less than the model's own fidelity floor to fp32."""
    from slimship.passes import run_pass
    from slimship.runtime import create_runtime

    row = run_pass(
        "quantize-dynamic", minilm_chain[2], minilm, {"activation_scales": "per-row"}, tmp_path / "row"
    )
    tensor = run_pass("quantize-dynamic", minilm_chain[2], minilm, {}, tmp_path / "t")
    assert tensor.info["activation_scales"] == "per-tensor"
    assert row.info["activation_scales"] == "per-row" and row.info["per_row_rewritten"] > 0
    rows = []
    for _, b in minilm.eval_batches(limit=96, batch_size=16):
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            rows.append({k: v[i : i + 1, :n] for k, v in b.items()})
    rows.sort(key=lambda r: r["input_ids"].shape[1])
    short, longest = rows[:6], rows[-5:]

    def pad(rs):
        n = max(r["input_ids"].shape[1] for r in rs)
        return {
            k: np.concatenate([np.pad(r[k], ((0, 0), (0, n - r[k].shape[1]))) for r in rs]) for k in rs[0]
        }

    def worst(cand):
        rt = create_runtime(cand, minilm)
        cos = []
        for r in short:
            a = rt.predict(pad([r]))["sentence_embedding"][0]
            b = rt.predict(pad([r, *longest]))["sentence_embedding"][0]
            cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        return min(cos)

    assert worst(row) >= 0.99999
    floor = tensor.info["fidelity_to_parent"]["outputs"]["sentence_embedding"]["cosine_min"]
    assert floor <= worst(tensor) < 0.99999
