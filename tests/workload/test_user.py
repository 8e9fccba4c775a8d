from __future__ import annotations

import numpy as np
import pytest

from slimship.errors import WorkloadError
from slimship.workload import resolve_workload
from tests.conftest import FIXTURES

F = FIXTURES / "factories.py"


def test_factory_dict_contract(tmp_path):
    w = resolve_workload(f"{F}:build")
    assert [s.name for s in w.inputs] == ["features"] and w.inputs[0].shape == ("batch", 8)
    assert [s.name for s in w.outputs] == ["logits"]
    assert w.eval_size() == 64 and w.primary_metric == "accuracy"
    assert w.example_inputs(5)["features"].shape == (5, 8)


def test_factory_tuple_contract():
    w = resolve_workload(f"factory:{F}:build_tuple")
    assert w.outputs[0].name == "output_0"
    assert w.example_inputs(3)["features"].dtype == np.float32


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nosuchworkload", "unknown workload 'nosuchworkload'"),
        ("mnsit", "Did you mean 'mnist'"),
        ("missing/file.py:build", "does not exist"),
        (f"{FIXTURES}:build", "path/to/file.py:function"),
        (f"{F}:nope", "has no function 'nope'"),
        (f"{F}:not_callable", "not a function"),
        (f"{F}:build_raises", "raised RuntimeError: checkpoint weights.pt not found"),
        (f"{F}:build_wrong_type", "returned a int"),
        (f"{F}:build_missing_key", "without 'example_inputs'"),
        (f"{F}:build_unknown_key", "unknown keys ['labels']"),
        (f"{F}:build_not_module", "must be a torch.nn.Module, got str"),
        (f"{F}:build_bad_inputs", "failed on its own example_inputs"),
        ("hf:/nonexistent/dir", "does not exist"),
        ("model.onnx", "does not exist"),
    ],
)
def test_bad_workloads_say_what_is_wrong(ref, message):
    with pytest.raises(WorkloadError) as info:
        resolve_workload(ref)
    assert message in str(info.value)


def test_factory_with_a_syntax_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def build(:\n")
    with pytest.raises(WorkloadError, match="importing factory file .* raised SyntaxError"):
        resolve_workload(f"{bad}:build")


def test_unreadable_factory_file(tmp_path):
    weird = tmp_path / "dir.py"
    weird.mkdir()
    with pytest.raises(WorkloadError, match="not a file"):
        resolve_workload(f"{weird}:build")


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(WorkloadError, match="no config.json"):
        resolve_workload(f"hf:{tmp_path}")


def test_onnx_workload_needs_matching_data(digits_chain, tmp_path):
    onnx_path = digits_chain[1].artifact_path
    with pytest.raises(WorkloadError, match="--data inputs.npz"):
        resolve_workload(str(onnx_path))
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(WorkloadError, match=r"missing: \['pixels'\]"):
        resolve_workload(str(onnx_path), data=tmp_path / "wrong.npz")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    np.savez(tmp_path / "ok.npz", pixels=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(WorkloadError, match="not a model ONNX Runtime can load"):
        resolve_workload(str(tmp_path / "garbage.onnx"), data=tmp_path / "ok.npz")


def test_onnx_workload_evaluates_with_labels(digits, digits_chain, tmp_path):
    from slimship.candidate import original_candidate
    from slimship.measure.evaluate import evaluate

    x_te, y_te = digits._split()[2], digits._split()[3]
    np.savez(tmp_path / "data.npz", pixels=x_te, labels=y_te)
    w = resolve_workload(str(digits_chain[1].artifact_path), data=tmp_path / "data.npz")
    assert not w.has_torch_model
    orig = original_candidate(w, tmp_path / "orig")
    assert orig.format == "onnx"
    result = evaluate(orig, w, progress=False)
    assert result["quality"]["accuracy"] > 90.0
    assert result["fidelity"]["top1_agreement"] == 1.0
