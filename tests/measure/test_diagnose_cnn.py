"""Diagnosis over convolutions: static INT8 per node and per block, and the accuracy-aware mode on a CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from slimship.measure.diagnose import diagnose, format_diagnosis, node_blocks
from slimship.passes import run_pass
from slimship.pipeline.accuracy_aware import quantize_accuracy_aware


@pytest.fixture(scope="module")
def mnist_exported(mnist_exported):
    """The exported candidate of the session's (original, exported) mnist pair, built once per run."""
    return mnist_exported[1]


def test_static_diagnosis_ranks_convolutions_per_node_and_block(mnist, mnist_exported, tmp_path):
    report = diagnose(mnist_exported, mnist, {"per_channel": False}, measure_top=2, samples=32, mode="static")
    ops = [r["op_type"] for r in report["nodes"]]
    assert sorted(ops) == ["Conv", "Conv", "Gemm", "Gemm"]
    sqnrs = [r["sqnr_db"] for r in report["nodes"]]
    assert sqnrs == sorted(sqnrs) and all(0 < s < 80 for s in sqnrs)
    for row in report["nodes"][:2]:
        assert 0 < row["fidelity_only_this_quantized"] <= 1.0 and "gain_from_reverting" in row
    # blocks come from the exporter's module path: one per layer of this flat Sequential
    assert report["grouped_by"] == "block" and len(report["groups"]) == 4
    assert all("fidelity_all_but_this" in g for g in report["groups"][:2])
    assert (
        report["config"]["calibration"] == "minmax"
    )  # "auto" pinned: every measurement uses the same ranges
    text = format_diagnosis(report)
    assert "block" in text and "exclude_nodes" in text and "Conv" in text
    json.dumps(report)
    q = run_pass(
        "quantize-static",
        mnist_exported,
        mnist,
        {"per_channel": False, "calibration": "minmax", **report["paste_into_config"]},
        tmp_path / "q-excluded",
    )
    assert set(q.info["excluded_nodes"]) == set(report["suggested_exclude_nodes"])


def test_static_accuracy_aware_meets_a_floor_the_full_int8_model_misses(mnist, mnist_exported, tmp_path):
    base = {"per_channel": False, "calibration": "minmax"}

    def fid(cand):
        return cand.info["fidelity_to_parent"]["outputs"]["logits"]["cosine_min"]

    full = fid(run_pass("quantize-static", mnist_exported, mnist, base, tmp_path / "full"))
    convs = [n.name for n in onnx.load(str(mnist_exported.artifact_path)).graph.node if n.op_type == "Conv"]
    best_revert = max(
        fid(
            run_pass(
                "quantize-static", mnist_exported, mnist, {**base, "exclude_nodes": [c]}, tmp_path / f"r{i}"
            )
        )
        for i, c in enumerate(convs)
    )
    assert full < best_revert
    floor = (full + best_revert) / 2
    result = quantize_accuracy_aware(
        mnist_exported, mnist, tmp_path / "aa", base, min_fidelity=floor, mode="static"
    )
    assert result["mode"] == "static" and result["met_budget"] and result["reverted_nodes"]
    assert result["steps"][0]["fidelity"] < floor <= result["chosen"]["fidelity"]


def test_residual_adds_cut_blocks_when_nodes_carry_no_module_path():
    from tests.fixtures.foreign_onnx import build_model

    model = build_model()
    for i, node in enumerate(model.graph.node):
        # flat names, no metadata (unique: names built from id(node) % 10**6 once collided and merged two blocks)
        node.name = f"n{(i * 7919) % 10007}_{node.op_type}"
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    blocks = node_blocks(model, convs)
    assert [blocks[c] for c in convs] == ["block 0", "block 0", "block 0", "block 1", "block 1", "block 2"]
    named = node_blocks(build_model(), [n.name for n in build_model().graph.node if n.op_type == "Conv"])
    assert set(named.values()) == {"stem", "block0", "block1", "mask"}


def test_diagnosis_of_a_graph_with_only_weight_nodes_gives_no_traceback(tmp_path):
    """One Gather, no MatMul: nothing to capture (ONNX Runtime's run([]) returns every output) and reverting the
    only node leaves the parent — neither may fail."""
    from onnx import TensorProto, helper, numpy_helper

    from slimship.candidate import original_candidate
    from slimship.workload import resolve_workload

    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["?", 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["?", 4, 8])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "lookup.onnx"))
    np.savez(tmp_path / "ids.npz", ids=np.random.default_rng(1).integers(0, 50, size=(16, 4)))
    w = resolve_workload(str(tmp_path / "lookup.onnx"), data=tmp_path / "ids.npz")
    cand = original_candidate(w, tmp_path / "original")
    report = diagnose(cand, w, {"per_channel": False}, measure_top=1, samples=16)
    (row,) = report["nodes"]
    assert row["node"] == "embed" and row["fidelity_all_but_this"] == 1.0
    assert report["suggested_exclude_nodes"] == ["embed"] or row["gain_from_reverting"] <= 0


