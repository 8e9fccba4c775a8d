"""PyTorch → ExecuTorch program (``model.pte``, XNNPACK delegate), verified against its parent on real inputs.

``torch.export`` captures the candidate with a bounded dynamic batch axis (and every other dynamic axis bounded by
``max_sequence``), ``to_edge_transform_and_lower`` hands what XNNPACK takes to the XNNPACK delegate, and
``to_executorch`` plans memory for the bounds and writes the program. The program is then run by ExecuTorch's own
runtime on this host and compared with the PyTorch parent; a candidate that falls short is refused
(:class:`~slimship.errors.VerificationError`). A graph the toolchain refuses is an
:class:`~slimship.errors.ExportError` naming the operations it could not handle.

The whole conversion (export, lowering, writing and verifying the program) runs in a subprocess
(``python -m slimship.passes.executorch``): a crash inside ExecuTorch's toolchain or runtime becomes an
:class:`~slimship.errors.ExportError` that names the signal, and the calling process (a search, a server, a test run)
is not affected — nor does it ever import ExecuTorch's converter or the torchao it needs (transformers imports an
installed torchao in every process that loads a Hugging Face model). ``SLIMSHIP_EXECUTORCH_TOOLCHAIN`` (directories,
``os.pathsep``-separated) is put first on the subprocess's ``PYTHONPATH`` only: a toolchain installed apart with
``pip install --target DIR`` stays invisible to everything else. ``SLIMSHIP_EXECUTORCH_CONVERT_CRASH=1`` makes the
subprocess die with SIGSEGV before it starts (the tests' way of forcing the crash path).

The batch bound survives lowering only with oneDNN/NNPACK off while converting: their backend-selection heuristics
ask "batch ≥ 16?" of the symbolic batch and narrow it to 2…15 (measured with executorch 1.5.1 and torch 2.13, via
XNNPACK's batch-norm fusion pass re-running the convolutions); the flags are restored afterwards.

Figures measured here are x86 figures (ExecuTorch's Python runtime on this CPU class), not phone figures: CoreML and
TensorRT are not offered because this host can't verify them (macOS / an NVIDIA GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from slimship.errors import ExportError, VerificationError
from slimship.measure.verify import VerifyThresholds
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload
    from slimship.workload.base import Batch

__all__ = [
    "CONVERT_CRASH_HOOK",
    "INSTALL_HINT",
    "TOOLCHAIN_PATH",
    "ExecuTorchConvertConfig",
    "ExecuTorchConvertPass",
    "convert_here",
    "refused_operations",
]

INSTALL_HINT = "pip install 'slimship[executorch]'"
TOOLCHAIN_PATH = "SLIMSHIP_EXECUTORCH_TOOLCHAIN"
#: where ``scripts/bootstrap.sh dev`` puts torchao (inside the venv, off its import path): the default toolchain path
DEFAULT_TOOLCHAIN_DIR = "slimship-executorch-toolchain"


def toolchain_dirs() -> list[str]:
    """``SLIMSHIP_EXECUTORCH_TOOLCHAIN``'s directories, else the venv's own toolchain directory when it exists."""
    named = [d for d in os.environ.get(TOOLCHAIN_PATH, "").split(os.pathsep) if d]
    if named:
        return named
    default = Path(sys.prefix) / DEFAULT_TOOLCHAIN_DIR
    return [str(default)] if default.is_dir() else []


CONVERT_CRASH_HOOK = "SLIMSHIP_EXECUTORCH_CONVERT_CRASH"
_RESULT = ".convert-result.json"


class ExecuTorchConvertConfig(PassConfig):
    max_batch: int = Field(
        default=64,
        ge=1,
        description="largest batch the program takes (its memory is planned for it); with dynamic_batch off, the "
        "only batch it takes, e.g. 64",
    )
    dynamic_batch: bool = Field(
        default=True,
        description="batch axis dynamic from 1 to max_batch; off: fixed at max_batch (any other batch is refused)",
    )
    max_sequence: int = Field(
        default=128,
        ge=1,
        description="upper bound of every other dynamic axis (text: the sequence length), e.g. 128",
    )
    verify: VerifyThresholds = Field(
        default=VerifyThresholds(),
        description="thresholds the program must meet against its PyTorch parent on real inputs; the pass fails "
        "when they don't hold",
    )
    verify_samples: int = Field(
        default=48,
        ge=1,
        description="evaluation samples the program is verified on against its parent (on top of a few "
        "small batches), e.g. 48",
    )


_REFUSALS = (
    re.compile(r"Missing out variants: \{([^}]*)\}"),
    re.compile(r"Operator (\S+) is not in Core ATen opset"),
    re.compile(r"Operator (\S+) is not an Edge operator"),
    re.compile(r"Operator: (\S+) with args"),
    # XNNPACK's static reshape (aten.view_copy) takes one dynamic dim: MiniLM's head split with batch and sequence
    re.compile(r"XNNPACK (reshape) only supports 1 dynamic dimension"),
)


def refused_operations(message: str) -> list[str]:
    """The operations an ExecuTorch toolchain error names (``slimship_test::fancy``, ``aten.foo.default``, ...)."""
    ops: list[str] = []
    for pattern in _REFUSALS:
        for m in pattern.finditer(message):
            found = [o.strip().strip("'\"") for o in m.group(1).split(",") if o.strip().strip("'\"")]
            ops += [
                "aten.view_copy (XNNPACK reshape, 2 dynamic dims)" if o == "reshape" else o for o in found
            ]
    return list(dict.fromkeys(ops))


@contextlib.contextmanager
def _batch_bound_kept() -> Iterator[None]:
    """oneDNN and NNPACK off while converting (see the module docstring), restored afterwards."""
    import torch

    mkldnn = torch.backends.mkldnn.set_flags(False, _fp32_precision=None)[0]
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(mkldnn, _fp32_precision=None)
        torch.backends.nnpack.set_flags(nnpack)


def _import_toolchain() -> tuple[Any, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchao / executorch import-time notices
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except (ImportError, OSError) as err:
        raise ExportError(
            f"the ExecuTorch converter is not installed ({err}); install it with `{INSTALL_HINT}`",
            attempts={"executorch": f"not installed: {err}"},
        ) from err
    return to_edge_transform_and_lower, XnnpackPartitioner


def _check_installed() -> None:
    """The parent's cheap check (no import): executorch is importable here or in ``SLIMSHIP_EXECUTORCH_TOOLCHAIN``."""
    import importlib.util

    try:
        here = importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):
        here = False
    apart = any(Path(d, "executorch").is_dir() for d in toolchain_dirs())
    if not (here or apart):
        raise ExportError(
            f"the ExecuTorch converter is not installed (no module named 'executorch'); install it with "
            f"`{INSTALL_HINT}`",
            attempts={"executorch": "not installed"},
        )


