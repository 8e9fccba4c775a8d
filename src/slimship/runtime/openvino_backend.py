"""OpenVINO CPU runtime: an IR (``model.xml`` + ``model.bin``) compiled with explicit settings, same predict contract.

The compile properties come from :class:`~slimship.runtime.settings.DeploymentSettings` (``runtime: "openvino"``):
threads (``INFERENCE_NUM_THREADS``), one stream, the LATENCY hint, no CPU pinning and an explicit
``INFERENCE_PRECISION_HINT``. After compiling, the runtime reads back what the plugin actually uses
(:attr:`OpenVINORuntime.executed`: the inference precision and the count of executed ops per runtime precision), so
an fp32 candidate that would run in bf16 on an AMX host is visible rather than assumed.

The first compile of a model in a process runs in a subprocess first (:func:`compile_probe`): public reports describe
SIGFPE crashes inside ``compile_model`` on some virtualised AMD hosts, which would take a long-lived process (a
server) down with them. A crash there is reported as :class:`~slimship.errors.RuntimeUnavailableError`; the verdict
is cached for the process. ``SLIMSHIP_OPENVINO_PROBE_CRASH=1`` makes the probe child die with SIGFPE (the tests' way
of forcing that path); ``SLIMSHIP_OPENVINO_PROBE=off`` skips the probe.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import InferenceError, RuntimeUnavailableError
from slimship.runtime.base import Runtime
from slimship.runtime.settings import DeploymentSettings, decide_openvino_settings
from slimship.runtime.subprocess_probe import run_probe_child
from slimship.workload.base import Batch, TensorSpec

__all__ = ["INSTALL_HINT", "OpenVINORuntime", "compile_probe", "import_openvino"]

INSTALL_HINT = "pip install 'slimship[openvino]'"
CRASH_HOOK = "SLIMSHIP_OPENVINO_PROBE_CRASH"
PROBE_SWITCH = "SLIMSHIP_OPENVINO_PROBE"

_PROBE_CHILD = """
import json, os, signal, sys
if os.environ.get({hook!r}) == "1":
    os.kill(os.getpid(), signal.SIGFPE)
