"""Batch-invariant answers through a real server: a short text answered alone and answered while batched with long
texts agree to float precision with dynamic INT8 with per-row activation scales (`activation_scales: per-row`) — the
documented bound is cosine ≥ 0.99999. (ORT's per-tensor scales, the faster default, move it by less than the model's
fidelity floor: tests/passes/test_rowquant.py.)"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from tests.serve.conftest import ServerProcess

BOUND = 0.99999


def _body(minilm, text):
    b = minilm._tokenize([text])
    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
            for k, v in b.items()
        ]
    }


def _emb(r):
    out = next(o for o in r.json()["outputs"] if o["name"] == "sentence_embedding")
    return np.asarray(out["data"], np.float64)


@pytest.mark.slow
def test_a_short_text_alone_and_batched_with_long_ones_agree(tmp_path, minilm, minilm_chain):
    from slimship.passes import run_pass

    q = run_pass(
        "quantize-dynamic", minilm_chain[2], minilm, {"activation_scales": "per-row"}, tmp_path / "int8"
    )
    texts = sorted(minilm.eval_texts(limit=200), key=len)
    short, longs = texts[:4], texts[-12:]
    # a queue delay makes concurrent requests share a batch
    cfg = {
        "models": [
            {"name": "m", "path": str(q.path), "batching": {"max_queue_delay_ms": 50, "max_batch_size": 16}}
        ]
    }
    s = ServerProcess(tmp_path, cfg)
    try:
        url = f"http://{s.url}/v2/models/m/infer"
        with httpx.Client(timeout=60) as c:
            alone = [_emb(c.post(url, json=_body(minilm, t))) for t in short]

        def send(text):
            with httpx.Client(timeout=60) as c:
                return _emb(c.post(url, json=_body(minilm, text)))

        before = httpx.get(f"http://{s.url}/metrics").text
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, t) for t in [*longs[:6], *short, *longs[6:]]]
            mixed = [f.result() for f in futures][6 : 6 + len(short)]
        after = httpx.get(f"http://{s.url}/metrics").text
    finally:
        s.stop()
    batched_rows = _count(after, "slimship_batch_size_sum") - _count(before, "slimship_batch_size_sum")
    batches = _count(after, "slimship_batch_size_count") - _count(before, "slimship_batch_size_count")
    assert batches < batched_rows, "the requests were not batched together; the test proves nothing"
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(alone, mixed, strict=True)]
    assert min(cos) >= BOUND, cos


def _count(text, name):
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and 'model="m"' in line
    )