def _dims(workload: Workload, config: ExecuTorchConvertConfig) -> tuple[str | None, dict[str, int]]:
    """The batch axis's name (None when fixed) and each dynamic axis's upper bound."""
    first = workload.inputs[0].shape
    batch = first[0] if first and isinstance(first[0], str) else None
    bounds: dict[str, int] = {}
    for spec in workload.inputs:
        for dim in spec.shape:
            if isinstance(dim, str):
                bounds[dim] = config.max_batch if dim == batch else config.max_sequence
    if not config.dynamic_batch or config.max_batch == 1:
        bounds.pop(batch or "", None)
        return None, bounds
    return batch, bounds


def _export(
    model: Any,
    workload: Workload,
    config: ExecuTorchConvertConfig,
    batch_dim: str | None,
    bounds: dict[str, int],
) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """torch.export with bounded dims; the argument order and the input specs the program takes."""
    import torch

    from slimship.passes.export import exporter_failure_reason
    from slimship.runtime.torch_backend import forward_binding

    names, _as_kw = forward_binding(model, [s.name for s in workload.inputs])
    n = 2 if batch_dim is not None else config.max_batch
    example = workload.example_inputs(n, seq_len=min(16, config.max_sequence))
    dims = {name: torch.export.Dim(name, min=1, max=hi) for name, hi in bounds.items()}
    specs = {s.name: s for s in workload.inputs}
    inputs = []
    dynamic = []
    for name in names:
        shape: list[int | str] = []
        axes = {}
        for axis, dim in enumerate(specs[name].shape):
            if isinstance(dim, str) and dim in dims:
                axes[axis] = dims[dim]
                shape.append(dim)
            else:
                shape.append(int(example[name].shape[axis]))
        dynamic.append(axes or None)
        inputs.append({"name": name, "dtype": str(example[name].dtype), "shape": shape})
    args = tuple(torch.from_numpy(example[name]) for name in names)
    try:
        ep = torch.export.export(model, args, dynamic_shapes=tuple(dynamic), strict=False)
    except Exception as err:
        raise ExportError(
            f"torch.export could not capture {workload.name}'s model for ExecuTorch: {exporter_failure_reason(err)}. "
            "Make forward() free of data-dependent Python control flow (or keep this model on ONNX Runtime)",
            attempts={"torch.export": f"failed: {exporter_failure_reason(err)}"},
        ) from err
    return ep, names, inputs


