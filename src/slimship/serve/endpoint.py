"""An endpoint: one model version with its own ONNX Runtime session and dynamic batcher; and
:class:`ServedEndpoint`, what every served version provides to routing, the server, the HTTP handlers, rollouts and
the dashboard (the local :class:`Endpoint` here, Ray's ``RemoteEndpoint``), with :class:`ModelIO` the request checks
both share.

Requests are validated against the model's inputs (names, datatypes, ranks, fixed dimensions, and the token ids and
sequence lengths its graph can take — :mod:`slimship.serve.input_limits`) *before* they are queued. A batch that
fails anyway is re-run request by request, so only the request the model fails on gets an error (400 when ONNX
Runtime calls its input invalid, else a 500) and its batch-mates are answered. The queue is bounded: when it is full a request is refused at once with 503 and Retry-After, never
left to hang. One batch runs at a time (ONNX Runtime already uses every core inside a batch); while it runs,
arriving requests queue up and form the next batch — up to ``max_batch_size`` rows, waiting at most
``max_queue_delay_ms`` after the first. Requests whose sequences differ in length are padded to the longest
when the model allows it (an ``attention_mask`` input masks the padding); outputs with a sequence axis are cut
back to each request's length. A request that waits beyond its timeout is answered 504 and dropped from the
batch if it hasn't started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slimship.serve.config import BatchingConfig, DriftConfig
from slimship.serve.input_limits import InputLimits, read_input_limits
from slimship.serve.protocol import DATATYPES, Overloaded, ProtocolError, TimedOut
from slimship.serve.stats import ModelStats

log = logging.getLogger("slimship.serve")


def wire_datatype(ort_type: str) -> str:
    """The Open Inference Protocol datatype of an ONNX Runtime tensor type (``tensor(float)`` → ``FP32``), from the
    one ORT → numpy map (:mod:`slimship.tensor_types`); strings are ``BYTES``."""
    import numpy as np

    from slimship.serve.protocol import DATATYPES
    from slimship.tensor_types import ORT_TO_NUMPY

    if ort_type == "tensor(string)":
        return "BYTES"
    name = ORT_TO_NUMPY.get(ort_type)
    if name is None:
        return ort_type
    return next(k for k, v in DATATYPES.items() if k != "BYTES" and np.dtype(v) == np.dtype(name))


@dataclass(frozen=True)
class WireTensorSpec:
    """A served input or output as the protocol describes it (datatype ``FP32``, …; the model-side spec with numpy
    dtypes is :class:`slimship.workload.TensorSpec`)."""

    name: str
    datatype: str
    shape: tuple[int | str | None, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": [d if isinstance(d, int) else -1 for d in self.shape],
        }


class ServedEndpoint(Protocol):
    """What routing, the server, the HTTP handlers, rollouts and the dashboard need from a served version — the
    local :class:`Endpoint` and Ray's ``RemoteEndpoint`` both provide it."""

    model: str
    version: str
    #: where it came from: {"path": …} or {"registry", "version", "digest", "stage", "workload"}
    source: dict[str, Any]
    config: BatchingConfig
    path: Path
    ready: bool
    #: requests started and not yet answered
    in_flight: int
    #: an ONNX Runtime session (or a stand-in with get_inputs/get_outputs/run) the drift reference is built with
    session: Any
    drift_config: DriftConfig | None
    drift: Any  # its DriftMonitor once attached
    #: the statistics extension's figures since it was loaded (serve/stats.py)
    stats: ModelStats
    #: axis 0 of every input is a batch axis
    batchable: bool

    @property
    def queue_depth(self) -> int:
        """Requests waiting for this version (not yet answered)."""
        ...

    #: the probe's outcome at load on this host (serve/verify.py)
    verification: dict[str, Any]

    def runtime_settings(self) -> dict[str, Any]: ...

    def metadata(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float = 30.0) -> None: ...

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ModelIO(ABC):
    """A served version's inputs and outputs: its protocol metadata and the checks made on a request before it is
    queued. Shared by the local :class:`Endpoint` and Ray's ``RemoteEndpoint`` (which validates in the ingress)."""

    model: str
    version: str
    config: BatchingConfig
    inputs: list[WireTensorSpec]
    outputs: list[WireTensorSpec]
    #: axis 0 of every input is a batch axis (requests can be stacked)
    batchable: bool
    #: variable-length sequences (axis 1) are padded to batch them
    pads: bool
    verification: dict[str, Any]
    #: token ids and sequence lengths the model can take, read from its graph (none known: no check)
    limits: InputLimits = InputLimits()

    @abstractmethod
    def runtime_settings(self) -> dict[str, Any]:
        """The deployment settings the version's sessions run with (Endpoint: its own; RemoteEndpoint: its replica's)."""

    #: the runtime serving it, as the protocol's model metadata names it
    platform: str = "onnxruntime_onnx"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
            "parameters": {"runtime_settings": self.runtime_settings(), "verification": self.verification},
        }

    def validate(self, inputs: dict[str, np.ndarray]) -> tuple[int, int | None]:
        """Check names, datatypes and shapes against the model; returns (rows, sequence length if padded)."""
        from slimship.serve.protocol import datatype_of

        by_name = {s.name: s for s in self.inputs}
        expected = list(by_name)
        unknown = [n for n in inputs if n not in by_name]
        if unknown:
            raise ProtocolError(
                f"unknown input(s) {unknown} for {self.model} v{self.version}; it takes {expected}"
            )
        missing = [n for n in expected if n not in inputs]
        if missing:
            raise ProtocolError(
                f"missing input(s) {missing} for {self.model} v{self.version}; it takes {expected}"
            )
        rows: int | None = None
        seq: int | None = None
        for name, arr in inputs.items():
            spec = by_name[name]
            dt = datatype_of(arr)
            if dt != spec.datatype:
                raise ProtocolError(
                    f"input {name!r} is {dt} but {self.model} v{self.version} takes {spec.datatype}"
                )
            if arr.ndim != len(spec.shape):
                raise ProtocolError(
                    f"input {name!r} has shape {list(arr.shape)} but the model takes rank {len(spec.shape)} "
                    f"{[d if isinstance(d, int) else -1 for d in spec.shape]}"
                )
            for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise ProtocolError(
                        f"input {name!r} has shape {list(arr.shape)} but the model takes "
                        f"{[d if isinstance(d, int) else -1 for d in spec.shape]} (axis {axis} must be {want})"
                    )
            if self.batchable:
                if rows is not None and arr.shape[0] != rows:
                    raise ProtocolError(
                        f"inputs disagree on the batch size: {name!r} has {arr.shape[0]} rows, others {rows}"
                    )
                rows = int(arr.shape[0])
            if self.pads:
                if seq is not None and arr.shape[1] != seq:
                    raise ProtocolError(
                        f"inputs disagree on the sequence length: {name!r} has {arr.shape[1]}, others {seq}"
                    )
                seq = int(arr.shape[1])
        self.limits.check(inputs)
        rows = rows if rows is not None else 1
        if rows == 0:
            raise ProtocolError("a request needs at least one row")
        if self.batchable and rows > self.config.max_batch_size:
            raise ProtocolError(
                f"a request of {rows} rows exceeds max_batch_size {self.config.max_batch_size} of "
                f"{self.model} v{self.version}; split it"
            )
        return rows, seq


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    seq: int | None
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)


