"""A CNN from another framework (`?` dims, Constant weights, opset 11, a near-zero output) through the CLI:
quickstart, static INT8 and --diagnose, as a user runs them."""

from __future__ import annotations

import json

from tests.fixtures import foreign_onnx
from tests.test_cli import slimship


def test_foreign_cnn_goes_through_quickstart_static_int8_and_diagnose(tmp_path):
    model, data = foreign_onnx.write(tmp_path / "in")
    w = ["-w", str(model), "--data", str(data)]
    run = tmp_path / "qs"
    slimship("quickstart", *w, "-o", str(run), "-b", "1", "--no-memory")
    results = json.loads((run / "results.json").read_text())
    original = json.loads((run / "original" / "candidate.json").read_text())
    assert original["info"]["import"]["constant_nodes_folded"] == 14
    assert results["evaluations"]["ort-fp32-optimized"]["fidelity"]["top1_agreement"] == 1.0
    # static INT8 of the folded graph: per-tensor (per-channel at opset 11 is the static pass's own matter)
    static = slimship(
        "quantize", str(run / "original"), *w, "--mode", "static", "--per-tensor", "--no-compare",
        "-o", str(tmp_path / "static"),
    )  # fmt: skip
    assert "logits: cosine to parent" in static.stdout
    # Q/DQ nodes and scales outweigh int8 weights on a model this small: said as "larger", never "0.8x smaller"
    first = next(line for line in static.stdout.splitlines() if line.startswith("int8-static:"))
    assert "x larger than its parent" in first and "smaller" not in first, first
    q = json.loads((tmp_path / "static" / "candidate.json").read_text())
    assert (
        q["info"]["int8_initializers"] > 0
        and q["info"]["fidelity_to_parent"]["outputs"]["logits"]["top1_agreement"] >= 0.9
    )
    # no --mode: a diagnosis of a CNN measures static INT8 (dynamic leaves convolutions in float) and says so
    diag = slimship(
        "quantize", str(run / "original"), *w, "--per-tensor", "--diagnose", "--diagnose-top", "2",
        "-o", str(tmp_path / "diag"),
    )  # fmt: skip
    assert "a CNN: measuring static INT8" in diag.stderr
    assert "Traceback" not in diag.stdout + diag.stderr and "exclude_nodes" in diag.stdout
    report = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert {g["group"] for g in report["groups"]} == {"stem", "block0", "block1", "mask", "head"}
    assert sum(r["op_type"] == "Conv" for r in report["nodes"]) == 6
