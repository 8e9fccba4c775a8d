"""Small ONNX models for the hardening and fuzz tests, built with onnx.helper (milliseconds to make and run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, POSITIONS, HIDDEN = 1000, 16, 4


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _ints(name: str, values: list[int]):
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def bert_like(path: Path, hidden_vocab: bool = False) -> Path:
    """input_ids + attention_mask [N, S] → pooled [N, 4]: a word-embedding Gather, a position-embedding Gather on a
    sliced position-ids buffer (as the HF BERT export has), their sum masked and averaged. With ``hidden_vocab`` the
    word table is computed in the graph (Mul by 1), so no vocabulary can be read and a bad id fails inside ORT."""
    from onnx import TensorProto, helper, numpy_helper

    word = numpy_helper.from_array(
        np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN) / VOCAB, "word_embeddings.weight"
    )
    pos = numpy_helper.from_array(
        np.ones((POSITIONS, HIDDEN), dtype=np.float32) / 10, "position_embeddings.weight"
    )
    pos_ids = numpy_helper.from_array(np.arange(POSITIONS, dtype=np.int64)[None], "position_ids")
    one = numpy_helper.from_array(np.ones((), np.float32), "one")
    table = "word_embeddings.weight"
    nodes = []
    if hidden_vocab:
        nodes.append(helper.make_node("Mul", ["word_embeddings.weight", "one"], ["table"]))
        table = "table"
    nodes += [
        helper.make_node("Gather", [table, "input_ids"], ["words"]),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one_i"], ["seq"], axis=0),
        helper.make_node("Slice", ["position_ids", "zero_i", "seq", "one_i"], ["pids"]),
        helper.make_node("Gather", ["position_embeddings.weight", "pids"], ["positions"]),
        helper.make_node("Add", ["words", "positions"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "two_i"], ["m3"]),
        helper.make_node("Mul", ["emb", "m3"], ["masked"]),
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bert_like",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"]),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", HIDDEN])],
        initializer=[
            word,
            pos,
            pos_ids,
            *([one] if hidden_vocab else []),
            _ints("zero_i", [0]),
            _ints("one_i", [1]),
            _ints("two_i", [2]),
        ],
    )
    return _save(graph, path)


def log_model(path: Path) -> Path:
    """x [N, 4] FP32 → y = log(x): NaN for negative inputs, -inf for 0 (the JSON non-finite tests)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return _save(graph, path)


def failing_model(path: Path) -> Path:
    """x [N, 4] → a Reshape to a fixed [2, 3]: ONNX Runtime fails on every run (FAIL, not INVALID_ARGUMENT) —
    a fault of the model, answered 500."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[_ints("s", [2, 3])],
    )
    return _save(graph, path)


def ids_body(ids: list[list[int]]) -> dict:
    n, s = len(ids), len(ids[0])
    flat = [v for row in ids for v in row]
    return {
        "inputs": [
            {"name": "input_ids", "shape": [n, s], "datatype": "INT64", "data": flat},
            {"name": "attention_mask", "shape": [n, s], "datatype": "INT64", "data": [1] * len(flat)},
        ]
    }