def _candidate_settings(path: Path) -> tuple[Any, list[str]]:
    """Deployment settings for the ONNX file at ``path``: its candidate's record when a candidate.json lies beside
    it (a candidate directory or a registry checkout), else decided from the graph on this host."""
    from slimship.runtime.settings import decide_settings, settings_for_candidate

    meta = path.parent / "candidate.json"
    if meta.exists():
        import json

        info = json.loads(meta.read_text()).get("info", {})
        return settings_for_candidate(info, path)
    if path.suffix == ".xml":  # a bare OpenVINO IR
        return settings_for_candidate({}, path)
    return decide_settings(path), []


def _openvino_session(path: Path, settings: Any, model: str, version: str) -> Any:
    """An OpenVINO runtime for the IR at ``path`` seen as a session (:class:`slimship.runtime.session.RuntimeSession`)."""
    from slimship.errors import ServingError, SlimshipError
    from slimship.runtime.openvino_backend import OpenVINORuntime
    from slimship.runtime.session import RuntimeSession

    try:
        rt = OpenVINORuntime(path, settings.intra_op_threads or 1, settings=settings)
    except SlimshipError as err:
        raise ServingError(f"can't load {path} for {model} v{version}: {err}") from err
    return RuntimeSession(rt, rt.output_specs)


