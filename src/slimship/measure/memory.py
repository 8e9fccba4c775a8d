"""Peak memory of one candidate on one runtime, measured in a fresh process.

In-process numbers mix every model a process has loaded, so each candidate is loaded in its own
child process: RSS after imports and workload set-up (the baseline), after loading the model, and
the peak (``ru_maxrss``) after one batch at the given size.

    python -m slimship.measure.memory CANDIDATE_DIR --backend onnxruntime --threads 2 --batch-size 32 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from slimship.errors import InferenceError, SlimshipError


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak covers only what follows (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_in_child(
    candidate_dir: str,
    backend: str,
    threads: int,
    batch_size: int,
    seq_len: int | None,
    artifact: str | None = None,
    workload_ref: dict[str, Any] | None = None,
    inputs_npz: str | None = None,
) -> dict[str, Any]:
    """Peak memory measured in a fresh process. ``artifact`` + ``workload_ref``: a plain model file (a ``.onnx``
    given to bench directly) that has no candidate.json for the child to read. A failure is an InferenceError
    with the child's one-line reason (never its traceback)."""
    cmd = [
        sys.executable,
        "-m",
        "slimship.measure.memory",
        candidate_dir,
        "--backend",
        backend,
        "--threads",
        str(threads),
        "--batch-size",
        str(batch_size),
    ]
    if seq_len:
        cmd += ["--seq-len", str(seq_len)]
    if artifact:
        cmd += ["--artifact", artifact, "--workload-json", json.dumps(workload_ref or {})]
    if inputs_npz:
        cmd += ["--inputs", inputs_npz]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    try:
        record = json.loads(last)
    except json.JSONDecodeError:
        record = None
    if proc.returncode != 0 or not isinstance(record, dict) or "error" in record:
        reason = (
            record["error"]
            if isinstance(record, dict) and "error" in record
            else f"the probe process exited with code {proc.returncode}"
            + (" (killed: out of memory?)" if proc.returncode < 0 else "")
        )
        raise InferenceError(f"memory probe for {candidate_dir} on {backend} failed: {reason}")
    return record


def _candidate(args: argparse.Namespace) -> Any:
    from slimship.candidate import Candidate, load_candidate

    if not args.artifact:
        return load_candidate(args.candidate)
    path = Path(args.artifact)
    return Candidate(
        path=path.parent.resolve(),
        id=f"file-{path.stem}",
        name=path.stem,
        format="onnx",
        artifact=path.name,
        workload=json.loads(args.workload_json),
        artifact_sha256="",
    )


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    from slimship.runtime import create_runtime
    from slimship.workload import resolve_workload

    cand = _candidate(args)
    if args.inputs and args.backend == "onnxruntime":
        # the batch comes from the parent: the workload (a factory's build(), a model download) isn't rebuilt here
        import numpy as np

        with np.load(args.inputs) as npz:
            batch = {k: npz[k] for k in npz.files}
        workload = None
    else:
        workload = resolve_workload(cand.workload)
        batch = workload.example_inputs(args.batch_size, seq_len=args.seq_len)
    if args.backend == "torch":
        import torch  # noqa: F401 - imported before the baseline so it doesn't count as model memory
    else:
        import onnxruntime  # noqa: F401
    baseline = _rss_mb()
    peak_reset = _reset_peak()
    if workload is None:
        from slimship.runtime.ort_backend import OrtRuntime
        from slimship.runtime.settings import settings_for_candidate

        settings, _notes = settings_for_candidate(cand.info, cand.artifact_path)
        rt: Any = OrtRuntime(cand.artifact_path, args.threads, settings=settings)
    else:
        rt = create_runtime(cand, workload, args.backend, args.threads)
    loaded = _rss_mb()
    rt.predict(batch)
    rt.predict(batch)
    peak = _peak_mb()
    return {
        "peak_covers": "model load + 2 batches"
        if peak_reset
        else "whole process (peak reset unsupported here)",
        "rss_baseline_mb": round(baseline, 1),
        "rss_after_load_mb": round(loaded, 1),
        "peak_rss_mb": round(peak, 1),
        "model_load_mb": round(loaded - baseline, 1),
        "model_peak_mb": round(peak - baseline, 1),
        "batch_size": args.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("candidate")
    parser.add_argument(
        "--backend", required=True, choices=["torch", "onnxruntime", "openvino", "executorch"]
    )
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--artifact", default=None, help="a plain model file (no candidate.json)")
    parser.add_argument("--workload-json", default="{}", help="the workload reference of --artifact")
    parser.add_argument(
        "--inputs", default=None, help="an .npz holding the batch (onnxruntime: no workload built)"
    )
    try:
        record = _probe(parser.parse_args())
    except SlimshipError as err:  # the parent reports this one line, not a child's traceback
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        sys.exit(1)
    except Exception as err:
        print(json.dumps({"error": f"unexpected {type(err).__name__}: {err}"}))
        sys.exit(1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
