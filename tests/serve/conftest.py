"""A real `slimship serve` process on 127.0.0.1 for the protocol tests, and small ONNX models made here."""

from __future__ import annotations

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

    def __init__(self, tmp: Path, config: dict, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        cfg = tmp / f"serve-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump({**config, "host": "127.0.0.1", "port": self.port}))
        self.log = tmp / f"serve-{self.port}.log"
        self._log_f = open(self.log, "w")  # noqa: SIM115 - open as long as the server process lives
        self.proc = subprocess.Popen([sys.executable, "-m", "slimship.cli", "serve", "--config", str(cfg)],
                                     stdout=self._log_f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not become ready:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        rc = self.proc.wait(timeout=timeout)
        self._log_f.close()
        return rc


def slow_model(path: Path, size: int = 1024, repeats: int = 6) -> Path:
    """x [N, size] → y [N, 1]: a chain of MatMuls with in-graph random weights, slow enough (tens of ms) to
    fill queues in the overload and timeout tests; tiny on disk."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("RandomNormal", [], ["w"], shape=[size, size], dtype=TensorProto.FLOAT, scale=1.0 / size**0.5, seed=0.0)]
    prev = "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("ReduceSum", [prev, "axes"], ["y"], keepdims=1))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
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
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
                                             helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "S", 4])],
                              initializer=[emb, ints("ax1", 1), ints("ax2", 2)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


@pytest.fixture(scope="module")
def models(digits_chain, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    _, exp, opt = digits_chain
    return {"digits_v1": str(opt.artifact_path), "digits_v2": str(exp.artifact_path),
            "slow": str(slow_model(root / "slow.onnx", size=2048)), "seq": str(seq_model(root / "seq.onnx"))}