def _outlier_channel_copy(parent, workload, out):
    """``parent`` with conv 1's output channel 0 scaled ×1000 and conv 2's input channel 0 ÷1000: the same function
    in float (ReLU and max-pool commute with a positive scale), but one channel now spans the per-tensor range of the
    activation between them, so INT8 with per-tensor ranges loses every other channel — broken INT8 whatever the
    trained weights (a harsh calibration of the plain CNN kept all 64 held-out answers on one trained model)."""
    from onnx import numpy_helper

    from slimship.candidate import new_candidate

    model = onnx.load(str(parent.artifact_path))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in model.graph.initializer}

    def rescale(name, index, factor):
        arr = numpy_helper.to_array(inits[name]).copy()
        arr[index] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    rescale(convs[0].input[1], 0, 1000.0)
    rescale(convs[0].input[2], 0, 1000.0)
    rescale(convs[1].input[1], (slice(None), 0), 1e-3)
    out.mkdir()
    onnx.save(model, str(out / "model.onnx"))
    return new_candidate(
        out, name="outlier", format=parent.format, artifact="model.onnx", workload=workload, parent=parent
    )


def test_static_float_until_top1_meets_a_floor_the_full_int8_misses(mnist, mnist_exported, tmp_path):
    parent = _outlier_channel_copy(mnist_exported, mnist, tmp_path / "outlier")
    cfg = {"calibration": "minmax", "per_channel": False}
    search = {"float_until_top1": 1.0, "float_step": 1, "max_float_nodes": 3}
    q = run_pass("quantize-static", parent, mnist, {**cfg, **search}, tmp_path / "mixed")
    mp = q.info["mixed_precision"]
    assert mp["steps"][0]["float_nodes"] == 0 and mp["steps"][0]["top1_agreement"] < 0.5  # all INT8 misses it
    assert mp["met"] and mp["steps"][-1]["top1_agreement"] >= 1.0 and len(mp["steps"]) >= 2
    ranked = [r["node"] for r in mp["ranking"]]
    assert mp["float_nodes"] == ranked[: len(mp["float_nodes"])]  # worst emulated SQNR first
    assert (
        ranked[0]
        == [n.name for n in onnx.load(str(parent.artifact_path)).graph.node if n.op_type == "Conv"][1]
    )
    assert q.info["excluded_nodes"] == sorted(mp["float_nodes"])
    model = onnx.load(str(q.artifact_path))
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in mp["float_nodes"]:
            assert node.op_type == "Conv" and node.input[1] in inits  # its float weight, no DequantizeLinear
    assert not list((tmp_path / "mixed").glob(".*.onnx"))  # the search's intermediate graphs are gone


def test_static_float_until_top1_output_first_grows_a_float_tail(mnist, mnist_exported, tmp_path):
    """output_first returns nodes to float from the output backwards, Adds and all: the outlier activation is conv 1's
    output, so the floor is met exactly at the step that makes conv 1 float — after every node behind it (the case
    where "sqnr" order needs fewer float nodes; output_first is for error spread over a deep net)."""
    parent = _outlier_channel_copy(mnist_exported, mnist, tmp_path / "outlier")
    cfg = {"calibration": "minmax", "per_channel": False, "float_order": "output_first"}
    search = {"float_until_top1": 1.0, "float_step": 1, "max_float_nodes": 8}
    q = run_pass("quantize-static", parent, mnist, {**cfg, **search}, tmp_path / "tail")
    mp = q.info["mixed_precision"]
    nodes = onnx.load(str(parent.artifact_path)).graph.node
    quantizable = [n.name for n in nodes if n.op_type in ("Conv", "MatMul", "Gemm", "Add")]
    ranked = [r["node"] for r in mp["ranking"]]
    assert ranked == quantizable[::-1][: len(ranked)] and [r["from_output"] for r in mp["ranking"]][:2] == [
        0,
        1,
    ]
    conv1 = next(n.name for n in nodes if n.op_type == "Conv")
    assert mp["steps"][0]["top1_agreement"] < 0.5 and mp["met"]
    assert (
        mp["float_nodes"] == ranked[: ranked.index(conv1) + 1]
    )  # stops once the outlier's producer is float
    assert [s["float_nodes"] for s in mp["steps"]] == list(range(len(mp["float_nodes"]) + 1))
    assert all(s["top1_agreement"] < 1.0 for s in mp["steps"][:-1])
    model = onnx.load(str(q.artifact_path))
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in mp["float_nodes"] and node.op_type in ("Conv", "Gemm", "MatMul"):
            assert node.input[1] in inits  # a float weight, no DequantizeLinear
