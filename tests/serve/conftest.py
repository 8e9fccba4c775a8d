"""A real `slimship serve` process on 127.0.0.1 for the protocol tests, and small ONNX models made here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m slimship.cli serve --config …` in its own process group; stderr (JSON log lines) kept in a file."""

    def __init__(
        self,
        tmp: Path,
        config: dict,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        ready_timeout: float = 90.0,
    ) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.ray = "--ray" in args
        cfg = tmp / f"serve-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump({**config, "host": "127.0.0.1", "port": self.port}))
        self.log = tmp / f"serve-{self.port}.log"
        self._log_f = open(self.log, "w")  # noqa: SIM115 - open as long as the server process lives
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg), *args],
            stdout=self._log_f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            self.wait_ready(ready_timeout)
        except BaseException:  # a server that never came up: nothing of it outlives the failed test
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self._log_f.close()
            raise

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become ready:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            if (
                self.ray
            ):  # the driver stops its Ray instance itself; signalling the group would kill Ray under it
                os.kill(self.proc.pid, sig)
            else:
                os.killpg(self.proc.pid, sig)
        rc = self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever the server left behind
        self._log_f.close()
        return rc


def slow_model(path: Path, size: int = 1024, repeats: int = 6) -> Path:
    """x [N, size] → y [N, 1]: a chain of MatMuls with in-graph random weights, slow enough (tens of ms) to
    fill queues in the overload and timeout tests; tiny on disk."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node(
            "RandomNormal",
            [],
            ["w"],
            shape=[size, size],
            dtype=TensorProto.FLOAT,
            scale=1.0 / size**0.5,
            seed=0.0,
        )
    ]
    prev = "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("ReduceSum", [prev, "axes"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def seq_model(path: Path) -> Path:
    """input_ids [N, S] int64 + attention_mask [N, S] → pooled [N, 4] (masked mean of an embedding) and
    tokens [N, S, 4]: padding with zeros leaves `pooled` unchanged, like a sentence encoder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.arange(400, dtype=np.float32).reshape(100, 4) / 100.0, "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax2"], ["m3"]),
        helper.make_node("Mul", ["tokens", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "ax1"], ["c"], keepdims=0),
        helper.make_node("Div", ["s", "c"], ["pooled"]),
    ]
    ints = lambda n, v: helper.make_tensor(n, TensorProto.INT64, [1], [v])  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "seq",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"]),
        ],
        [
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "S", 4]),
        ],
        initializer=[emb, ints("ax1", 1), ints("ax2", 2)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


@pytest.fixture(scope="module")
def models(digits_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    _, exp, opt = digits_chain
    return {
        "digits_v1": str(opt.artifact_path),
        "digits_v2": str(exp.artifact_path),
        "slow": str(slow_model(root / "slow.onnx", size=2048)),
        "seq": str(seq_model(root / "seq.onnx")),
    }


@pytest.fixture(scope="session")
def digits_openvino(digits, digits_chain, tmp_path_factory):
    """The exported digits model converted to an OpenVINO IR candidate (verified against its ONNX parent)."""
    from slimship.passes import run_pass

    return run_pass(
        "convert-openvino", digits_chain[1], digits, {}, tmp_path_factory.mktemp("digits-ov") / "ir"
    )


@pytest.fixture(scope="session")
def digits_executorch(digits, digits_chain, tmp_path_factory):
    """The digits model converted to an ExecuTorch program (XNNPACK, batch ≤ 64, verified against its PyTorch
    parent)."""
    from slimship.passes import run_pass

    return run_pass(
        "convert-executorch",
        digits_chain[0],
        digits,
        {"max_batch": 64, "verify_samples": 32},
        tmp_path_factory.mktemp("digits-et") / "pte",
    )


def perturbed_candidate(cand, workload, out: Path, scale: float, seed: int = 0):
    """A copy of an ONNX candidate whose weight matrices got Gaussian noise (``scale`` × each tensor's std):
    a deliberately broken version that still runs and answers with the right shapes."""
    import onnx
    from onnx import numpy_helper

    from slimship.candidate import new_candidate

    model = onnx.load(str(cand.artifact_path))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2 and w.size >= 64:
            noisy = (w + rng.normal(0, scale * float(w.std()), w.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    return new_candidate(
        out,
        name="perturbed",
        format="onnx",
        artifact="model.onnx",
        workload=workload,
        parent=cand,
        pass_name="perturb",
        pass_config={"scale": scale, "seed": seed},
    )


class Load:
    """Clients sending requests in a loop until stopped; every status and answering version is kept."""

    def __init__(
        self,
        url: str,
        bodies: list[dict],
        clients: int = 2,
        headers: dict | None = None,
        path: str = "/v2/models/digits/infer",
    ) -> None:
        import threading

        self.url, self.bodies, self.headers, self.path = url, bodies, headers or {}, path
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        import httpx

        with httpx.Client(base_url=f"http://{self.url}", timeout=60) as c:
            k = i
            while not self._stop.is_set():
                r = c.post(self.path, json=self.bodies[k % len(self.bodies)], headers=self.headers)
                self.statuses.append(r.status_code)
                self.versions.append(r.headers.get("x-model-version", ""))
                k += len(self._threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def wait_for(fn, timeout: float = 120.0, every: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")
