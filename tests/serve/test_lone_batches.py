"""Where an endpoint runs a batch: with several instances, a batch that runs alone gets the session with all the
threads (``lone_batch_threads``); a tiny model's lone row runs on the event loop's thread (``inline_below_ms``);
batches that overlap run on their instances' sessions. Every path answers exactly what ONNX Runtime answers."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort

from slimship.serve.config import BatchingConfig
from slimship.serve.endpoint import Endpoint
from slimship.serve.metrics import Metrics

LABELS = {"model": "digits", "version": "1"}


def _runs(metrics: Metrics, runner: str) -> float:
    return metrics.sample("slimship_batch_runs_total", {**LABELS, "runner": runner}) or 0.0


def _inputs(ep: Endpoint, n: int) -> list[dict[str, np.ndarray]]:
    spec = ep.inputs[0]
    rng = np.random.default_rng(0)
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    return [{spec.name: rng.random(shape, dtype=np.float32)} for _ in range(n)]


def _expected(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _serve(ep: Endpoint, coro_factory):
    async def main():
        await ep.start()
        try:
            return await coro_factory()
        finally:
            await ep.stop()

    return asyncio.run(main())


def test_a_lone_batch_runs_on_all_the_threads_then_inline_and_overlapping_ones_on_their_instances(
    digits_chain,
):
    path = digits_chain[1].artifact_path
    metrics = Metrics()
    ep = Endpoint(
        "digits",
        1,
        path,
        BatchingConfig(instances=2, threads=2, max_batch_size=1, inline_below_ms=1000),
        metrics,
    )
    assert [s.get_session_options().intra_op_num_threads for s in ep.sessions] == [1, 1]
    assert ep._lone is not None and ep._lone.get_session_options().intra_op_num_threads == 2
    assert ep.runtime_settings()["lone_batch_threads"] == 2
    xs = _inputs(ep, 12)

    async def traffic():
        first = await ep.infer(xs[0])  # alone, not timed yet: the lone session on a worker thread
        second = await ep.infer(xs[1])  # alone, a tiny model timed: inline
        together = await asyncio.gather(*(ep.infer(x) for x in xs[2:]))  # one row per batch: they overlap
        return [first, second, *together]

    answers = _serve(ep, traffic)
    assert _runs(metrics, "lone") >= 1 and _runs(metrics, "inline") >= 1
    assert _runs(metrics, "instance") >= 1  # concurrent batches ran side by side on the instances
    assert sum(_runs(metrics, r) for r in ("lone", "inline", "instance")) == 12
    name = ep.outputs[0].name
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got[name], _expected(path, x), rtol=1e-5, atol=1e-6)


def test_lone_batches_on_the_instances_share_and_no_inline_run_when_told(digits_chain):
    path = digits_chain[1].artifact_path
    metrics = Metrics()
    config = BatchingConfig(instances=2, threads=2, lone_batch_threads="instance", inline_below_ms=0)
    ep = Endpoint("digits", 1, path, config, metrics)
    assert ep._lone is None and "lone_batch_threads" not in ep.runtime_settings()
    xs = _inputs(ep, 4)

    async def traffic():
        return [await ep.infer(x) for x in xs]

    _serve(ep, traffic)
    assert _runs(metrics, "instance") == 4 and _runs(metrics, "lone") == 0 and _runs(metrics, "inline") == 0


def test_a_model_slower_than_the_inline_limit_stays_on_a_worker_thread(digits_chain):
    """The rule, not a timing: with the single-row average at 5 ms and the limit at 1 ms, every lone row runs on a
    worker — five runs of any speed can't pull the moving average (x 0.8 each) below 5 x 0.8^5 = 1.6 ms."""
    path = digits_chain[1].artifact_path
    metrics = Metrics()
    ep = Endpoint("digits", 1, path, BatchingConfig(inline_below_ms=1.0), metrics)
    assert ep._lone is None  # one instance: its session already has all the threads
    ep._row_ms = 5.0
    xs = _inputs(ep, 5)

    async def traffic():
        return [await ep.infer(x) for x in xs]

    _serve(ep, traffic)
    assert _runs(metrics, "instance") == 5 and _runs(metrics, "inline") == 0


def test_a_fault_after_the_model_run_fails_that_batch_only_and_the_batcher_goes_on(digits_chain):
    """A replica's metrics stand-in once lacked a series and the batcher task died: every later request hung until its
    504. A fault outside the model run now answers that batch with it and the next batch is served."""
    import pytest

    path = digits_chain[1].artifact_path
    metrics = Metrics()
    ep = Endpoint("digits", 1, path, BatchingConfig(), metrics)
    xs = _inputs(ep, 2)
    real = metrics.batch_runs

    class Broken:
        def labels(self, *_):
            raise RuntimeError("metrics broke")

    async def traffic():
        metrics.batch_runs = Broken()
        with pytest.raises(RuntimeError, match="metrics broke"):
            await asyncio.wait_for(ep.infer(xs[0]), 10)
        metrics.batch_runs = real
        return await asyncio.wait_for(ep.infer(xs[1]), 10)

    got = _serve(ep, traffic)
    np.testing.assert_allclose(got[ep.outputs[0].name], _expected(path, xs[1]), rtol=1e-5, atol=1e-6)


