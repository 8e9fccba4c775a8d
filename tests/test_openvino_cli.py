"""OpenVINO candidates everywhere a candidate goes, as a user runs it: a recipe that converts and quantizes with NNCF,
`slimship eval`, one interleaved `slimship bench` with ONNX Runtime and OpenVINO rows, `slimship verify`, and the
registry (an IR is an .xml + .bin pair)."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import slimship


@pytest.mark.slow  # several CLI processes, each importing torch and OpenVINO
def test_recipe_eval_bench_and_verify_with_openvino_candidates(tmp_path):
    recipe = tmp_path / "ov.yaml"
    recipe.write_text(
        "version: 1\nworkload: digits\npasses:\n  - pass: export\n  - pass: convert-openvino\n"
        "  - pass: quantize-nncf\n    config: {calibration_samples: 64}\n"
    )
    proc = slimship("run", str(recipe), "-o", str(tmp_path / "run"))
    assert "convert-openvino" in proc.stdout and "quantize-nncf" in proc.stdout
    cands = {
        json.loads(p.read_text())["pass_name"]: p.parent for p in (tmp_path / "run").rglob("candidate.json")
    }
    ov, nncf, onnx = cands["convert-openvino"], cands["quantize-nncf"], cands["export"]
    assert (ov / "model.xml").is_file() and (ov / "model.bin").is_file()
    ev = slimship("eval", str(nncf), "-w", "digits", "--json-out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["runtime"]["backend"] == "openvino" and result["fidelity"]["top1_agreement"] > 0.95, (
        ev.stdout
    )
    slimship(
        "bench",
        f"ort={onnx}",
        f"nncf={nncf}",
        "-w",
        "digits",
        "-b",
        "1",
        "--json-out",
        str(tmp_path / "b.json"),
    )
    data = json.loads((tmp_path / "b.json").read_text())
    assert [(c["label"], c["runtime"]["backend"]) for c in data["candidates"]] == [
        ("ort", "onnxruntime"),
        ("nncf", "openvino"),
    ]
    assert all(c["memory"] for c in data["candidates"])  # peak memory measured in a fresh process for each
    ov_row = data["candidates"][1]
    assert ov_row["runtime"]["executed"]["inference_precision"] == "f32"
    assert {"u8", "i8"} & set(ov_row["runtime"]["executed"]["runtime_precisions"])
    assert ov_row["file_size_bytes"] > (nncf / "model.bin").stat().st_size
    check = slimship("verify", str(nncf))
    assert "holds" in check.stdout and "openvino" in check.stdout


def test_registry_stores_and_serves_back_the_ir_pair(digits, digits_chain, tmp_path):
    from slimship.passes import run_pass
    from slimship.registry.api import Registry
    from slimship.runtime import create_runtime

    ov = run_pass("convert-openvino", digits_chain[1], digits, {}, tmp_path / "ir")
    reg = Registry(tmp_path / "reg")
    v = reg.register(ov.path, "digits-ov")
    assert v.format == "openvino" and v.artifact == "model.xml"
    assert {"model.xml", "model.bin", "candidate.json"} <= set(v.files)
    back = reg.fetch("digits-ov", v.number)
    assert back.id == ov.id and back.format == "openvino"
    batch = digits.example_inputs(3)
    assert (
        create_runtime(back, digits, threads=1).predict(batch)["logits"]
        == create_runtime(ov, digits, threads=1).predict(batch)["logits"]
    ).all()
