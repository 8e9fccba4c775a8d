"""An evaluation on ONNX Runtime runs one single-thread session per thread, side by side on whole batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest


def test_sessions_side_by_side_give_the_single_sessions_outputs_in_order(digits, digits_chain):
    from slimship.measure.evaluate import collect_outputs, evaluate, evaluation_runtimes
    from slimship.runtime import create_runtime

    _, exp, _ = digits_chain
    rts = evaluation_runtimes(exp, digits, None, 2)
    assert len(rts) == 2 and all(rt.describe()["threads"] == 1 for rt in rts)
    one = create_runtime(exp, digits, threads=1)
    both = collect_outputs(rts, digits, progress=False)
    alone = collect_outputs(one, digits, progress=False)
    assert both.keys() == alone.keys()
    for name in alone:  # every sample in its evaluation slot, whichever session ran it
        np.testing.assert_allclose(both[name], alone[name], rtol=1e-5, atol=1e-6)
    record = evaluate(exp, digits, threads=2, progress=False)
    assert record["runtime"]["threads"] == 2 and "2 single-thread sessions" in record["runtime"]["sessions"]
    assert record["fidelity"]["top1_agreement"] == 1.0
    # PyTorch's thread pool is process-wide: one runtime there
    orig, _, _ = digits_chain
    assert len(evaluation_runtimes(orig, digits, None, 2)) == 1


def test_a_session_that_fails_mid_evaluation_fails_it_in_the_callers_thread(digits, digits_chain):
    from slimship.errors import InferenceError
    from slimship.measure.evaluate import collect_outputs, evaluation_runtimes

    _, exp, _ = digits_chain
    good, bad = evaluation_runtimes(exp, digits, None, 2)
    failed = threading.Event()
    real_good = good.predict

    def fail(batch):
        failed.set()
        raise InferenceError("session lost its model")

    def wait_then_run(
        batch,
    ):  # holds its batch until the other session has taken (and failed on) the next one
        assert failed.wait(30)
        return real_good(batch)

    bad.predict = fail  # type: ignore[method-assign]
    good.predict = wait_then_run  # type: ignore[method-assign]
    before = threading.active_count()
    with pytest.raises(InferenceError, match="lost its model"):
        collect_outputs([good, bad], digits, progress=False)
    assert threading.active_count() == before  # the other session's thread stopped too
