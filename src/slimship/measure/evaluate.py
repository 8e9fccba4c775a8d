"""Task quality and fidelity to the original model, for any candidate on any runtime.

The original model's evaluation is cached across runs (``$SLIMSHIP_CACHE_DIR/evaluations/``), keyed by what its
figures depend on: the workload's fingerprint (model and data), the evaluation limit, the artifact's sha256, the
runtime backend, and the versions of slimship and of the packages that compute the numbers. Change any of them
and it is measured again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimship._util import cache_dir

if TYPE_CHECKING:
    from collections.abc import Sequence

    from slimship.candidate import Candidate
    from slimship.runtime import Runtime
    from slimship.workload import Workload


def collect_outputs(
    runtime: Runtime | Sequence[Runtime],
    workload: Workload,
    limit: int | None = None,
    desc: str = "evaluating",
    progress: bool = True,
    batch_invariant: bool = False,
) -> dict[str, np.ndarray]:
    """Run every evaluation sample through ``runtime``; outputs come back in evaluation order. Several runtimes
    (sessions of one model, see :func:`evaluation_runtimes`) take whole batches from one queue side by side, each
    in a thread of its own; the first error of any of them is raised here. ``batch_invariant``: the model's answers
    don't depend on their batch-mates (:func:`answers_batch_invariant`), so the workload may batch for speed."""
    import threading

    from tqdm.auto import tqdm

    from slimship.runtime import Runtime

    runtimes = [runtime] if isinstance(runtime, Runtime) else list(runtime)
    n = workload.eval_size(limit)
    outputs: dict[str, np.ndarray] = {}
    filled = np.zeros(n, dtype=bool)
    batches = iter(workload.fast_eval_batches(limit) if batch_invariant else workload.eval_batches(limit))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(rt: Runtime, bar: Any) -> None:
        while not errors:
            with lock:
                item = next(batches, None)
            if item is None:
                return
            idx, batch = item
            try:
                result = rt.predict(batch)
            except BaseException as err:  # re-raised below, in the caller's thread
                errors.append(err)
                return
            with lock:
                for name, arr in result.items():
                    if name not in outputs:
                        outputs[name] = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
                    outputs[name][idx] = arr
                filled[idx] = True
                bar.update(len(idx))

    with tqdm(total=n, desc=desc, unit="sample", disable=None if progress else True, leave=False) as bar:
        others = [threading.Thread(target=work, args=(rt, bar), daemon=True) for rt in runtimes[1:]]
        for t in others:
            t.start()
        work(runtimes[0], bar)
        for t in others:
            t.join()
    if errors:
        raise errors[0]
    if not filled.all():  # a workload bug, not user input
        raise RuntimeError(f"workload {workload.name} left {int((~filled).sum())} evaluation samples out")
    return outputs


