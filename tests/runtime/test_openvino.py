"""The OpenVINO runtime and its passes on real IRs: ONNX → IR converted and verified, NNCF INT8 with the workload's
calibration data, settings recorded and applied, the same predict contract as ONNX Runtime; and the bad inputs:
the package missing, a graph the converter refuses, a crash inside compile (caught in the probe subprocess)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from slimship.errors import CandidateError, ExportError, InputSpecError, RuntimeUnavailableError
from slimship.runtime import create_runtime


@pytest.fixture(scope="module")
def ov_chain(digits, digits_chain, tmp_path_factory):
    from slimship.passes import run_pass

    root = tmp_path_factory.mktemp("openvino")
    fp32 = run_pass("convert-openvino", digits_chain[1], digits, {}, root / "fp32")
    int8 = run_pass(
        "quantize-nncf", fp32, digits, {"calibration_samples": 64, "min_cosine": 0.95}, root / "int8"
    )
    return fp32, int8


def test_converted_ir_is_verified_and_records_the_settings_it_runs_with(ov_chain, digits, digits_chain):
    fp32, _ = ov_chain
    assert fp32.format == "openvino" and fp32.artifact == "model.xml" and (fp32.path / "model.bin").is_file()
    assert fp32.info["verification"]["passed"] and fp32.info["verification"]["samples"] >= 48
    assert fp32.info["verification"]["outputs"]["logits"]["top1_agreement"] == 1.0
    dep = fp32.info["deployment"]
    assert dep["runtime"] == "openvino" and dep["cpu_class"]
    assert dep["openvino_config"] == {
        "INFERENCE_PRECISION_HINT": "f32",
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": "NO",
    }
    # what the compiled model says it used, not what was asked
    executed = fp32.info["openvino"]["executed"]
    assert executed["inference_precision"] == "f32" and executed["num_streams"] == 1
    assert set(executed["runtime_precisions"]) == {"f32"}
    assert fp32.size_bytes > (fp32.path / "model.bin").stat().st_size  # xml + bin
    # the probe is recorded like every other candidate's, and holds here
    assert fp32.info["probe"]["outputs"]["logits"]["cosine_min"] > 0.9999
    rt = create_runtime(fp32, digits, threads=1)
    ort = create_runtime(digits_chain[1], digits, threads=1)
    assert rt.backend == "openvino" and rt.describe()["executed"]["inference_num_threads"] == 1
    for n in (1, 5):
        batch = digits.example_inputs(n)
        a, b = rt.predict(batch), ort.predict(batch)
        assert list(a) == ["logits"] and a["logits"].shape == (n, 10) and a["logits"].dtype == np.float32
        assert np.abs(a["logits"] - b["logits"]).max() < 1e-4
    # the same contract checks as every backend
    with pytest.raises(InputSpecError, match="axis 2 must be 8"):
        rt.predict({"pixels": np.zeros((1, 1, 28, 28), np.float32)})
    from slimship.measure.probe import check_probe

    assert check_probe(fp32, rt.predict).passed


def test_nncf_int8_ir_is_quantized_and_close_to_its_parent(ov_chain, digits):
    fp32, int8 = ov_chain
    assert int8.format == "openvino" and int8.parent_id == fp32.id and int8.pass_name == "quantize-nncf"
    assert int8.info["fake_quantize_nodes"] > 0 and int8.info["calibration_samples"] == 64
    assert int8.info["nncf"]["model_type"] == "generic"  # digits is not a transformer
    precisions = int8.info["openvino"]["executed"]["runtime_precisions"]
    assert {"u8", "i8"} & set(precisions), precisions  # int8 kernels really run
    fid = int8.info["fidelity_to_parent"]["outputs"]["logits"]
    assert fid["cosine_mean"] > 0.99 and fid["top1_agreement"] >= 0.97
    assert int8.info["deployment"]["openvino_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    from slimship.measure.evaluate import evaluate

    quality = {c.name: evaluate(c, digits, threads=1, limit=300, progress=False) for c in (fp32, int8)}
    assert all(q["runtime"]["backend"] == "openvino" for q in quality.values())
    key = quality["openvino"]["primary_metric"]
    assert quality["nncf-int8"]["quality"][key] >= quality["openvino"]["quality"][key] - 0.03, quality


def test_companion_weights_are_part_of_the_candidate(ov_chain, tmp_path):
    import shutil

    from slimship.candidate import load_candidate

    fp32, _ = ov_chain
    copy = tmp_path / "copy"
    shutil.copytree(fp32.path, copy)
    load_candidate(copy).verify_artifact()
    data = bytearray((copy / "model.bin").read_bytes())
    data[0] ^= 0xFF
    (copy / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CandidateError, match=r"model\.bin has sha256"):
        load_candidate(copy).verify_artifact()


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    from slimship.runtime.openvino_backend import OpenVINORuntime

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'slimship\[openvino\]'"):
        OpenVINORuntime(tmp_path / "model.xml", 1)


def test_converter_refusal_names_the_operation(digits, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from slimship.candidate import new_candidate
    from slimship.passes import run_pass

    node = helper.make_node("FancyOp", ["pixels"], ["logits"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
        ),
        str(src / "model.onnx"),
    )
    cand = new_candidate(src, name="custom", format="onnx", artifact="model.onnx", workload=digits)
    with pytest.raises(ExportError, match=r"refused operations \['com\.example\.FancyOp'\]"):
        run_pass("convert-openvino", cand, digits, {}, tmp_path / "out")


def test_a_crash_inside_compile_is_caught_in_the_probe_and_nothing_else_is_affected(
    ov_chain, digits, monkeypatch
):
    fp32, _ = ov_chain
    monkeypatch.setenv("SLIMSHIP_OPENVINO_PROBE_CRASH", "1")  # the probe child dies with SIGFPE
    with pytest.raises(
        RuntimeUnavailableError, match=r"crashed with SIGFPE in a probe subprocess.*onnxruntime"
    ):
        create_runtime(fp32, digits, threads=1)
    monkeypatch.delenv("SLIMSHIP_OPENVINO_PROBE_CRASH")
    # this process is alive and the same candidate loads once compile works
    assert create_runtime(fp32, digits, threads=1).predict(digits.example_inputs(2))["logits"].shape == (
        2,
        10,
    )


def test_nncf_on_onnx_makes_a_qdq_graph_that_onnx_runtime_runs(digits, digits_chain, tmp_path):
    from slimship.passes import run_pass

    q = run_pass("quantize-nncf-onnx", digits_chain[1], digits, {"calibration_samples": 64}, tmp_path / "qdq")
    assert q.format == "onnx" and q.info["nncf"]["backend"] == "onnx"
    assert (
        q.info["ops_after"].get("QuantizeLinear", 0) > 0
        and q.info["ops_after"].get("DequantizeLinear", 0) > 0
    )
    assert "QuantizeLinear" in q.info["deployment"]["int8_ops"]  # ORT's precision entries decided for it
    fid = q.info["fidelity_to_parent"]["outputs"]["logits"]
    assert fid["cosine_mean"] > 0.99 and fid["top1_agreement"] >= 0.95
    rt = create_runtime(q, digits, threads=1)
    assert rt.backend == "onnxruntime" and rt.predict(digits.example_inputs(3))["logits"].shape == (3, 10)


def test_openvino_settings_round_trip_are_explicit_and_follow_the_host(tmp_path):
    import json

    from slimship.errors import ConfigError
    from slimship.runtime.settings import DeploymentSettings, decide_openvino_settings, settings_for_candidate

    amx = decide_openvino_settings(
        threads=2, flags={"avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, arch="x86_64"
    )
    assert amx.cpu_class == "amx" and amx.openvino_config["INFERENCE_PRECISION_HINT"] == "f32"
    assert "bf16" in amx.reasons["INFERENCE_PRECISION_HINT"]
    assert (
        amx.openvino_properties()["INFERENCE_NUM_THREADS"] == 2
        and amx.openvino_properties()["NUM_STREAMS"] == 1
    )
    assert DeploymentSettings.from_json(json.loads(json.dumps(amx.to_json()))) == amx
    # loaded on another CPU class: the precision hint is the candidate's, the host is noted
    here, notes = settings_for_candidate(
        {"deployment": amx.to_json()}, tmp_path / "model.xml", flags={"avx2"}
    )
    assert here.cpu_class == "avx2" and here.openvino_config == amx.openvino_config
    assert notes == ["recorded on amx, loaded on avx2"]
    with pytest.raises(ConfigError, match=r"unknown OpenVINO setting.*INFERENCE_PRECISION_HINT"):
        DeploymentSettings(runtime="openvino", openvino_config={"TURBO": "1"})
    with pytest.raises(ConfigError, match="OpenVINO compile properties need openvino's"):
        DeploymentSettings().openvino_properties()
    with pytest.raises(ConfigError, match="precision 'int3'"):
        decide_openvino_settings(precision="int3")
