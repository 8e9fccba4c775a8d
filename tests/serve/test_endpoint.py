"""The batcher in-process: padding and cutting back decided by the model's output shapes, not by coincidence."""

from __future__ import annotations

import asyncio

import numpy as np


def test_a_fixed_width_output_equal_to_the_padded_length_is_not_cut(models):
    """`pooled` is [N, 4]; padding a length-2 request to a length-4 batch made axis 1 of `pooled` equal the padded
    length, and the old shape heuristic cut it to 2 columns (caught by CI on the Ray variant of the protocol suite)."""
    from slimship.serve.endpoint import BatchingConfig, Endpoint
    from slimship.serve.metrics import Metrics

    metrics = Metrics()

    async def main():
        ep = Endpoint("seq", "1", models["seq"], BatchingConfig(max_queue_delay_ms=200), metrics)
        await ep.start()
        a = {"input_ids": np.array([[5, 6]], np.int64), "attention_mask": np.ones((1, 2), np.int64)}
        b = {"input_ids": np.array([[1, 2, 3, 4]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
        try:
            return await asyncio.gather(ep.infer(a), ep.infer(b))
        finally:
            await ep.stop()

    ra, rb = asyncio.run(main())
    assert (
        metrics.sample("slimship_batch_size_count", {"model": "seq", "version": "1"}) == 1
    )  # one padded batch
    emb = np.arange(400, dtype=np.float32).reshape(100, 4) / 100.0
    assert ra["pooled"].shape == (1, 4) and np.allclose(ra["pooled"], emb[[5, 6]].mean(0, keepdims=True))
    assert rb["pooled"].shape == (1, 4) and np.allclose(
        rb["pooled"], emb[[1, 2, 3, 4]].mean(0, keepdims=True)
    )
    assert ra["tokens"].shape == (1, 2, 4) and rb["tokens"].shape == (
        1,
        4,
        4,
    )  # the sequence output is cut back


def test_wire_datatypes_come_from_the_one_ort_to_numpy_map():
    from slimship.serve.endpoint import wire_datatype
    from slimship.tensor_types import ORT_TO_NUMPY

    assert wire_datatype("tensor(float)") == "FP32" and wire_datatype("tensor(int64)") == "INT64"
    assert wire_datatype("tensor(string)") == "BYTES" and wire_datatype("tensor(bool)") == "BOOL"
    assert all(wire_datatype(t) != t for t in ORT_TO_NUMPY)  # every known type has a protocol name