def _executorch_session(path: Path, settings: Any, model: str, version: str) -> Any:
    """An ExecuTorch runtime for the candidate's ``.pte`` at ``path`` seen as a session (its inputs, bounds and output
    names come from the candidate's record, so a bare ``.pte`` is refused)."""
    from slimship.candidate import load_candidate
    from slimship.errors import ServingError, SlimshipError
    from slimship.runtime.executorch_backend import ExecuTorchRuntime
    from slimship.runtime.session import RuntimeSession
    from slimship.workload.base import TensorSpec

    try:
        cand = load_candidate(path.parent)
        rec = cand.info["executorch"]
        outputs = rec.get("outputs")
        if not outputs:  # converted before the record named them
            from slimship.workload import resolve_workload

            outputs = [o.name for o in resolve_workload(cand.workload).outputs]
        rt = ExecuTorchRuntime(
            path,
            settings.intra_op_threads or 1,
            inputs=[TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in rec["inputs"]],
            output_names=list(outputs),
            dim_max={str(k): int(v) for k, v in rec["dim_max"].items()},
            settings=settings,
        )
    except (SlimshipError, KeyError, TypeError) as err:
        raise ServingError(
            f"can't load {path} for {model} v{version}: {err!r} (serve an ExecuTorch program as the candidate "
            "directory `convert-executorch` wrote: its record names the program's inputs and bounds)"
        ) from err
    return RuntimeSession(rt)


def _limits_source(path: Path) -> Path:
    """The ONNX graph whose token-id / length limits apply to the model at ``path``: itself, or for an OpenVINO IR or
    an ExecuTorch program the nearest ONNX ancestor of its candidate (none: no limits are read)."""
    if path.suffix not in (".xml", ".pte") or not (path.parent / "candidate.json").exists():
        return path
    from slimship.candidate import load_candidate
    from slimship.errors import CandidateError

    try:
        for cand in load_candidate(path.parent).lineage():
            if cand.format == "onnx" and cand.artifact_path.exists():
                return cand.artifact_path
    except CandidateError:
        pass
    return path