def _lower(ep: Any, workload: Workload) -> Any:
    to_edge_transform_and_lower, XnnpackPartitioner = _import_toolchain()
    try:
        with _batch_bound_kept():
            return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:
        text = " ".join(str(err).split())
        ops = refused_operations(str(err))
        what = f"operations {ops}" if ops else "the graph"
        raise ExportError(
            f"ExecuTorch's toolchain refused {what} of {workload.name}'s model: {text[:400]}. Replace those "
            "operations with standard PyTorch ones (a custom op needs an out-variant kernel in the runtime; a reshape "
            "XNNPACK refuses needs a single dynamic axis), or keep this model on ONNX Runtime",
            attempts={"executorch": f"refused: {', '.join(ops) or 'see message'}"},
        ) from err


def _delegation(program: Any) -> dict[str, Any]:
    """How much of the program runs inside XNNPACK: delegate calls and the operations left outside."""
    calls = 0
    outside: dict[str, int] = {}
    for node in program.exported_program().graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            calls += 1
        elif name not in ("getitem", "sym_size.int") and not name.startswith("sym_"):
            outside[name] = outside.get(name, 0) + 1
    return {
        "delegate": "xnnpack",
        "delegate_calls": calls,
        "ops_outside_delegate": dict(sorted(outside.items())),
    }


def _verification_batches(
    workload: Workload, config: ExecuTorchConvertConfig, batch_dim: str | None
) -> list[Batch]:
    from slimship.measure.verify import verification_batches

    if batch_dim is not None:
        return [
            b
            for b in verification_batches(workload, config.verify_samples)
            if next(iter(b.values())).shape[0] <= config.max_batch
        ]
    full = [
        b
        for _, b in workload.eval_batches(
            limit=max(config.verify_samples, config.max_batch), batch_size=config.max_batch
        )
        if next(iter(b.values())).shape[0] == config.max_batch
    ]
    return full or [workload.example_inputs(config.max_batch)]


def _executorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:  # pragma: no cover - imported above, so installed
        return "unknown"


def convert_here(
    candidate: Candidate, workload: Workload, config: ExecuTorchConvertConfig, out_dir: Path
) -> dict[str, Any]:
    """Export, lower, write ``out_dir/model.pte`` and verify it against its parent, in this process (the pass runs
    this in a subprocess); the info the candidate records."""
    from slimship.candidate import load_torch_model
    from slimship.machine import default_threads
    from slimship.measure.verify import compare_outputs
    from slimship.runtime.executorch_backend import ExecuTorchRuntime
    from slimship.runtime.torch_backend import TorchRuntime
    from slimship.workload.base import TensorSpec

    if os.environ.get(CONVERT_CRASH_HOOK) == "1":
        os.kill(os.getpid(), signal.SIGSEGV)
    model = load_torch_model(candidate, workload)
    batch_dim, bounds = _dims(workload, config)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep, _names, inputs = _export(model, workload, config, batch_dim, bounds)
        program = _lower(ep, workload)
    seconds = round(time.perf_counter() - t0, 2)
    out = out_dir / "model.pte"
    out.write_bytes(program.buffer)
    threads = default_threads()
    os.environ["SLIMSHIP_EXECUTORCH_PROBE"] = "off"  # this subprocess is the rehearsal
    child = ExecuTorchRuntime(
        out,
        threads,
        inputs=[TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in inputs],
        output_names=[o.name for o in workload.outputs],
        dim_max=bounds,
    )
    parent = TorchRuntime(model, workload.inputs, [o.name for o in workload.outputs], threads)
    report = compare_outputs(parent, child, _verification_batches(workload, config, batch_dim), config.verify)
    if not report.passed:
        out.unlink(missing_ok=True)
        raise VerificationError(
            "the ExecuTorch program's outputs disagree with its PyTorch parent's: "
            + "; ".join(report.failures),
            report=report.to_json(),
        )
    inputs, bounds = _batch_of_one_named(workload, config, batch_dim, inputs, bounds)
    record = {
        "version": _executorch_version(),
        "inputs": inputs,
        "outputs": [o.name for o in workload.outputs],
        "dim_max": bounds,
        "dynamic_batch": batch_dim is not None,
        **_delegation(program),
    }
    notices = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})
    return {
        "convert_seconds": seconds,
        "verification": report.to_json(),
        "executorch": record,
        "converter_warnings": notices,
    }


