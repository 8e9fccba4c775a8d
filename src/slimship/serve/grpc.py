"""The Open Inference Protocol over gRPC: KServe's ``inference.GRPCInferenceService`` (ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer with typed ``contents`` or ``raw_input_contents``, and
Triton's ModelStatistics — the statistics extension, :mod:`slimship.serve.stats`), what ``tritonclient.grpc`` and
KServe's gRPC client speak, on a second port beside the HTTP app.

It is a second front end over the same :class:`~slimship.serve.server.Server`: the same routing and traffic policy
(a sticky header is read from the call's metadata), the same endpoint batching and validation (input names, shapes,
token ids and sequence limits), limits (``max_body_bytes`` caps a message, ``max_id_chars`` the ids), inference token
(``authorization: Bearer <token>`` metadata) and metrics (``slimship_requests`` etc. per model, and
``slimship_grpc_requests`` by method and code). It runs on grpc.aio in uvicorn's event loop, entered and exited by
the app's lifespan.

Messages come from the protocol's own ``.proto`` (``proto/grpc_predict_v2.proto``), loaded into a *private*
descriptor pool from the serialized descriptor in :mod:`slimship.serve.oip_descriptor`: nothing is registered in
protobuf's global pool, so this module coexists with kserve's and tritonclient's generated modules (which clash with
each other). Requests are decoded here, not by gRPC, so a message that isn't valid protobuf is INVALID_ARGUMENT;
messages from ``limits.parse_in_process_bytes`` up are decoded and converted in a worker thread, in pieces, so the
event loop goes on meanwhile (a 64 MB message of typed FP32 contents takes seconds to convert; raw contents don't).

Errors map as the HTTP statuses do: 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 403 → PERMISSION_DENIED,
404 → NOT_FOUND, 408/504 → DEADLINE_EXCEEDED, 409 → FAILED_PRECONDITION, 413/429 → RESOURCE_EXHAUSTED,
503 → UNAVAILABLE (with ``retry-after`` trailing metadata); anything unexpected is logged and INTERNAL.
Outputs are always answered in ``raw_output_contents`` (as Triton does).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimship.errors import ServingError, SlimshipError
from slimship.serve.protocol import (
    DATATYPES,
    ProtocolError,
    Unauthorized,
    brief,
    check_shape,
    datatype_of,
    tensor_from_raw,
    tensor_to_raw,
)
from slimship.serve.server import Server

log = logging.getLogger("slimship.serve")

SERVICE = "inference.GRPCInferenceService"
#: the typed field of InferTensorContents each datatype travels in (FP16 has none: raw_input_contents only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: the numpy type a typed field's values are read as before narrowing to the input's datatype
_FIELD_DTYPE = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
#: longest error detail sent (the status message is a trailer; peers cap trailers at 8 KB by default)
MAX_DETAIL = 2000
#: HTTP status of a ProtocolError → gRPC status code name
STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_code_name(http_status: int) -> str:
    """The gRPC status code (name) for an HTTP status the server refuses a request with."""
    if http_status in STATUS_CODES:
        return STATUS_CODES[http_status]
    return "INVALID_ARGUMENT" if http_status < 500 else "INTERNAL"


@dataclass(frozen=True)
class Messages:
    """The protocol's message classes, from the private descriptor pool."""

    pool: Any

    def __getattr__(self, name: str) -> Any:
        return _message_class(self.pool, name)


@functools.cache
def _message_class(pool: Any, name: str) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))


@functools.cache
def messages() -> Messages:
    """The message classes (built once per process, in a pool of their own)."""
    from google.protobuf import descriptor_pool

    from slimship.serve.oip_descriptor import FILE_DESCRIPTOR

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(FILE_DESCRIPTOR)
    return Messages(pool)


