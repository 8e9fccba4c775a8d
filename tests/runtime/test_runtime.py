from __future__ import annotations

import numpy as np
import pytest

from slimship.errors import InferenceError, InputSpecError
from slimship.runtime import create_runtime


@pytest.fixture(scope="module")
def runtimes(digits, digits_chain):
    orig, exp, _ = digits_chain
    return create_runtime(orig, digits, threads=1), create_runtime(exp, digits, threads=1)


def test_one_predict_contract_for_every_backend(runtimes, digits):
    batch = digits.example_inputs(5)
    outs = [rt.predict(batch) for rt in runtimes]
    assert [rt.backend for rt in runtimes] == ["torch", "onnxruntime"]
    for out in outs:
        assert (
            list(out) == ["logits"] and out["logits"].shape == (5, 10) and out["logits"].dtype == np.float32
        )
    assert np.abs(outs[0]["logits"] - outs[1]["logits"]).max() < 1e-4
    # a batch of one is still a batch
    assert runtimes[1].predict(digits.example_inputs(1))["logits"].shape == (1, 10)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"image": np.zeros((1, 1, 8, 8), np.float32)}, "missing ['pixels'], unknown ['image']"),
        ({"pixels": np.zeros((1, 1, 8, 8), np.float64)}, "dtype float64, expected float32"),
        ({"pixels": np.zeros((1, 8, 8), np.float32)}, "rank 3); expected rank 4"),
        ({"pixels": np.zeros((1, 1, 28, 28), np.float32)}, "axis 2 must be 8"),
        ({"pixels": np.zeros((0, 1, 8, 8), np.float32)}, "empty axis 0"),
        ({"pixels": [[1.0]]}, "must be a numpy array"),
    ],
)
def test_wrong_inputs_get_a_clear_error(runtimes, batch, message):
    for rt in runtimes:
        with pytest.raises(InputSpecError) as info:
            rt.predict(batch)
        assert message in str(info.value)


def test_inconsistent_dynamic_dims(minilm):
    from slimship.runtime.base import validate_batch

    batch = {"input_ids": np.ones((2, 10), np.int64), "attention_mask": np.ones((2, 11), np.int64)}
    with pytest.raises(InputSpecError, match="dimension 'sequence' disagrees"):
        validate_batch(batch, minilm.inputs)


def test_backend_must_fit_the_candidate(digits, digits_chain):
    orig, exp, _ = digits_chain
    with pytest.raises(InferenceError, match="export it first"):
        create_runtime(orig, digits, "onnxruntime")
    with pytest.raises(InferenceError, match="is an ONNX model"):
        create_runtime(exp, digits, "torch")
    with pytest.raises(InferenceError, match="unknown runtime 'tensorrt'"):
        create_runtime(exp, digits, "tensorrt")


def test_thread_count_is_applied(digits, digits_chain):
    rt = create_runtime(digits_chain[1], digits, threads=1)
    assert rt.describe()["threads"] == 1
    assert rt.session.get_session_options().intra_op_num_threads == 1


def test_a_candidate_run_with_the_wrong_workload(mnist, digits_chain):
    with pytest.raises(
        InferenceError, match=r"expects 'pixels' of shape \[.*8, 8\] but workload 'mnist' provides .*28, 28"
    ):
        create_runtime(digits_chain[1], mnist)
