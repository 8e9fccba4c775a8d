"""Deployment settings: decided from the machine and the graph, recorded with the candidate, applied by every
consumer (runtime, eval, bench, server) exactly as recorded (precision entries re-decided for the host)."""

from __future__ import annotations

import json

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from slimship.errors import ConfigError
from slimship.runtime.settings import DeploymentSettings, decide_settings, settings_for_candidate

AVX2 = {"avx", "avx2", "fma"}
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
AMX = VNNI | {"amx_tile", "amx_int8"}


def _model(op: str) -> onnx.ModelProto:
    if op == "MatMulInteger":
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        ins = [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [2, 1]),
        ]
        out = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])
    else:
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        ins = [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 1]),
        ]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    return helper.make_model(
        helper.make_graph([node], "g", ins, [out]), opset_imports=[helper.make_opsetid("", 13)]
    )


@pytest.mark.parametrize(
    ("flags", "cls", "entry"), [(AVX2, "avx2", True), (VNNI, "avx512-vnni", False), (AMX, "amx", False)]
)
def test_int8_graphs_get_the_saturation_free_kernels_only_without_vnni(flags, cls, entry):
    s = decide_settings(_model("MatMulInteger"), flags=flags, arch="x86_64")
    assert s.cpu_class == cls and s.int8_ops == ("MatMulInteger",)
    assert (s.session_config.get("session.x64quantprecision") == "1") is entry
    assert "x64quantprecision" in " ".join(s.reasons) and s.reasons["session.x64quantprecision"].startswith(
        "set" if entry else "not set"
    )
    fp32 = decide_settings(_model("MatMul"), flags=AVX2, arch="x86_64")
    assert fp32.session_config == {} and "no int8" in fp32.reasons["session.x64quantprecision"]
    assert decide_settings(_model("MatMulInteger"), flags=set(), arch="aarch64").session_config == {}


def test_settings_round_trip_and_bad_settings_are_clear_errors():
    s = decide_settings(_model("MatMulInteger"), flags=AVX2, arch="x86_64", threads=2, spinning=False)
    assert DeploymentSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ConfigError, match=r"unknown ONNX Runtime session setting.*session.x64quantprecision"):
        DeploymentSettings(session_config={"session.turbo": "1"})
    with pytest.raises(ConfigError, match="unknown deployment setting"):
        DeploymentSettings.from_json({"runtime": "onnxruntime", "fast": True})
    with pytest.raises(ConfigError, match="graph_optimization_level"):
        DeploymentSettings(graph_optimization_level="max")
    with pytest.raises(ConfigError, match="intra_op_threads"):
        DeploymentSettings(intra_op_threads=0)


def test_a_candidate_recorded_on_one_cpu_class_gets_this_hosts_precision_entries(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model("MatMulInteger"), str(path))
    on_vnni = decide_settings(path, flags=VNNI, arch="x86_64", threads=1)
    here, notes = settings_for_candidate({"deployment": on_vnni.to_json()}, path, flags=AVX2)
    assert here.session_config == {"session.x64quantprecision": "1"} and here.intra_op_threads == 1
    assert any("recorded on avx512-vnni" in n for n in notes) and any("precision entries" in n for n in notes)
    back, notes = settings_for_candidate({"deployment": here.to_json()}, path, flags=VNNI)
    assert back.session_config == {} and notes


@pytest.fixture(scope="module")
def int8_digits(digits, digits_chain, tmp_path_factory):
    from slimship.passes import run_pass

    return run_pass("quantize-dynamic", digits_chain[2], digits, {}, tmp_path_factory.mktemp("q") / "q")


def test_every_consumer_runs_with_the_candidates_recorded_settings(int8_digits, digits, tmp_path):
    """runtime, eval and bench apply (and report) exactly what candidate.json records on this host."""
    from slimship.measure.bench import BenchTarget, bench
    from slimship.measure.evaluate import evaluate
    from slimship.runtime import create_runtime

    recorded = int8_digits.info["deployment"]
    assert recorded["int8_ops"] and recorded["cpu_class"]
    rt = create_runtime(int8_digits, digits)
    assert dict(rt.settings.session_config) == recorded["session_config"]
    assert rt.describe()["deployment"]["session_config"] == recorded["session_config"]
    ev = evaluate(int8_digits, digits, limit=64, progress=False)
    assert ev["runtime"]["deployment"]["session_config"] == recorded["session_config"]
    res = bench(
        [BenchTarget("q", int8_digits, "onnxruntime")],
        digits,
        [1],
        runs=30,
        memory=False,
        progress=False,
        min_seconds=0.05,
    )
    entry = res["candidates"][0]
    assert entry["runtime"]["deployment"]["session_config"] == recorded["session_config"]
    from slimship.measure.energy import rapl_zones

    energy = entry["energy"]  # no RAPL here → said plainly, never a figure from a TDP
    assert (
        ("not requested" in energy["reason"])
        if rapl_zones()
        else ("not measurable on this host" in energy["reason"])
    )
    row = entry["results"][0]
    assert row["cpu_ms_per_inference"] > 0 and row["cpu_ms_per_call_p50"] >= 0


def test_the_server_reports_and_applies_the_candidates_settings(int8_digits, tmp_path):
    from tests.serve.conftest import ServerProcess

    recorded = int8_digits.info["deployment"]["session_config"]
    s = ServerProcess(
        tmp_path,
        {"models": [{"name": "q", "path": str(int8_digits.path)}]},
        env={"SLIMSHIP_ADMIN_TOKEN": "t0k3n-adm1n"},
    )
    try:
        base = f"http://{s.url}"
        meta = httpx.get(f"{base}/v2/models/q").json()
        assert meta["parameters"]["runtime_settings"]["session_config"] == recorded
        state = httpx.get(f"{base}/v2/admin/models", headers={"Authorization": "Bearer t0k3n-adm1n"}).json()
        assert state["models"]["q"]["versions"]["1"]["runtime_settings"]["session_config"] == recorded
    finally:
        s.stop()
