"""Cross-layer equalization of ONNX convolutions: the float function is unchanged where it should be, and the
per-channel weight ranges of each equalized pair meet."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slimship.passes._equalize import equalize_convs


def _graph(act: str) -> onnx.ModelProto:
    """1×1 conv (4 → 8) → ReLU → depthwise 3×3 (8) → ``act`` → 1×1 conv (8 → 3), channels of wildly different scales."""
    rng = np.random.default_rng(0)
    scales = np.array([0.01, 0.1, 1, 10, 0.5, 3, 0.05, 20], np.float32)
    w1 = rng.normal(size=(8, 4, 1, 1)).astype(np.float32) * scales[:, None, None, None]
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) / scales[:, None, None, None]
    w3 = rng.normal(size=(3, 8, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * scales, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b2"),
        numpy_helper.from_array(w3, "w3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    act_node = (
        helper.make_node("Clip", ["h2", "lo", "hi"], ["a2"], name="relu6")
        if act == "relu6"
        else helper.make_node("Relu", ["h2"], ["a2"], name="relu")
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="expand"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], name="dw", group=8, pads=[1, 1, 1, 1]),
        act_node,
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="project"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 6, 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ranges(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        "w1_out": np.abs(w["w1"]).reshape(8, -1).max(1),
        "w2": np.abs(w["w2"]).reshape(8, -1).max(1),
        "w3_in": np.abs(w["w3"]).max(axis=(0, 2, 3)),
    }


def test_equalization_through_relu_is_exact_and_meets_the_ranges():
    model = _graph("relu")
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    eq, info = equalize_convs(model, relu6="keep")
    assert info["equalized_pairs"] == 2 and info["relu6_replaced_by_relu"] == 0
    np.testing.assert_allclose(_run(eq, x), _run(model, x), rtol=1e-4, atol=1e-4)
    before, after = _ranges(model), _ranges(eq)
    spread = lambda r: r.max() / r.min()  # noqa: E731
    assert spread(after["w2"]) < spread(before["w2"]) / 10  # the depthwise channels no longer span 2000x
    # at convergence each pair's per-channel ranges meet: depthwise ranges ≈ sqrt(expand · project)
    assert np.allclose(after["w2"], np.sqrt(after["w1_out"] * after["w3_in"]), rtol=0.05)


def test_relu6_is_kept_exact_or_replaced_by_relu_when_asked():
    model = _graph("relu6")
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    kept, info = equalize_convs(model, relu6="keep")  # only the expand → dw pair (joined by ReLU)
    assert info["equalized_pairs"] == 1
    np.testing.assert_allclose(_run(kept, x), _run(model, x), rtol=1e-4, atol=1e-4)
    relu, info = equalize_convs(model, relu6="to_relu")
    assert info["equalized_pairs"] == 2 and info["relu6_replaced_by_relu"] == 1
    assert "Clip" not in {n.op_type for n in relu.graph.node}
    assert model.graph.node[3].op_type == "Clip"  # the input model is not modified
