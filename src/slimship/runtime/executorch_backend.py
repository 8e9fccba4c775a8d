"""ExecuTorch runtime: a ``.pte`` program (XNNPACK delegate) run by ExecuTorch's C++ runtime through its Python
bindings, on this x86 host, with the same predict contract as the other backends.

This is how a mobile candidate is *verified* and measured here; on a phone the same ``.pte`` runs under ExecuTorch's
Android/iOS runtime, whose speed this host says nothing about. The program's memory is planned for the upper bound
of every dynamic axis, recorded with the candidate (``info["executorch"]["dim_max"]``): a batch larger than the batch
bound runs in chunks of the bound (the predict contract takes any batch); any other axis beyond its bound is an
:class:`~slimship.errors.InputSpecError` that names the bound, never a resize failure inside the runtime.

Threads: XNNPACK's thread pool is process-wide, and every program captures the pool that exists when it is loaded
(XNNPACK's runtime keeps the pointer). Resizing the pool (``_unsafe_reset_threadpool``) frees the old one under every
loaded program: their next call writes into freed memory, and the process dies later, anywhere, of heap corruption
(measured with executorch 1.5.1: "corrupted size vs. prev_size" in a later malloc, or SIGSEGV — what killed the
serial test run once another runtime had been loaded with a different thread count). So the pool is sized only
*before* a program is loaded and only while no other ExecuTorch program is alive in the process; otherwise the new
runtime runs on the pool as it is, and :attr:`ExecuTorchRuntime.threads` (and ``describe()``) say how many threads
that is. Calls run one at a time under a lock shared by every ExecuTorch runtime in the process.

The first load of each program in a process is rehearsed in a subprocess (:func:`load_probe`: load and one call at
the smallest shape), so a runtime crash inside ExecuTorch is reported as
:class:`~slimship.errors.RuntimeUnavailableError` instead of taking a long-lived process (a server) down. A program
the ``convert-executorch`` pass verified in its own subprocess counts as rehearsed. ``SLIMSHIP_EXECUTORCH_PROBE_CRASH=1``
makes the probe child die with SIGSEGV (the tests' way of forcing that path); ``SLIMSHIP_EXECUTORCH_PROBE=off`` skips it.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import InferenceError, InputSpecError, RuntimeUnavailableError
from slimship.runtime.base import Runtime
from slimship.runtime.settings import DeploymentSettings, decide_executorch_settings
from slimship.runtime.subprocess_probe import run_probe_child, signal_name
from slimship.workload.base import Batch, TensorSpec

__all__ = [
    "CRASH_HOOK",
    "INSTALL_HINT",
    "PROBE_SWITCH",
    "ExecuTorchRuntime",
    "import_executorch_runtime",
    "load_probe",
    "mark_rehearsed",
    "signal_name",
]

INSTALL_HINT = "pip install 'slimship[executorch]'"
CRASH_HOOK = "SLIMSHIP_EXECUTORCH_PROBE_CRASH"
PROBE_SWITCH = "SLIMSHIP_EXECUTORCH_PROBE"

#: XNNPACK's thread pool and a loaded method's planned buffers are shared state: one call (or load) at a time
_CALL_LOCK = threading.Lock()
#: the ExecuTorch runtimes alive in this process: XNNPACK's pool may be resized only while there are none (a mirror
#: of the library's own process-wide state, see the module docstring)
_LIVE: weakref.WeakSet[ExecuTorchRuntime] = weakref.WeakSet()
#: programs already rehearsed in a subprocess in this process: (path, mtime_ns, size)
_REHEARSED: set[tuple[str, int, int]] = set()

_PROBE_CHILD = """
import os, signal, sys
if os.environ.get({hook!r}) == "1":
    os.kill(os.getpid(), signal.SIGSEGV)
import torch
from executorch.extension.pybindings import _C
program = _C._load_program(sys.argv[1], program_verification=_C.Verification.InternalConsistency)
method = program.load_method("forward")
meta = method.method_meta()
dtypes = {{0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 6: torch.float32,
          7: torch.float64, 11: torch.bool}}
args = []
for i in range(meta.num_inputs()):
    info = meta.input_tensor_meta(i)
    shape = [int(d) for d in sys.argv[2 + i].split(",")] if len(sys.argv) > 2 + i else list(info.sizes())
    args.append(torch.zeros(shape, dtype=dtypes[int(info.dtype())]))