import openvino as ov
core = ov.Core()
core.compile_model(core.read_model(sys.argv[1]), "CPU", json.loads(sys.argv[2]))
print("compiled")
"""


def import_openvino() -> Any:
    """The ``openvino`` module, or a :class:`RuntimeUnavailableError` naming the extra to install."""
    try:
        import openvino
    except ImportError as err:
        raise RuntimeUnavailableError(
            f"the OpenVINO runtime is not installed ({err}); install it with `{INSTALL_HINT}` "
            "(or run the candidate's ONNX parent on runtime 'onnxruntime')"
        ) from err
    return openvino


@functools.lru_cache(maxsize=64)
def _probe(path: str, identity: tuple[int, int], properties: str, crash_hook: str) -> str | None:
    """Compile ``path`` in a child process; None when it compiled, else why not. Cached per process."""
    return run_probe_child(
        _PROBE_CHILD.format(hook=CRASH_HOOK),
        [path, properties],
        {CRASH_HOOK: crash_hook},
        "OpenVINO",
        "compile_model",
    )


def compile_probe(path: Path, properties: dict[str, Any]) -> None:
    """Compile ``path`` with ``properties`` in a subprocess before this process does; raise
    :class:`RuntimeUnavailableError` when the child crashed (or :class:`InferenceError` when it failed cleanly)."""
    if os.environ.get(PROBE_SWITCH, "").lower() == "off":
        return
    from slimship.machine import cpu_class

    st = path.stat()
    problem = _probe(
        str(path.resolve()),
        (st.st_mtime_ns, st.st_size),
        json.dumps(properties, sort_keys=True, default=str),
        os.environ.get(CRASH_HOOK, ""),
    )
    if problem is None:
        return
    if "crashed" in problem:
        raise RuntimeUnavailableError(
            f"{problem} on this {cpu_class()} host while compiling {path}; OpenVINO can't be used here "
            "(public reports describe SIGFPE inside compile_model on some virtualised AMD hosts). This process "
            "was not affected: run the candidate's ONNX parent on runtime 'onnxruntime', or try another "
            "openvino version"
        )
    raise InferenceError(f"{problem} ({path})")


def _element_dtype(ov_type: Any) -> str:
    try:
        return str(np.dtype(ov_type.to_dtype()))
    except Exception as err:  # an element type numpy has no name for (bf16, u4, ...)
        raise InferenceError(f"OpenVINO element type {ov_type} has no numpy equivalent") from err


def _port_name(port: Any, index: int, kind: str) -> str:
    names = sorted(port.get_names())
    return names[0] if names else f"{kind}{index}"


class OpenVINORuntime(Runtime):
    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        threads: int,
        settings: DeploymentSettings | None = None,
        output_names: tuple[str, ...] = (),
    ) -> None:
        """``settings``: the candidate's deployment settings (``threads`` given here overrides their thread count,
        never the precision hint); without them they are decided here. ``output_names``: the names to prefer
        when an output port carries several (a converted ONNX graph's output names)."""
        ov = import_openvino()
        self.path = Path(path)
        if self.path.suffix != ".xml" or not self.path.is_file():
            raise InferenceError(f"{self.path} is not an OpenVINO IR (.xml beside its .bin)")
        settings = (settings or decide_openvino_settings()).with_overrides(threads=threads)
        if settings.runtime != "openvino":
            raise InferenceError(f"{self.path}: got {settings.runtime} settings for the OpenVINO runtime")
        self.settings = settings
        props = settings.openvino_properties()
        compile_probe(self.path, props)
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", props)
        except Exception as err:
            raise InferenceError(f"OpenVINO can't load {self.path}: {err}") from err
        self._lock = threading.Lock()
        self._request = self.compiled.create_infer_request()
        inputs = []
        for i, port in enumerate(self.compiled.inputs):
            name = _port_name(port, i, "input")
            shape = tuple(
                d.get_length() if d.is_static else f"{name}_dim{j}"
                for j, d in enumerate(port.get_partial_shape())
            )
            inputs.append(TensorSpec(name, _element_dtype(port.get_element_type()), shape))
        outs = []
        specs = []
        for i, port in enumerate(self.compiled.outputs):
            preferred = [n for n in output_names if n in port.get_names()]
            name = preferred[0] if preferred else _port_name(port, i, "output")
            outs.append(name)
            shape = tuple(
                d.get_length() if d.is_static else f"{name}_dim{j}"
                for j, d in enumerate(port.get_partial_shape())
            )
            specs.append(TensorSpec(name, _element_dtype(port.get_element_type()), shape))
        self._out_ports = list(self.compiled.outputs)
        #: the outputs with their element types and shapes (dynamic dims named ``<output>_dim<axis>``)
        self.output_specs = tuple(specs)
        super().__init__(inputs, outs, threads)
        self.executed = self._executed()

    def _executed(self) -> dict[str, Any]:
        """What the compiled model reports it runs with (not what was asked)."""
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        counts: dict[str, int] = {}
        try:
            for op in self.compiled.get_runtime_model().get_ordered_ops():
                rt = op.get_rt_info()
                layer = str(rt["layerType"].astype(str)) if "layerType" in rt else ""
                if "runtimePrecision" in rt and layer not in ("Const", "Input", "Output"):
                    p = str(rt["runtimePrecision"].astype(str))
                    counts[p] = counts.get(p, 0) + 1
        except Exception:  # the executed graph is a courtesy record; the hint above is the contract
            counts = {}
        return {
            "inference_precision": hint.to_string() if hasattr(hint, "to_string") else str(hint),
            "num_streams": int(self.compiled.get_property("NUM_STREAMS")),
            "inference_num_threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            "runtime_precisions": dict(sorted(counts.items())),
        }

    def _run(self, batch: Batch) -> dict[str, np.ndarray]:
        try:
            with self._lock:  # one infer request: its output tensors are reused, so copy before releasing
                res = self._request.infer(batch)
                return {
                    name: np.array(res[port], copy=True)
                    for name, port in zip(self.output_names, self._out_ports, strict=True)
                }
        except Exception as err:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            raise InferenceError(f"OpenVINO failed on a batch of shapes {shapes}: {err}") from err

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "deployment": self.settings.to_json(), "executed": dict(self.executed)}
