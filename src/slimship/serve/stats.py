"""Triton's statistics extension: per model version, what it has served since it was loaded.

Counted in the serving core, so the HTTP and gRPC front ends report the same figures:

- by the request path (:meth:`Server.run_inference <slimship.serve.server.Server.run_inference>`, every transport,
  local or Ray endpoints): ``success`` / ``fail`` (count and the request's whole time in the server, from arrival to
  its answer encoded or its error), ``inference_count`` (rows of successful requests) and ``last_inference``;
- by the batcher (:class:`~slimship.serve.endpoint.Endpoint`, local endpoints only — a Ray replica's batcher runs
  in another process): ``execution_count`` (model runs), per answered request ``queue`` (enqueued → its batch
  starts), ``compute_input`` (stacking / padding the batch), ``compute_infer`` (the ONNX Runtime run) and
  ``compute_output`` (cutting the outputs back per request) — each request is charged its batch's durations, as
  Triton does — and ``batch_stats`` per batch size (one count per run).

A failed request is one that reached a model version and was not answered with its outputs: invalid input (400),
refused when the queue was full (503), timed out (504), or failed in the model (500) — Triton counts rejected and
failed requests alike. Requests refused before a version is chosen (malformed body, unknown model) belong to no
version and are not counted.

Counting is plain integer arithmetic on the event loop's thread (the batcher and the request path both run there),
with ``perf_counter_ns``: no lock, nothing allocated per request beyond a batch size seen for the first time.
"""

from __future__ import annotations

import time
from typing import Any

#: the inference_stats groups, in Triton's order (cache_hit / cache_miss: no response cache here, always zero)
INFERENCE_GROUPS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
#: the batch_stats groups
BATCH_GROUPS = ("compute_input", "compute_infer", "compute_output")


class Duration:
    """A count and a total duration (Triton's ``StatisticDuration``)."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class BatchStats:
    """Model runs of one batch size."""

    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()


class ModelStats:
    """One served version's statistics since it was loaded."""

    def __init__(self) -> None:
        self.inference_count = 0
        self.execution_count = 0
        #: ms since the epoch of the last request answered or failed (0: none yet)
        self.last_inference = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.cache_hit = Duration()
        self.cache_miss = Duration()
        self.batches: dict[int, BatchStats] = {}

    # ---- counting --------------------------------------------------------------------------------
    def request(self, ok: bool, ns: int, rows: int) -> None:
        """A request that reached this version: answered (``rows`` rows) or failed, after ``ns`` in the server."""
        if ok:
            self.success.add(ns)
            self.inference_count += rows
        else:
            self.fail.add(ns)
        self.last_inference = time.time_ns() // 1_000_000

    def execution(
        self, rows: int, queue_ns: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model run of ``rows`` rows answering ``requests`` requests, which waited ``queue_ns`` in total."""
        self.execution_count += 1
        self.queue.add(queue_ns, requests)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        b = self.batches.get(rows)
        if b is None:
            b = self.batches[rows] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    # ---- reporting -------------------------------------------------------------------------------
    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """The version's ``$model_stat`` object of the extension's JSON."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {g: getattr(self, g).as_dict() for g in INFERENCE_GROUPS},
            "batch_stats": [
                {"batch_size": size, **{g: getattr(b, g).as_dict() for g in BATCH_GROUPS}}
                for size, b in sorted(self.batches.items())
            ],
            "response_stats": {},  # per response of a decoupled model: none here
            "memory_usage": [],
        }