method(args)
print("ran")
"""

#: ExecuTorch's ScalarType codes (c10) for the dtypes a .pte input may have
_SCALAR_TYPES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
}


def import_executorch_runtime() -> Any:
    """ExecuTorch's runtime bindings (the compiled ``_C`` module ``portable_lib`` re-exports), or a
    :class:`RuntimeUnavailableError` naming the extra to install.

    Imported directly, with torch first (its libraries are the module's dependencies): ``portable_lib`` and
    ``executorch.runtime`` import ``executorch.exir`` on the way, ~6 s of CPU per process for nothing a runtime uses."""
    try:
        import torch  # noqa: F401  (loads libtorch, which the bindings link against)
        from executorch.extension.pybindings import _C
    except (ImportError, OSError) as err:
        raise RuntimeUnavailableError(
            f"the ExecuTorch runtime is not installed ({err}); install it with `{INSTALL_HINT}` "
            "(or run the candidate's PyTorch parent on runtime 'torch')"
        ) from err
    return _C


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def mark_rehearsed(path: Path) -> None:
    """Record that ``path`` was loaded and run in a subprocess already (the convert pass's verification child)."""
    _REHEARSED.add(_identity(path))


@functools.lru_cache(maxsize=64)
def _probe(identity: tuple[str, int, int], shapes: tuple[str, ...], crash_hook: str) -> str | None:
    return run_probe_child(
        _PROBE_CHILD.format(hook=CRASH_HOOK),
        [identity[0], *shapes],
        {CRASH_HOOK: crash_hook},
        "ExecuTorch",
        "runtime",
    )


def load_probe(path: Path, inputs: Sequence[TensorSpec] | None = None) -> None:
    """Load ``path`` and run it once (every dynamic axis at 1) in a subprocess before this process does; raise
    :class:`RuntimeUnavailableError` when the child crashed (or :class:`InferenceError` when it failed cleanly).
    Once per program per process; a program :func:`mark_rehearsed` already ran in a subprocess is not probed again."""
    if os.environ.get(PROBE_SWITCH, "").lower() == "off":
        return
    identity = _identity(path)
    hook = os.environ.get(CRASH_HOOK, "")
    if identity in _REHEARSED and not hook:
        return
    shapes = tuple(
        ",".join(str(d) if isinstance(d, int) else "1" for d in spec.shape) for spec in inputs or ()
    )
    problem = _probe(identity, shapes, hook)
    if problem is None:
        return
    if "crashed" in problem:
        from slimship.machine import cpu_class

        raise RuntimeUnavailableError(
            f"{problem} on this {cpu_class()} host while loading and running {path}; this process was not affected "
            "and did not load it. Run the candidate's PyTorch parent on runtime 'torch' (or its ONNX export on "
            "'onnxruntime'), or try another executorch version"
        )
    raise InferenceError(f"{problem} ({path})")


def _sized_pool(lib: Any, threads: int) -> int:
    """Size XNNPACK's pool to ``threads`` if no ExecuTorch program is alive (else leave it); the size it has.
    Call under ``_CALL_LOCK``, before loading a program."""
    current = int(lib._threadpool_get_thread_count())
    if current != threads and not _LIVE:
        lib._unsafe_reset_threadpool(threads)
        current = int(lib._threadpool_get_thread_count())
    return current


class ExecuTorchRuntime(Runtime):
    backend = "executorch"

    def __init__(
        self,
        path: str | Path,
        threads: int,
        *,
        inputs: Sequence[TensorSpec] | None = None,
        output_names: Sequence[str] = (),
        dim_max: Mapping[str, int] | None = None,
        settings: DeploymentSettings | None = None,
    ) -> None:
        """``inputs``: the program's inputs in its argument order, dynamic axes named (the candidate records them);
        without them every input is taken as fixed at the size the program was planned for. ``dim_max``: the
        largest size each named dynamic axis may take (the memory plan). ``settings``: the candidate's deployment
        settings (``threads`` given here overrides their thread count)."""
        self._lib = import_executorch_runtime()
        self.path = Path(path)
        if self.path.suffix != ".pte" or not self.path.is_file():
            raise InferenceError(f"{self.path} is not an ExecuTorch program (.pte)")
        settings = (settings or decide_executorch_settings()).with_overrides(threads=threads)
        if settings.runtime != "executorch":
            raise InferenceError(f"{self.path}: got {settings.runtime} settings for the ExecuTorch runtime")
        self.settings = settings
        load_probe(self.path, inputs)
        try:
            with _CALL_LOCK:
                pool = _sized_pool(self._lib, threads)
                # the program stays referenced for as long as its method (the method points into it)
                self._program = self._lib._load_program(
                    str(self.path), program_verification=self._lib.Verification.InternalConsistency
                )
                self._method = self._program.load_method("forward")
        except Exception as err:
            raise InferenceError(f"ExecuTorch can't load {self.path}: {err}") from err
        if self._method is None:
            raise InferenceError(f"{self.path} has no 'forward' method")
        meta = self._method.method_meta()
        planned = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        specs = tuple(inputs) if inputs is not None else self._fixed_specs(meta)
        if len(specs) != len(planned):
            raise InferenceError(
                f"{self.path} takes {len(planned)} inputs but {len(specs)} were described ({[s.name for s in specs]})"
            )
        self.dim_max = dict(dim_max or {})
        n_out = meta.num_outputs()
        names = list(output_names) or [f"output{i}" for i in range(n_out)]
        if len(names) != n_out:
            raise InferenceError(f"{self.path} returns {n_out} outputs, expected {names}")
        super().__init__(specs, names, pool)
        self.threads_requested = threads
        _LIVE.add(self)

    @staticmethod
    def _fixed_specs(meta: Any) -> tuple[TensorSpec, ...]:
        specs = []
        for i in range(meta.num_inputs()):
            info = meta.input_tensor_meta(i)
            dtype = _SCALAR_TYPES.get(int(info.dtype()))
            if dtype is None:
                raise InferenceError(f"input {i} of the program has ExecuTorch dtype code {info.dtype()}")
            specs.append(TensorSpec(f"input{i}", dtype, tuple(int(d) for d in info.sizes())))
        return tuple(specs)

    def _check_bounds(self, batch: Batch) -> None:
        for spec in self.inputs:
            for axis, dim in enumerate(spec.shape):
                limit = self.dim_max.get(dim) if isinstance(dim, str) else None
                got = batch[spec.name].shape[axis]
                if limit is not None and got > limit:
                    raise InputSpecError(
                        f"input {spec.name!r} has {dim} {got} at axis {axis}, but this ExecuTorch program was "
                        f"planned for {dim} ≤ {limit}; shorten it, or convert again with a larger bound "
                        f"(convert-executorch's max_sequence)"
                    )

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        first = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        limit = self.dim_max.get(first) if isinstance(first, str) else None
        n = batch[self.inputs[0].name].shape[0] if self.inputs else 0
        if limit is None or n <= limit:
            return self._run_planned(batch)
        # a batch beyond the planned bound runs in chunks of the bound: the predict contract takes any batch
        batched = [s.name for s in self.inputs if s.shape and s.shape[0] == first]
        parts = [
            self._run_planned({k: (v[i : i + limit] if k in batched else v) for k, v in batch.items()})
            for i in range(0, n, limit)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def _run_planned(self, batch: Batch) -> dict[str, np.ndarray]:
        import torch

        self._check_bounds(batch)
        args = [torch.from_numpy(np.ascontiguousarray(batch[s.name])) for s in self.inputs]
        try:
            with _CALL_LOCK:  # never resize the pool here: this program holds it (see the module docstring)
                out = self._method(args)
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            raise InferenceError(f"ExecuTorch failed on a batch of shapes {shapes}: {err}") from err
        if len(out) != len(self.output_names):
            raise InferenceError(
                f"the program returned {len(out)} outputs, expected {list(self.output_names)}"
            )
        return {name: t.numpy().copy() for name, t in zip(self.output_names, out, strict=True)}

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            **super().describe(),
            "deployment": self.settings.to_json(),
            "dim_max": dict(self.dim_max),
        }
        if self.threads != self.threads_requested:
            out["threads_note"] = (
                f"asked for {self.threads_requested} threads, runs on {self.threads}: XNNPACK's pool is process-wide "
                "and is not resized while another ExecuTorch program is loaded in this process"
            )
        return out