def _counting_puts(ep: Endpoint) -> list[int]:
    """Count what goes through the endpoint's queue (the batcher's path)."""
    puts = [0]
    q = ep._queue
    assert q is not None
    real = q.put_nowait

    def put(item):
        puts[0] += 1
        real(item)

    q.put_nowait = put  # type: ignore[method-assign]
    return puts


def test_a_lone_tiny_row_skips_the_queue_only_when_it_is_the_servers_only_request(digits_chain):
    """The shortcut past the batcher's queue (two task switches fewer per request) is taken only when the HTTP layer
    counts one open request — this one: with more open, rows queue and batch together as before; with nobody
    counting (gRPC, in-process), they queue. Each answer is ONNX Runtime's, on a single-thread session."""
    path = digits_chain[1].artifact_path
    metrics = Metrics()
    ep = Endpoint("digits", 1, path, BatchingConfig(inline_below_ms=1000), metrics)
    xs = _inputs(ep, 9)
    open_now = [1]
    seen: dict[str, object] = {}

    async def traffic():
        puts = _counting_puts(ep)
        out = [await ep.infer(xs[0])]  # nobody counts open requests: the queue
        seen["uncounted"] = puts[0]
        ep.requests_open = lambda: open_now[0]
        out += [await ep.infer(x) for x in xs[1:5]]  # the only open request: past the queue, inline
        seen["alone"] = puts[0]
        open_now[0] = 4
        out += [await ep.infer(x) for x in xs[5:]]  # others open: the queue
        seen["others"] = puts[0]
        return out

    answers = _serve(ep, traffic)
    assert seen == {"uncounted": 1, "alone": 1, "others": 5}
    assert _runs(metrics, "inline") >= 7  # the first is timed on a worker; queued lone rows run inline too
    assert ep._inline is not None and ep._inline.get_session_options().intra_op_num_threads == 1
    name = ep.outputs[0].name
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got[name], _expected(path, x), rtol=1e-5, atol=1e-6)


def test_inline_rows_on_the_instance_session_when_told_and_never_past_a_queue_delay(digits_chain):
    path = digits_chain[1].artifact_path
    metrics = Metrics()
    cfg = BatchingConfig(inline_below_ms=1000, inline_session="instance", max_queue_delay_ms=1.0)
    ep = Endpoint("digits", 1, path, cfg, metrics)
    ep.requests_open = lambda: 1
    xs = _inputs(ep, 4)

    async def traffic():
        puts = _counting_puts(ep)
        out = [await ep.infer(x) for x in xs]
        return out, puts[0]

    answers, puts = _serve(ep, traffic)
    assert puts == 4  # a queue delay means the batcher waits for batch-mates: no shortcut
    assert _runs(metrics, "inline") == 3 and ep._inline is None
    name = ep.outputs[0].name
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got[name], _expected(path, x), rtol=1e-5, atol=1e-6)


def test_the_servers_only_request_of_a_slower_model_runs_on_the_loop_thread_on_its_instance_session(
    digits_chain,
):
    """Above inline_below_ms and below alone_inline_below_ms (the rule, with the single-row average pinned at 5 ms):
    the only open request runs on the event loop's thread on the instance's own session — no queue, no worker, no
    single-thread session; with other requests open it queues and runs on a worker; with the limit at 0, always a
    worker. Answers are ONNX Runtime's."""
    path = digits_chain[1].artifact_path
    seen: dict[str, object] = {}

    def run(limit: float) -> tuple[Metrics, Endpoint, list]:
        metrics = Metrics()
        ep = Endpoint(
            "digits", 1, path, BatchingConfig(inline_below_ms=1.0, alone_inline_below_ms=limit), metrics
        )
        xs = _inputs(ep, 8)  # the same 8 rows every run (seeded)
        open_now = [1]
        ep.requests_open = lambda: open_now[0]

        async def traffic():
            puts = _counting_puts(ep)
            out = []
            for x in xs[:4]:
                ep._row_ms = 5.0
                out.append(await ep.infer(x))
            seen[f"alone-{limit}"] = puts[0]
            open_now[0] = 3
            for x in xs[4:]:
                ep._row_ms = 5.0
                out.append(await ep.infer(x))
            seen[f"others-{limit}"] = puts[0]
            return out

        return metrics, ep, _serve(ep, traffic)

    metrics, ep, answers = run(30.0)
    assert seen["alone-30.0"] == 0 and seen["others-30.0"] == 4
    assert _runs(metrics, "inline") == 4 and _runs(metrics, "instance") == 4
    assert ep._inline is None  # the instance's own session ran them, not a single-thread one
    name = ep.outputs[0].name
    for x, got in zip(_inputs(ep, 8), answers, strict=True):
        np.testing.assert_allclose(got[name], _expected(path, x), rtol=1e-5, atol=1e-6)
    metrics, ep, _ = run(0.0)
    assert seen["alone-0.0"] == 4 and _runs(metrics, "inline") == 0 and _runs(metrics, "instance") == 8