@dataclass
class GrpcRequest:
    """A decoded ModelInferRequest: its inputs and the outputs it asks for (None: all)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None


#: typed values converted per chunk: a conversion is one C loop holding the GIL, so a large one is cut into pieces
#: (when it runs in a worker thread, the event loop gets the GIL between pieces)
CHUNK = 1 << 16


def _array(values: Any, dtype: Any) -> np.ndarray:
    """A repeated protobuf field as a numpy array."""
    if len(values) <= CHUNK:
        return np.asarray(values, dtype=dtype)
    out = np.empty(len(values), dtype=dtype)
    for i in range(0, len(values), CHUNK):
        out[i : i + CHUNK] = values[i : i + CHUNK]
    return out


def _typed_input(name: str, dt: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    field = CONTENTS.get(dt)
    if field is None:
        raise ProtocolError(
            f"input {name!r}: {dt} has no typed contents field; send it in raw_input_contents"
        )
    for other in set(CONTENTS.values()) - {field}:
        if len(getattr(contents, other)):
            raise ProtocolError(f"input {name!r} is {dt}, whose values go in contents.{field}, not {other}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(
            f"input {name!r}: shape {list(shape)} needs {count} values, contents.{field} has {len(values)}"
        )
    if dt == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide = _array(values, _FIELD_DTYPE[field])
    target = np.dtype(DATATYPES[dt])
    if target.kind in "iu" and wide.size and target != wide.dtype:
        info = np.iinfo(target)
        lo, hi = wide.min(), wide.max()
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ProtocolError(f"input {name!r}: value {int(bad)} is out of range for {dt}")
    return wide.astype(target, copy=False).reshape(shape)


def parse_infer_request(msg: Any, max_id_chars: int) -> GrpcRequest:
    """The inputs of a ModelInferRequest, checked as the HTTP parser checks a body (400 for anything malformed)."""
    if len(msg.id) > max_id_chars:
        raise ProtocolError(f"`id` is {len(msg.id)} characters; at most {max_id_chars}")
    if not msg.inputs:
        raise ProtocolError("an infer request needs at least one input (ModelInferRequest.inputs is empty)")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; give one per input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(msg.inputs):
        name = t.name
        if not name:
            raise ProtocolError(f"inputs[{i}] has no name")
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        if t.datatype not in DATATYPES:
            raise ProtocolError(
                f"input {name!r}: unknown datatype {brief(t.datatype)}; datatypes: {sorted(DATATYPES)}"
            )
        shape = check_shape(t.shape, name)
        if raw:
            if t.HasField("contents"):
                raise ProtocolError(f"input {name!r} has both contents and raw_input_contents; give one")
            inputs[name] = tensor_from_raw(name, t.datatype, shape, raw[i])
        else:
            inputs[name] = _typed_input(name, t.datatype, shape, t.contents)
    outputs = [o.name for o in msg.outputs] or None
    return GrpcRequest(msg.id or None, inputs, outputs)


def encode_infer_response(
    model: str, version: str, request: GrpcRequest, outputs: dict[str, np.ndarray]
) -> Any:
    """A ModelInferResponse with every asked-for output in raw_output_contents."""
    wanted = request.outputs if request.outputs is not None else list(outputs)
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise ProtocolError(
            f"unknown output(s) {unknown} requested; {model} v{version} has outputs {sorted(outputs)}"
        )
    resp = messages().ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    for name in dict.fromkeys(wanted):
        arr = outputs[name]
        t = resp.outputs.add()
        t.name, t.datatype = name, datatype_of(arr)
        t.shape.extend(int(d) for d in arr.shape)
        resp.raw_output_contents.append(tensor_to_raw(arr))
    return resp


def _metadata(context: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


Handler = Callable[[Any, Any], Awaitable[Any]]


class GrpcFrontend:
    """The gRPC service over a :class:`Server`, as an async context manager (started on enter, stopped on exit)."""

    def __init__(self, server: Server, host: str, port: int, grace_s: float = 30.0) -> None:
        self.server, self.host, self.port, self.grace_s = server, host, port, grace_s
        self._grpc: Any = None

    # ---- the calls -------------------------------------------------------------------------------
    async def server_live(self, msg: Any, context: Any) -> Any:
        return messages().ServerLiveResponse(live=True)

    async def server_ready(self, msg: Any, context: Any) -> Any:
        s = self.server
        ok = s.started and all(ep.ready for g in s.models.values() for ep in g.versions.values())
        return messages().ServerReadyResponse(ready=ok)

    async def server_metadata(self, msg: Any, context: Any) -> Any:
        from slimship import __version__
        from slimship.serve.http import EXTENSIONS, SERVER_NAME

        exts = [e for e in EXTENSIONS if e != "binary_tensor_data"]
        return messages().ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=exts)

    def _target(self, name: str, version: str) -> Any:
        if not name:
            raise ProtocolError("`name` is empty; give the model's name")
        group = self.server.group(name)
        return self.server.endpoint(name, version or group.default_version())

    async def model_ready(self, msg: Any, context: Any) -> Any:
        return messages().ModelReadyResponse(ready=self._target(msg.name, msg.version).ready)

    async def model_metadata(self, msg: Any, context: Any) -> Any:
        ep = self._target(msg.name, msg.version)
        meta = ep.metadata()
        m = messages()
        resp = m.ModelMetadataResponse(
            name=msg.name,
            platform=meta["platform"],
            versions=self.server.group(msg.name).labels() if not msg.version else [ep.version],
        )
        for key in ("inputs", "outputs"):
            for spec in meta[key]:
                t = getattr(resp, key).add()
                t.name, t.datatype = spec["name"], spec["datatype"]
                t.shape.extend(int(d) for d in spec["shape"])
        return resp

    def _authorize(self, context: Any, what: str) -> dict[str, str]:
        """The call's metadata, once its token is checked (inference and statistics need it when one is set)."""
        md = _metadata(context)
        if not self.server.token_ok(md.get("authorization")):
            raise Unauthorized(f"{what} needs `authorization: Bearer <token>` in the call's metadata")
        return md

    async def model_statistics(self, msg: Any, context: Any) -> Any:
        """Triton's statistics extension: every version of every model (no name), of one model, or one version."""
        from google.protobuf import json_format

        self._authorize(context, "statistics")
        if msg.version and not msg.name:
            raise ProtocolError("`version` is given without `name`; give the model's name too")
        stats = self.server.statistics(msg.name or None, msg.version or None)
        return json_format.ParseDict({"model_stats": stats}, messages().ModelStatisticsResponse())

    async def model_infer(self, msg: Any, context: Any) -> Any:
        t0 = time.perf_counter()
        s = self.server
        md = self._authorize(context, "inference")
        rid = md.get("x-request-id")
        if rid is not None and len(rid) > s.limits.max_id_chars:
            raise ProtocolError(f"x-request-id is {len(rid)} characters; at most {s.limits.max_id_chars}")
        if msg.ByteSize() < s.limits.parse_in_process_bytes:
            req = parse_infer_request(msg, s.limits.max_id_chars)
        else:  # typed contents convert element by element: off the event loop (raw contents are cheap either way)
            req = await asyncio.to_thread(parse_infer_request, msg, s.limits.max_id_chars)
        name, version = msg.model_name, msg.model_version or None
        if not name:
            raise ProtocolError("model_name is empty; give the model's name")
        sticky = s.group(name).policy.sticky_header
        ep = s.endpoint(name, version, md.get(sticky.lower()) if sticky else None)
        resp = await s.run_inference(
            name,
            ep,
            version is None,
            req.inputs,
            lambda outputs: encode_infer_response(name, ep.version, req, outputs),
            t0,
        )
        await s.remember(req.id, rid or uuid.uuid4().hex, name, ep.version)
        return resp

    # ---- plumbing --------------------------------------------------------------------------------
    def _guard(self, method: str, request_type: str, fn: Handler) -> Callable[[bytes, Any], Awaitable[Any]]:
        """``fn`` as a gRPC handler: the request decoded here, errors mapped to status codes, the call counted."""
        import grpc
        from google.protobuf.message import DecodeError

        async def handler(request: bytes, context: Any) -> Any:
            code, detail = "OK", ""
            try:
                decode = getattr(messages(), request_type).FromString
                if len(request) < self.server.limits.parse_in_process_bytes:
                    msg = decode(request)
                else:
                    msg = await asyncio.to_thread(decode, request)
                return await fn(msg, context)
            except DecodeError as err:
                code, detail = "INVALID_ARGUMENT", f"the request is not a valid {request_type}: {err}"
            except ProtocolError as err:
                code, detail = status_code_name(err.status), str(err)
                if "Retry-After" in err.headers:
                    context.set_trailing_metadata((("retry-after", err.headers["Retry-After"]),))
            except SlimshipError as err:
                code, detail = "INVALID_ARGUMENT", str(err)
            except Exception:  # opaque to the client, whole in the log
                ref = uuid.uuid4().hex
                log.exception("unexpected error in gRPC %s (reference %s)", method, ref)
                code, detail = "INTERNAL", f"internal server error (reference {ref})"
            finally:
                self.server.metrics.grpc.labels(method, code).inc()
            if (
                len(detail) > MAX_DETAIL
            ):  # it travels in a trailer: a hostile name echoed whole could overflow it
                detail = detail[: MAX_DETAIL - 1] + "…"
            await context.abort(getattr(grpc.StatusCode, code), detail)

        return handler

    def handlers(self) -> Any:
        import grpc

        calls: dict[str, tuple[str, Handler]] = {
            "ServerLive": ("ServerLiveRequest", self.server_live),
            "ServerReady": ("ServerReadyRequest", self.server_ready),
            "ServerMetadata": ("ServerMetadataRequest", self.server_metadata),
            "ModelReady": ("ModelReadyRequest", self.model_ready),
            "ModelMetadata": ("ModelMetadataRequest", self.model_metadata),
            "ModelInfer": ("ModelInferRequest", self.model_infer),
            "ModelStatistics": ("ModelStatisticsRequest", self.model_statistics),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                method: grpc.unary_unary_rpc_method_handler(
                    self._guard(method, req, fn), response_serializer=lambda m: m.SerializeToString()
                )
                for method, (req, fn) in calls.items()
            },
        )

    async def __aenter__(self) -> GrpcFrontend:
        import grpc

        limit = self.server.limits.max_body_bytes
        srv = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
        )
        srv.add_generic_rpc_handlers((self.handlers(),))
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        try:
            self.port = srv.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as err:
            raise ServingError(
                f"can't listen for gRPC on {host}:{self.port} ({err}); pick another --grpc-port"
            ) from err
        await srv.start()
        self._grpc = srv
        log.info(json.dumps({"event": "grpc_listening", "host": self.host, "port": self.port}))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.grace_s)
            self._grpc = None
