"""Runtimes: one ``predict(batch) -> outputs`` contract over PyTorch eager, ONNX Runtime, OpenVINO and ExecuTorch.

``create_runtime(candidate, workload, backend=None, threads=None)`` picks the backend from the
candidate's format unless told (a PyTorch candidate runs on ``torch``; an ONNX one on
``onnxruntime``; an OpenVINO IR on ``openvino``; an ExecuTorch ``.pte`` on ``executorch``). Threads default to the
machine's physical cores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimship.errors import InferenceError
from slimship.runtime.base import Runtime, validate_batch

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload
    from slimship.workload.base import TensorSpec

__all__ = ["BACKENDS", "Runtime", "create_runtime", "default_backend", "validate_batch"]

BACKENDS = ("torch", "onnxruntime", "openvino", "executorch")

#: the runtime each candidate format runs on unless told otherwise
_DEFAULT_BACKEND = {
    "torch": "torch",
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "executorch": "executorch",
}


_FORMAT_NAMES = {"onnx": "an ONNX", "openvino": "an OpenVINO IR", "executorch": "an ExecuTorch"}


def default_backend(fmt: str) -> str:
    """The runtime a candidate of format ``fmt`` runs on by default."""
    return _DEFAULT_BACKEND.get(fmt, "onnxruntime")


def create_runtime(
    candidate: Candidate,
    workload: Workload,
    backend: str | None = None,
    threads: int | None = None,
    spin: bool = True,
) -> Runtime:
    """``spin=False`` makes ONNX Runtime's idle threads block instead of spinning (used when several
    runtimes share the cores, as in an interleaved benchmark)."""
    from slimship.machine import default_threads

    threads = threads or default_threads()
    if threads < 1:
        raise InferenceError(f"threads must be ≥ 1, got {threads}")
    backend = backend or default_backend(candidate.format)
    if backend not in BACKENDS:
        raise InferenceError(f"unknown runtime {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "torch":
        if candidate.format != "torch":
            raise InferenceError(
                f"candidate {candidate.id} is {_FORMAT_NAMES.get(candidate.format, candidate.format)} model; run it "
                "with runtime "
                f"{default_backend(candidate.format)!r} (the torch runtime runs PyTorch candidates)"
            )
        from slimship.candidate import load_torch_model
        from slimship.runtime.torch_backend import TorchRuntime

        return TorchRuntime(
            load_torch_model(candidate, workload),
            workload.inputs,
            [o.name for o in workload.outputs],
            threads,
        )
    if backend == "openvino" or candidate.format == "openvino":
        return _openvino_runtime(candidate, workload, backend, threads)
    if backend == "executorch" or candidate.format == "executorch":
        return _executorch_runtime(candidate, workload, backend, threads)
    if candidate.format != "onnx":
        raise InferenceError(
            f"candidate {candidate.id} is a PyTorch model; export it first (`slimship export`) to run it on onnxruntime"
        )
    from slimship.runtime.ort_backend import OrtRuntime
    from slimship.runtime.settings import settings_for_candidate

    settings, _notes = settings_for_candidate(candidate.info, candidate.artifact_path)
    rt = OrtRuntime(candidate.artifact_path, threads, spin=spin, settings=settings)
    rt.inputs = _merge_specs(rt.inputs, workload, candidate)
    return rt


def _openvino_runtime(candidate: Candidate, workload: Workload, backend: str, threads: int) -> Runtime:
    if candidate.format != "openvino" or backend != "openvino":
        raise InferenceError(
            f"candidate {candidate.id} is a {candidate.format} model and runtime {backend!r} was asked for; "
            "an OpenVINO IR runs on runtime 'openvino', and an ONNX model becomes one with the `convert-openvino` pass"
        )
    from slimship.runtime.openvino_backend import OpenVINORuntime
    from slimship.runtime.settings import settings_for_candidate

    settings, _notes = settings_for_candidate(candidate.info, candidate.artifact_path)
    rt = OpenVINORuntime(
        candidate.artifact_path,
        threads,
        settings=settings,
        output_names=tuple(o.name for o in workload.outputs),
    )
    rt.inputs = _merge_specs(rt.inputs, workload, candidate)
    return rt


def _executorch_runtime(candidate: Candidate, workload: Workload, backend: str, threads: int) -> Runtime:
    if candidate.format != "executorch" or backend != "executorch":
        raise InferenceError(
            f"candidate {candidate.id} is a {candidate.format} model and runtime {backend!r} was asked for; "
            "an ExecuTorch program (.pte) runs on runtime 'executorch', and a PyTorch model becomes one with the "
            "`convert-executorch` pass"
        )
    from slimship.runtime.executorch_backend import ExecuTorchRuntime
    from slimship.runtime.settings import settings_for_candidate
    from slimship.workload.base import TensorSpec

    record = candidate.info.get("executorch") or {}
    try:
        inputs = [TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in record["inputs"]]
        dim_max = {str(k): int(v) for k, v in record["dim_max"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise InferenceError(
            f"candidate {candidate.id} does not record its ExecuTorch inputs (info.executorch.inputs / dim_max: "
            f"{err!r}); convert it again with the `convert-executorch` pass"
        ) from err
    settings, _notes = settings_for_candidate(candidate.info, candidate.artifact_path)
    return ExecuTorchRuntime(
        candidate.artifact_path,
        threads,
        inputs=inputs,
        output_names=[o.name for o in workload.outputs],
        dim_max=dim_max,
        settings=settings,
    )


def _merge_specs(
    model_specs: tuple[TensorSpec, ...], workload: Workload, candidate: Candidate
) -> tuple[TensorSpec, ...]:
    """The model's graph is the truth for which inputs exist, their dtypes and fixed dims; the workload
    names the dynamic dims. A workload whose fixed dims contradict the model is the wrong workload."""
    wl = {s.name: s for s in workload.inputs}
    merged = []
    for spec in model_specs:
        w = wl.get(spec.name)
        if w is None or len(w.shape) != len(spec.shape):
            merged.append(spec)
            continue
        for axis, (m, d) in enumerate(zip(spec.shape, w.shape, strict=True)):
            if isinstance(m, int) and isinstance(d, int) and m != d:
                raise InferenceError(
                    f"candidate {candidate.id} expects {spec.name!r} of shape {list(spec.shape)} but workload "
                    f"{workload.name!r} provides {list(w.shape)} (axis {axis}: {m} vs {d}); is this the candidate's "
                    f"workload? It was made for {candidate.workload.get('name')!r}"
                )
        shape = tuple(m if isinstance(m, int) else d for m, d in zip(spec.shape, w.shape, strict=True))
        merged.append(type(spec)(spec.name, spec.dtype, shape))
    return tuple(merged)