def answers_batch_invariant(candidate: Candidate) -> bool:
    """Whether a candidate's answer to a sample can't depend on the other samples of its batch: the original, and
    ONNX graphs without DynamicQuantizeLinear (per-tensor activation scales computed over the whole batch). Other
    formats: assumed dependent (evaluated in the workload's fixed batches)."""
    if candidate.pass_name is None and candidate.format == "torch":
        return True
    if candidate.format != "onnx":
        return False
    import onnx

    model = onnx.load(str(candidate.artifact_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    return "DynamicQuantizeLinear" not in ops


def _reference_path(workload: Workload, limit: int | None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", workload.name)[:60]
    return cache_dir() / "reference-outputs" / f"{safe}-{workload.fingerprint()}-{limit or 'all'}.npz"


def reference_outputs(
    workload: Workload, limit: int | None = None, threads: int | None = None, progress: bool = True
) -> dict[str, np.ndarray]:
    """The original model's outputs on the evaluation data (PyTorch if the workload has a PyTorch
    model, else the original ONNX on ONNX Runtime). Cached per workload fingerprint and limit."""
    path = _reference_path(workload, limit)
    if path.exists():
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    from slimship.machine import default_threads
    from slimship.runtime.ort_backend import OrtRuntime
    from slimship.runtime.torch_backend import TorchRuntime

    threads = threads or default_threads()
    if workload.has_torch_model:
        rt: Runtime = TorchRuntime(
            workload.build_model(), workload.inputs, [o.name for o in workload.outputs], threads
        )
    else:
        onnx_path = workload.original_onnx()
        assert onnx_path is not None  # has_torch_model is False only for ONNX workloads
        rt = OrtRuntime(onnx_path, threads)
    outputs = collect_outputs(
        rt, workload, limit, desc="reference outputs", progress=progress, batch_invariant=True
    )
    _save_reference(workload, limit, outputs)
    return outputs


def _save_reference(
    workload: Workload,
    limit: int | None,
    outputs: dict[str, np.ndarray],
    source: dict[str, Any] | None = None,
) -> None:
    """Cache the reference outputs; ``source`` (what produced them, when not the original itself) goes beside
    them as JSON so an evaluation can say what its fidelity was measured against."""
    from slimship._util import write_json_atomic

    path = _reference_path(workload, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **outputs)  # type: ignore[arg-type]
    tmp.replace(path)
    if source is not None:
        write_json_atomic(path.with_suffix(".json"), source)
    else:
        path.with_suffix(".json").unlink(missing_ok=True)


def reference_source(workload: Workload, limit: int | None) -> dict[str, Any] | None:
    """What produced the cached reference outputs when it was not the original itself (see
    :func:`evaluate_original_via`); None for the original's own outputs or no cache."""
    import json

    side = _reference_path(workload, limit).with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else None


def cached_original_evaluation(
    candidate: Candidate, workload: Workload, limit: int | None
) -> dict[str, Any] | None:
    """The original's evaluation from the cross-run cache, or None."""
    import json

    from slimship.runtime import default_backend

    path = original_evaluation_path(candidate, workload, default_backend(candidate.format), limit)
    if not path.exists():
        return None
    return {**json.loads(path.read_text()), "candidate": candidate.id, "cached_from": str(path)}


#: backends whose sessions each keep their own thread pool, so several can run batches at once in one process
#: (PyTorch's and ExecuTorch's pools are process-wide; OpenVINO runs one compiled model)
PARALLEL_EVALUATION_BACKENDS = ("onnxruntime",)


def evaluation_runtimes(
    candidate: Candidate, workload: Workload, backend: str | None, threads: int | None
) -> list[Runtime]:
    """The runtimes an evaluation runs on. On ONNX Runtime: one single-thread session per thread, each running
    whole batches (MiniLM on 2 AVX2 cores, 640 texts in batches of 32: 4–5 % faster than one 2-thread session —
    no intra-op synchronisation per operator); the outputs are the same model's, so quality and fidelity are those
    of the candidate with its recorded settings (threads are a speed setting, never a precision one). Elsewhere
    one runtime with ``threads``."""
    from slimship.machine import default_threads
    from slimship.runtime import create_runtime, default_backend

    n = threads or default_threads()
    if (backend or default_backend(candidate.format)) not in PARALLEL_EVALUATION_BACKENDS or n < 2:
        return [create_runtime(candidate, workload, backend, n)]
    # idle threads block: a spinning session would steal the core of the one beside it
    return [create_runtime(candidate, workload, backend, 1, spin=False) for _ in range(n)]


def _describe(runtimes: Sequence[Runtime]) -> dict[str, Any]:
    info = dict(runtimes[0].describe())
    if len(runtimes) > 1:
        info["threads"] = len(runtimes)
        info["sessions"] = f"{len(runtimes)} single-thread sessions side by side, whole batches each"
    return info


def _close(runtimes: Sequence[Runtime]) -> None:
    for rt in runtimes:
        rt.close()


def _timed_outputs(
    rt: Runtime | Sequence[Runtime],
    workload: Workload,
    limit: int | None,
    desc: str,
    progress: bool,
    batch_invariant: bool = False,
) -> tuple[Any, float]:
    """The runtime's outputs on the evaluation inputs, and the seconds they took."""
    t0 = time.perf_counter()
    outputs = collect_outputs(
        rt, workload, limit, desc=desc, progress=progress, batch_invariant=batch_invariant
    )
    return outputs, time.perf_counter() - t0


def _evaluation_record(
    candidate: Candidate,
    rts: Sequence[Runtime],
    workload: Workload,
    limit: int | None,
    outputs: Any,
    reference: Any,
    seconds: float,
) -> dict[str, Any]:
    """One evaluation's figures: the workload's quality metrics and the fidelity to the reference outputs."""
    return {
        "candidate": candidate.id,
        "candidate_name": candidate.name,
        "runtime": _describe(rts),
        "samples": workload.eval_size(limit),
        "limit": limit,
        "quality": workload.quality(outputs, limit),
        "fidelity": workload.fidelity(outputs, reference),
        "primary_metric": workload.primary_metric,
        "seconds": round(seconds, 2),
    }


def evaluate_original_via(
    original: Candidate,
    proxy: Candidate,
    workload: Workload,
    max_abs_error: float,
    limit: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The original's evaluation measured on ``proxy``: a descendant verified equal to it within float tolerance
    (export, optimize: max |Δ| ≈ 1e-7) that runs faster (MiniLM on 2 AVX2 cores: ONNX Runtime's fused graph vs
    PyTorch eager, ≈ 0.8x the time). The proxy's outputs become the workload's cached reference outputs, with their
    source recorded beside them, and the result is cached under the original's key and says where it came from in
    ``measured_on``."""
    from slimship._util import write_json_atomic
    from slimship.runtime import default_backend

    cached = cached_original_evaluation(original, workload, limit)
    if cached is not None:
        return cached
    rts = evaluation_runtimes(proxy, workload, None, threads)
    outputs, seconds = _timed_outputs(
        rts,
        workload,
        limit,
        f"eval {original.name} via {proxy.name}",
        progress,
        answers_batch_invariant(proxy),
    )
    _close(rts)
    measured_on = {
        "candidate": proxy.id,
        "candidate_name": proxy.name,
        "runtime": _describe(rts),
        "verified_equal_max_abs_error": max_abs_error,
        "why": "a descendant verified equal to the original within float tolerance, on a faster runtime",
    }
    if _reference_path(workload, limit).exists():
        reference = reference_outputs(workload, limit, threads, progress)
    else:
        _save_reference(
            workload, limit, outputs, source={"measured_on": measured_on, "original": original.id}
        )
        reference = outputs
    result = {
        **_evaluation_record(original, rts, workload, limit, outputs, reference, seconds),
        "measured_on": measured_on,
    }
    path = original_evaluation_path(original, workload, default_backend(original.format), limit)
    write_json_atomic(path, {**result, "cache_key": path.stem})
    return result


def original_evaluation_key(candidate: Candidate, workload: Workload, backend: str, limit: int | None) -> str:
    """The cache key of an original model's evaluation: everything its figures depend on."""
    from slimship import __version__
    from slimship._util import sha256_text, stable_json
    from slimship.machine import package_versions

    return sha256_text(
        "evaluation/1",
        workload.name,
        workload.fingerprint(),
        str(limit),
        candidate.artifact_sha256,
        backend,
        __version__,
        stable_json(package_versions()),
    )[:20]


def original_evaluation_path(
    candidate: Candidate, workload: Workload, backend: str, limit: int | None
) -> Path:
    """Where the original's evaluation is cached (see :func:`original_evaluation_key`)."""
    key = original_evaluation_key(candidate, workload, backend, limit)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", workload.name)[:60]
    return cache_dir() / "evaluations" / f"{safe}-{key}.json"


def evaluate(
    candidate: Candidate,
    workload: Workload,
    backend: str | None = None,
    threads: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quality (the workload's task metrics) and fidelity (agreement with the original's outputs).

    The original (a candidate made by no pass) is measured once per cache key (see
    :func:`original_evaluation_key`); a cached evaluation says so in ``cached_from``."""
    import json

    from slimship._util import write_json_atomic

    cache_path = None
    if candidate.pass_name is None:
        from slimship.runtime import default_backend

        chosen = backend or default_backend(candidate.format)
        cache_path = original_evaluation_path(candidate, workload, chosen, limit)
        if cache_path.exists():
            cached = json.loads(cache_path.read_text())
            return {**cached, "candidate": candidate.id, "cached_from": str(cache_path)}
    rts = evaluation_runtimes(candidate, workload, backend, threads)
    # the original model on its own runtime *is* the reference: run it once, not twice
    is_reference = candidate.pass_name is None and rts[0].backend == (
        "torch" if workload.has_torch_model else "onnxruntime"
    )
    desc = f"eval {candidate.name}@{rts[0].backend}"
    invariant = answers_batch_invariant(candidate)
    if is_reference and not _reference_path(workload, limit).exists():
        outputs, seconds = _timed_outputs(rts, workload, limit, desc, progress, invariant)
        _save_reference(workload, limit, outputs)
        reference = outputs
    else:
        reference = reference_outputs(workload, limit, threads, progress)
        outputs, seconds = _timed_outputs(rts, workload, limit, desc, progress, invariant)
    _close(rts)
    result = _evaluation_record(candidate, rts, workload, limit, outputs, reference, seconds)
    source = reference_source(workload, limit)
    if (
        source is not None
    ):  # fidelity against a verified-equal stand-in of the original, not the original itself
        result["reference_outputs_from"] = source["measured_on"]
    if cache_path is not None:
        write_json_atomic(cache_path, {**result, "cache_key": cache_path.stem})
    return result