class Endpoint(ModelIO):
    def __init__(
        self,
        model: str,
        version: str,
        onnx_path: str | Path,
        config: BatchingConfig | None = None,
        metrics: Any = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        from slimship.machine import default_threads

        self.model, self.version = model, str(version)
        self.path = Path(onnx_path)
        self.config = config or BatchingConfig()
        self.metrics = metrics
        self.source = source or {"path": str(self.path)}
        total = self.config.threads or default_threads()
        per = max(1, total // self.config.instances)
        from slimship.serve.verify import check_integrity, verify_on_load

        check_integrity(model, self.version, self.path, self.config.verify)
        self.sessions = []
        # the candidate's deployment settings (precision entries re-decided for this host); the serving config owns
        # threads and spinning (BatchingConfig.spinning: on with one instance unless told otherwise)
        try:
            recorded, self.settings_notes = _candidate_settings(self.path)
        except Exception as err:
            from slimship.errors import ServingError

            raise ServingError(
                f"can't decide runtime settings for {model} v{version} ({self.path}): {err}"
            ) from err
        from slimship.serve.config import spins

        self.settings = recorded.with_overrides(threads=per, spinning=spins(self.config))
        self.platform = {"openvino": "openvino", "executorch": "executorch"}.get(
            self.settings.runtime, "onnxruntime_onnx"
        )
        self.sessions = [self._open(self.settings) for _ in range(self.config.instances)]
        #: with several instances, the session a batch runs on when it runs alone: all the threads (None: none)
        self.lone_settings = (
            self.settings.with_overrides(threads=total, spinning=self.config.spinning != "off")
            if self.config.instances > 1 and self.config.lone_batch_threads == "all" and total > per
            else None
        )
        self._lone = None if self.lone_settings is None else self._open(self.lone_settings)
        #: HTTP requests this server has received and not yet answered, this one included (set by the HTTP entry
        #: point; None: not known, e.g. gRPC only): a lone row skips the queue only when it is the only one
        self.requests_open: Callable[[], int] | None = None
        #: the session inline rows run on (opened the first time a row runs inline; see BatchingConfig.inline_session)
        self._inline: Any = None
        self._busy = 0  # batches running now, over all instances
        self._row_ms: float | None = None  # EWMA of a single row's run, in ms (None: not timed yet)
        self.session = self.sessions[0]
        #: the probe's outcome on this host (admin state, /v2/models/{m} parameters, metrics, registry events)
        self.verification = verify_on_load(
            model, self.version, self.path, self.session, self.settings, self.config.verify
        )
        limits_from = _limits_source(self.path)
        # a .pte with no ONNX ancestor has no graph to read limits from (its bounds are checked by its runtime)
        self.limits = InputLimits() if limits_from.suffix == ".pte" else read_input_limits(limits_from)
        self.inputs = [
            WireTensorSpec(i.name, wire_datatype(i.type), tuple(i.shape)) for i in self.session.get_inputs()
        ]
        self.outputs = [
            WireTensorSpec(o.name, wire_datatype(o.type), tuple(o.shape)) for o in self.session.get_outputs()
        ]
        self.batchable = all(len(s.shape) >= 1 and not isinstance(s.shape[0], int) for s in self.inputs)
        seq_dynamic = all(len(s.shape) >= 2 and not isinstance(s.shape[1], int) for s in self.inputs)
        has_mask = any("mask" in s.name.lower() for s in self.inputs)
        self.pads = seq_dynamic and (self.config.pad == "on" or (self.config.pad == "auto" and has_mask))
        # outputs that carry the inputs' sequence axis (cut back to each request's length after padding): axis 1 named
        # like an input's sequence axis, or dynamic and unnamed — never a fixed width that happens to equal the length
        seq_dims = {sp.shape[1] for sp in self.inputs if len(sp.shape) >= 2 and isinstance(sp.shape[1], str)}
        self._seq_outputs = {
            o.name
            for o in self.outputs
            if len(o.shape) >= 2
            and not isinstance(o.shape[1], int)
            and (o.shape[1] in seq_dims or not isinstance(o.shape[1], str))
        }
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = ThreadPoolExecutor(self.config.instances, thread_name_prefix=f"ort-{model}-{version}")
        self.in_flight = 0
        self.ready = False
        self.drift_config: DriftConfig | None = None  # set by whoever builds the endpoint (None: defaults)
        self.drift: Any = None  # its DriftMonitor once attached
        self.stats = ModelStats()

    def _open(self, settings: Any) -> Any:
        """One session of this endpoint's model with ``settings``, on its runtime."""
        if settings.runtime == "openvino":  # an OpenVINO IR, served through the runtime contract
            return _openvino_session(self.path, settings, self.model, self.version)
        if settings.runtime == "executorch":  # an ExecuTorch .pte, served through the runtime contract
            return _executorch_session(self.path, settings, self.model, self.version)
        import onnxruntime as ort

        try:
            return ort.InferenceSession(
                str(self.path), settings.session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            from slimship.errors import ServingError

            raise ServingError(f"can't load {self.path} for {self.model} v{self.version}: {err}") from err

    @property
    def queue_depth(self) -> int:
        """Requests queued for the batcher, not yet in a running batch."""
        return self._queue.qsize() if self._queue is not None else 0

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._tasks:
            self._queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            if self._lone is not None:
                await loop.run_in_executor(self._pool, self._warmup, self._lone)
            for i, sess in enumerate(self.sessions):
                # one warm-up run so the first request doesn't pay for ORT's lazy initialisation
                await loop.run_in_executor(self._pool, self._warmup, sess)
                self._tasks.append(
                    asyncio.create_task(self._batcher(sess), name=f"batcher-{self.model}-{self.version}-{i}")
                )
            self.ready = True

    def _warmup(self, sess: Any) -> None:
        try:
            feeds = {
                s.name: np.zeros(
                    [d if isinstance(d, int) else 1 for d in s.shape], dtype=DATATYPES[s.datatype]
                )
                for s in self.inputs
                if s.datatype != "BYTES"
            }
            if len(feeds) == len(self.inputs):
                sess.run(None, feeds)
        except Exception:  # a model that can't run zeros still serves real inputs
            pass

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, answer those queued or running, then stop the batcher."""
        self.ready = False
        deadline = time.monotonic() + drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._pool.shutdown(wait=True)

    # ---- requests -----------------------------------------------------------------------------
    def runtime_settings(self) -> dict[str, Any]:
        """The deployment settings this endpoint's sessions run with (threads are per model instance)."""
        out = {**self.settings.to_json(), "notes": list(self.settings_notes)}
        if self.lone_settings is not None:
            out["lone_batch_threads"] = self.lone_settings.intra_op_threads
        return out

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._queue is None or not self.ready:
            raise Overloaded(
                f"{self.model} v{self.version} is not ready (loading or shutting down)",
                headers={"Retry-After": "1"},
            )
        rows, seq = self.validate(inputs)
        if self._queue.qsize() >= self.config.max_queue:
            raise Overloaded(
                f"{self.model} v{self.version} is overloaded: {self._queue.qsize()} requests queued "
                f"(max_queue {self.config.max_queue}); retry shortly",
                headers={"Retry-After": "1"},
            )
        fut: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        item = _Item(inputs, rows, seq, fut)
        if self._direct(rows):
            # the batcher would run this row at once and inline: run it here, without the queue's two task switches
            self.in_flight += 1
            try:
                await self._run_batch(self.session, self._queue, [item], direct=True)
            finally:
                self.in_flight -= 1
            return fut.result()
        self.in_flight += 1
        self._queue.put_nowait(item)
        self._gauge()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.config.timeout_s)
        except TimeoutError as err:
            fut.cancel()  # the batcher skips it if it hasn't started
            raise TimedOut(
                f"{self.model} v{self.version} did not answer within {self.config.timeout_s:g} s"
            ) from err
        finally:
            self.in_flight -= 1

    def _gauge(self) -> None:
        if self.metrics is not None and self._queue is not None:
            self.metrics.queue_depth.labels(self.model, self.version).set(self._queue.qsize())

    # ---- the batcher --------------------------------------------------------------------------
    def _fits(self, batch: list[_Item], rows: int, nxt: _Item) -> bool:
        if not self.batchable or rows + nxt.rows > self.config.max_batch_size:
            return False
        first = batch[0]
        for name, arr in nxt.inputs.items():
            ref = first.inputs[name]
            lo = 2 if self.pads else 1
            if arr.shape[lo:] != ref.shape[lo:]:
                return False
        return True

    async def _collect(self, q: asyncio.Queue[_Item], item: _Item) -> tuple[list[_Item], _Item | None]:
        """A batch starting with ``item``: what else is queued (waiting up to max_queue_delay_ms) while it fits; the
        first request that doesn't fit is carried to the next batch."""
        batch, rows = [item], item.rows
        deadline = time.perf_counter() + self.config.max_queue_delay_ms / 1000.0
        while rows < self.config.max_batch_size:
            try:
                nxt = q.get_nowait()
            except asyncio.QueueEmpty:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(q.get(), wait)
                except TimeoutError:
                    break
            if not self._fits(batch, rows, nxt):
                return batch, nxt
            batch.append(nxt)
            rows += nxt.rows
        return batch, None

    def _split(self, live: list[_Item], feeds: dict[str, np.ndarray], outs: list[np.ndarray]) -> None:
        """Answer each request of a batch with its rows of the outputs (cut back to its sequence length)."""
        names = [o.name for o in self.outputs]
        padded = _seq_len(feeds) if self.pads else None
        offset = 0
        for b in live:
            result = {}
            for name, arr in zip(names, outs, strict=True):
                part = arr[offset : offset + b.rows] if self.batchable else arr
                if (
                    padded is not None
                    and b.seq is not None
                    and b.seq != padded
                    and name in self._seq_outputs
                    and part.ndim >= 2
                    and part.shape[1] == padded
                ):
                    part = part[:, : b.seq]  # an output with the sequence axis: back to this request's length
                result[name] = part
            offset += b.rows
            if not b.future.done():
                b.future.set_result(result)

    async def _batcher(self, session: Any) -> None:
        assert self._queue is not None
        q = self._queue
        carry: _Item | None = None
        while True:
            item = carry or await q.get()
            batch, carry = await self._collect(q, item)
            self._gauge()
            live = [b for b in batch if not b.future.done()]  # timed-out requests are dropped here
            if not live:
                continue
            try:
                await self._run_batch(session, q, live)
            # a fault of the server's own (outside the model run): this batch gets a 500, the batcher goes on
            except Exception as err:
                log.exception("batch of %s v%s failed outside the model run", self.model, self.version)
                for b in live:
                    if not b.future.done():
                        b.future.set_exception(err)

    async def _run_batch(
        self, session: Any, q: asyncio.Queue[_Item], live: list[_Item], direct: bool = False
    ) -> None:
        t_start = time.perf_counter_ns()
        started = t_start / 1e9
        feeds = self._merge(live)
        t_merged = time.perf_counter_ns()
        alone = self._busy == 0 and q.empty()  # no other instance busy, nothing waiting
        # alone: the lone-batch session with all the threads (with several instances)
        runner = self._lone if self._lone is not None and alone else session
        rows = sum(b.rows for b in live)
        tiny = self._runs_inline()
        # a tiny model's lone row, or the server's only request (``direct``) of a model whose rows are quick enough
        inline = alone and rows == 1 and (tiny or (direct and self._runs_alone_inline()))
        self._busy += 1
        try:
            if inline:  # on this thread, no hand-off to a worker and back
                outs = (self._inline_runner(runner) if tiny else runner).run(None, feeds)
            else:
                outs = await asyncio.get_running_loop().run_in_executor(self._pool, runner.run, None, feeds)
        except Exception as err:  # one request can fail a batch: find it, answer the others
            await self._isolate(session, live, err)
            return
        finally:
            self._busy -= 1
        t_ran = time.perf_counter_ns()
        if rows == 1:
            self._time_row((t_ran - t_merged) / 1e6)
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.model, self.version).observe(rows)
            where = "inline" if inline else ("lone" if runner is self._lone else "instance")
            self.metrics.batch_runs.labels(self.model, self.version, where).inc()
            for b in live:
                self.metrics.queue_time.labels(self.model, self.version).observe(started - b.enqueued)
        self._split(live, feeds, outs)
        queued = sum(started - b.enqueued for b in live)
        self.stats.execution(
            rows,
            int(queued * 1e9),
            len(live),
            t_merged - t_start,
            t_ran - t_merged,
            time.perf_counter_ns() - t_ran,
        )

    def _direct(self, rows: int) -> bool:
        """Whether a request of ``rows`` rows skips the queue: one row, the only request the server holds (others
        received but not yet parsed would otherwise queue behind it instead of batching with each other), nothing
        queued or running, no queue delay to wait for batch-mates, and the model's rows run inline — what the batcher
        would do with it, minus its two task switches — or, for a model whose rows take up to
        ``alone_inline_below_ms``, the hand-off to a worker thread and back."""
        return (
            rows == 1
            and self.requests_open is not None
            and self.requests_open() <= 1
            and self._busy == 0
            and self._queue is not None
            and self._queue.empty()
            and self.config.max_queue_delay_ms == 0
            and (self._runs_inline() or self._runs_alone_inline())
        )

    def _inline_runner(self, runner: Any) -> Any:
        """The session an inline row runs on: a single-thread ONNX Runtime session of the model (opened on first use;
        a model whose rows run inline is small), else ``runner``."""
        if self.config.inline_session == "instance" or self.settings.runtime != "onnxruntime":
            return runner
        if self._inline is None:
            self._inline = self._open(self.settings.with_overrides(threads=1, spinning=False))
        return self._inline

    def _runs_inline(self) -> bool:
        """Whether a lone row runs on the event loop's thread: its recent runs (EWMA, timed once on a worker first)
        took under ``inline_below_ms``."""
        return self._row_ms is not None and self._row_ms < self.config.inline_below_ms

    def _runs_alone_inline(self) -> bool:
        """Whether the server's only open request, a single row, runs on the event loop's thread on the instance's own
        session: its recent single-row runs took under ``alone_inline_below_ms``."""
        return self._row_ms is not None and self._row_ms < self.config.alone_inline_below_ms

    def _time_row(self, ms: float) -> None:
        self._row_ms = ms if self._row_ms is None else 0.8 * self._row_ms + 0.2 * ms

    async def _isolate(self, session: Any, live: list[_Item], err: Exception) -> None:
        """A batch failed: run its requests one by one, so only the one(s) the model fails on learn why (400 when
        ONNX Runtime calls the input invalid, else the error itself: a 500) and the others are answered."""
        if len(live) == 1:
            self._fail(live[0], err)
            return
        loop = asyncio.get_running_loop()
        for b in live:
            if b.future.done():  # timed out meanwhile
                continue
            t_start = time.perf_counter_ns()
            try:
                outs = await loop.run_in_executor(self._pool, session.run, None, b.inputs)
            except Exception as one:
                self._fail(b, one)
                continue
            t_ran = time.perf_counter_ns()
            self._split([b], b.inputs, outs)
            queued = int((t_start / 1e9 - b.enqueued) * 1e9)
            self.stats.execution(b.rows, queued, 1, 0, t_ran - t_start, time.perf_counter_ns() - t_ran)

    def _fail(self, item: _Item, err: Exception) -> None:
        """Answer ``item`` with the error its own run raised."""
        if item.future.done():
            return
        if _invalid_argument(err):
            detail = str(err).split("Status Message: ", 1)[-1].strip()
            item.future.set_exception(
                ProtocolError(f"{self.model} v{self.version} can't run this input: {detail}")
            )
        else:
            item.future.set_exception(err)

    def _merge(self, batch: list[_Item]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].inputs
        feeds = {}
        longest = max(b.seq or 0 for b in batch)
        for spec in self.inputs:
            parts = []
            for b in batch:
                arr = b.inputs[spec.name]
                if self.pads and arr.shape[1] < longest:
                    pad = [(0, 0)] * arr.ndim
                    pad[1] = (0, longest - arr.shape[1])
                    arr = np.pad(arr, pad)
                parts.append(arr)
            feeds[spec.name] = np.concatenate(parts, axis=0)
        return feeds


def _invalid_argument(err: Exception) -> bool:
    """ONNX Runtime refused the values it was given (INVALID_ARGUMENT): the input's fault, not the server's."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    return isinstance(err, InvalidArgument)


def _seq_len(feeds: dict[str, np.ndarray]) -> int | None:
    arr = next(iter(feeds.values()))
    return int(arr.shape[1]) if arr.ndim >= 2 else None