def _batch_of_one_named(
    workload: Workload,
    config: ExecuTorchConvertConfig,
    batch_dim: str | None,
    inputs: list[dict[str, Any]],
    bounds: dict[str, int],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A program fixed at batch 1 is recorded with its batch axis named and bounded by 1, so the runtime takes any
    batch (one row at a time, like any batch beyond a bound) instead of refusing all but 1."""
    first = workload.inputs[0].shape
    name = first[0] if first and isinstance(first[0], str) else None
    if batch_dim is not None or config.max_batch != 1 or name is None:
        return inputs, bounds
    specs = {s.name: s.shape for s in workload.inputs}
    named = [
        {**i, "shape": [name, *i["shape"][1:]]} if specs[i["name"]] and specs[i["name"]][0] == name else i
        for i in inputs
    ]
    return named, {name: 1, **bounds}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    extra = toolchain_dirs()
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(
            extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
    return env


def _crash_message(code: int, workload: Workload) -> str:
    from slimship.machine import cpu_class
    from slimship.runtime.executorch_backend import signal_name

    return (
        f"ExecuTorch's converter (torch.export → XNNPACK lowering → running the program to verify it) crashed with "
        f"{signal_name(code)} in its subprocess while converting {workload.name}'s model on this {cpu_class()} host; "
        "this process was not affected and no candidate was written. Keep this model on ONNX Runtime, or try "
        "another executorch version"
    )


def _raise_child_error(err: dict[str, Any]) -> None:
    kind, message = err.get("type"), str(err.get("message"))
    attempts = {str(k): str(v) for k, v in (err.get("attempts") or {}).items()}
    if kind == "VerificationError":
        raise VerificationError(message, report=err.get("report"), attempts=attempts)
    if kind == "ExportError":
        raise ExportError(message, attempts=attempts)
    raise ExportError(f"ExecuTorch conversion failed in its subprocess: {message}", attempts=attempts)


def _convert_in_child(
    candidate: Candidate, workload: Workload, config: ExecuTorchConvertConfig, out_dir: Path
) -> dict[str, Any]:
    result = out_dir / _RESULT
    args = [str(candidate.path), str(out_dir), json.dumps(config.to_json_dict())]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "slimship.passes.executorch", *args],
            capture_output=True,
            text=True,
            timeout=3600,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise ExportError(
            f"ExecuTorch conversion of {workload.name}'s model did not finish within 3600 s",
            attempts={"executorch": "timed out"},
        ) from err
    try:
        payload = json.loads(result.read_text()) if result.is_file() else None
    finally:
        result.unlink(missing_ok=True)
    if done.returncode < 0:
        (out_dir / "model.pte").unlink(missing_ok=True)
        raise ExportError(
            _crash_message(done.returncode, workload), attempts={"executorch": f"crashed: {done.returncode}"}
        )
    if payload is None:
        tail = " ".join(ln for ln in done.stderr.strip().splitlines()[-3:] if ln.strip())
        raise ExportError(
            f"ExecuTorch conversion's subprocess exited with {done.returncode} without a result: {tail[:600]}",
            attempts={"executorch": f"exit {done.returncode}"},
        )
    if "error" in payload:
        _raise_child_error(payload["error"])
    return dict(payload["info"])


class ExecuTorchConvertPass(Pass[ExecuTorchConvertConfig]):
    name: ClassVar[str] = "convert-executorch"
    summary: ClassVar[str] = (
        "PyTorch → ExecuTorch .pte (XNNPACK delegate, bounded dynamic batch), run by ExecuTorch's runtime here and "
        "verified against its parent, all in a subprocess (x86 figures, not phone figures)"
    )
    config_cls = ExecuTorchConvertConfig
    input_format: ClassVar[str] = "torch"
    output_format: ClassVar[str] = "executorch"
    requires: ClassVar[tuple[str, ...]] = ("executorch",)

    def run(
        self, candidate: Candidate, workload: Workload, config: ExecuTorchConvertConfig, out_dir: Path
    ) -> Candidate:
        from slimship.candidate import new_candidate
        from slimship.runtime.executorch_backend import mark_rehearsed

        _check_installed()  # a missing package is reported before any work
        info = _convert_in_child(candidate, workload, config, out_dir)
        mark_rehearsed(out_dir / "model.pte")  # the subprocess loaded and ran it: no second rehearsal
        return new_candidate(
            out_dir,
            name="executorch",
            format="executorch",
            artifact="model.pte",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )


def _child_main(argv: list[str]) -> int:
    from slimship.candidate import load_candidate
    from slimship.errors import SlimshipError
    from slimship.workload import resolve_workload

    cand_dir, out_dir, cfg = Path(argv[0]), Path(argv[1]), ExecuTorchConvertConfig.parse(json.loads(argv[2]))
    result = out_dir / _RESULT
    try:
        candidate = load_candidate(cand_dir)
        info = convert_here(candidate, resolve_workload(candidate.workload), cfg, out_dir)
    except SlimshipError as err:
        error = {"type": type(err).__name__, "message": str(err), "attempts": getattr(err, "attempts", {})}
        if isinstance(err, VerificationError):
            error["report"] = err.report
        result.write_text(json.dumps({"error": error}, default=str))
        return 3
    result.write_text(json.dumps({"info": info}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
