from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from slimship.candidate import load_candidate, original_candidate
from slimship.errors import ConfigError, ExportError, VerificationError
from slimship.passes import ExportConfig, GraphOptimizeConfig, export, list_passes, optimize_graph, run_pass
from slimship.runtime import create_runtime
from slimship.workload import resolve_workload
from tests.conftest import FIXTURES

F = FIXTURES / "factories.py"


@pytest.mark.parametrize(
    "cfg",
    [ExportConfig(), ExportConfig(opset=17, exporter="torchscript"), GraphOptimizeConfig(level="basic")],
)
def test_configs_round_trip_through_json(cfg):
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert type(cfg).parse(data) == cfg
    assert data["version"] == 1


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"opset": 99}, "opset"),
        ({"exporter": "magic"}, "exporter"),
        ({"opsett": 17}, "opsett"),
        ({"verify": {"min_cos": 1}}, "verify.min_cos"),
    ],
)
def test_invalid_config_names_the_field(data, needle):
    with pytest.raises(ConfigError) as info:
        ExportConfig.parse(data)
    assert needle in str(info.value) and "Valid fields and defaults: opset=18" in str(info.value)


def test_passes_are_listed_with_their_configs():
    names = {p["name"]: p for p in list_passes()}
    assert names["export"]["input"] == "torch" and names["export"]["output"] == "onnx"
    assert names["optimize"]["config"]["level"] == "extended"


def test_digits_export_is_verified_and_recorded(digits_chain):
    orig, exp, _ = digits_chain
    assert exp.format == "onnx" and exp.parent_id == orig.id and exp.pass_name == "export"
    ver = exp.info["verification"]
    assert ver["passed"] and ver["samples"] >= 48
    assert ver["outputs"]["logits"]["top1_agreement"] == 1.0
    assert ver["outputs"]["logits"]["max_abs_error"] < 1e-4
    model = onnx.load(str(exp.artifact_path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not list(exp.path.glob("*.data")), "a small model must be a single file"
    # metadata on disk equals what the pass returned
    assert load_candidate(exp.path) == exp


def test_passes_do_not_mutate_their_input(digits, tmp_path):
    orig = original_candidate(digits, tmp_path / "original")
    before = {p.name: p.read_bytes() for p in orig.path.iterdir()}
    exp = export(orig, digits, out_dir=tmp_path / "exported")
    optimize_graph(exp, digits, out_dir=tmp_path / "optimized")
    assert {p.name: p.read_bytes() for p in orig.path.iterdir()} == before
    orig.verify_artifact()
    with pytest.raises(ConfigError, match="new directory"):
        export(orig, digits, out_dir=orig.path)


def test_wrong_input_format_is_refused(digits_chain, digits):
    _, exp, _ = digits_chain
    with pytest.raises(ConfigError, match="takes a torch candidate"):
        run_pass("export", exp, digits, {}, exp.path.parent / "again")
    with pytest.raises(ConfigError, match="unknown pass"):
        run_pass("quantize-magic", exp, digits)


def test_mnist_export_agrees_on_every_test_image(mnist, mnist_exported):
    from slimship.measure.evaluate import evaluate

    exp = mnist_exported[1]
    result = evaluate(exp, mnist, progress=False)
    assert result["samples"] == 1000
    assert result["fidelity"]["top1_agreement"] == 1.0
    assert result["fidelity"]["logit_cosine_min"] > 0.99999


def test_output_name_colliding_with_an_internal_value(tmp_path):
    w = resolve_workload(f"{F}:build_embedding_output")
    orig = original_candidate(w, tmp_path / "original")
    exp = export(orig, w, ExportConfig(exporter="dynamo"), out_dir=tmp_path / "exported")
    model = onnx.load(str(exp.artifact_path))
    assert [o.name for o in model.graph.output] == ["embedding"]
    onnx.checker.check_model(model)
    rt = create_runtime(exp, w)
    out = rt.predict(w.example_inputs(3))
    assert out["embedding"].shape == (3, 8)


def test_a_model_that_will_not_export(tmp_path):
    w = resolve_workload(f"{F}:build_unexportable")
    orig = original_candidate(w, tmp_path / "original")
    with pytest.raises(ExportError) as info:
        export(orig, w, out_dir=tmp_path / "exported")
    err = info.value
    assert not isinstance(err, VerificationError)
    assert set(err.attempts) == {"dynamo", "torchscript"}
    assert "eigvals" in str(err)
    assert not (tmp_path / "exported" / "model.onnx").exists()


def test_outputs_that_disagree_after_export(tmp_path):
    w = resolve_workload(f"{F}:build_nondeterministic")
    orig = original_candidate(w, tmp_path / "original")
    with pytest.raises(VerificationError) as info:
        export(orig, w, out_dir=tmp_path / "exported")
    report = info.value.report
    assert report["passed"] is False
    assert report["outputs"]["output_0"]["max_abs_error"] > 0.01
    assert "disagree" in str(info.value) and "max abs error" in str(info.value)
    assert not (tmp_path / "exported" / "model.onnx").exists()


def test_torchscript_fallback_is_recorded(digits, tmp_path):
    orig = original_candidate(digits, tmp_path / "original")
    exp = export(orig, digits, ExportConfig(exporter="torchscript"), tmp_path / "ts")
    assert exp.info["exporter"] == "torchscript" and exp.info["exporter_attempts"] == {"torchscript": "ok"}
    assert exp.info["verification"]["passed"]


def test_minilm_export_matches_pytorch_on_bbc_texts(minilm, minilm_chain):
    from slimship.measure.evaluate import evaluate

    _, exp, opt = minilm_chain
    assert exp.info["verification"]["passed"]
    for cand in (exp, opt):
        result = evaluate(cand, minilm, limit=150, progress=False)
        assert result["samples"] == 300
        assert result["fidelity"]["cosine_mean"] >= 0.99999
        assert result["fidelity"]["cosine_min"] >= 0.9999


def test_minilm_graph_optimisation_fuses_transformer_ops(minilm, minilm_chain):
    _, exp, opt = minilm_chain
    ops = opt.info["ops_after"]
    assert ops.get("com.microsoft.SkipLayerNormalization", 0) == 12
    assert ops.get("com.microsoft.BiasGelu", 0) == 6
    assert sum(opt.info["ops_after"].values()) < sum(opt.info["ops_before"].values())
    assert opt.info["verification"]["passed"]
    assert opt.info["verification"]["outputs"]["sentence_embedding"]["cosine_min"] > 0.9999
    # the exported input names and dynamic dims follow the workload's spec
    model = onnx.load(str(exp.artifact_path))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    batch = {"input_ids": np.full((1, 200), 1000, np.int64), "attention_mask": np.ones((1, 200), np.int64)}
    assert create_runtime(opt, minilm).predict(batch)["sentence_embedding"].shape == (1, 384)
