"""convert-executorch on real models: mnist → .pte (XNNPACK) verified against PyTorch, run by ExecuTorch's own runtime
with the same predict contract as ONNX Runtime and PyTorch, its batch bound enforced; and the bad inputs: a graph the
toolchain refuses (the operation named), the package missing (the extra named), a crash inside the converter or the
runtime (caught in their subprocesses, named, this process unaffected), and runtimes asking for different thread
counts in one process (XNNPACK's pool resized under a loaded program corrupted the heap: what killed the serial run)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from slimship.errors import ExportError, InputSpecError, RuntimeUnavailableError
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def et_chain(mnist, mnist_exported, tmp_path_factory):
    from slimship.passes import run_pass

    root = tmp_path_factory.mktemp("executorch")
    orig, exp = mnist_exported
    pte = run_pass("convert-executorch", orig, mnist, {"max_batch": 32, "verify_samples": 64}, root / "pte")
    return orig, exp, pte


def test_mnist_program_is_verified_and_runs_like_torch_and_onnx_runtime(et_chain, mnist):
    from slimship.measure.probe import check_probe
    from slimship.runtime import create_runtime, default_backend

    orig, onnx, pte = et_chain
    assert pte.format == "executorch" and pte.artifact == "model.pte" and pte.parent_id == orig.id
    ver = pte.info["verification"]
    assert ver["passed"] and ver["samples"] >= 64
    assert (
        ver["outputs"]["logits"]["top1_agreement"] >= 0.99 and ver["outputs"]["logits"]["cosine_min"] > 0.9999
    )
    rec = pte.info["executorch"]
    assert rec["dim_max"] == {"batch": 32} and rec["dynamic_batch"] and rec["delegate_calls"] >= 1
    assert rec["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 28, 28]}]
    assert pte.info["deployment"]["runtime"] == "executorch" and pte.info["deployment"]["cpu_class"]
    assert default_backend(pte.format) == "executorch"
    rt = create_runtime(pte, mnist, threads=1)
    assert rt.backend == "executorch" and rt.describe()["dim_max"] == {"batch": 32}
    torch_rt, ort = create_runtime(orig, mnist, threads=1), create_runtime(onnx, mnist, threads=1)
    for n in (1, 5, 32):
        batch = mnist.example_inputs(n)
        a = rt.predict(batch)["logits"]
        assert a.shape == (n, 10) and a.dtype == np.float32
        for ref in (torch_rt.predict(batch)["logits"], ort.predict(batch)["logits"]):
            assert np.abs(a - ref).max() < 1e-4 and (a.argmax(1) == ref.argmax(1)).all()
    big = mnist.example_inputs(70)  # beyond the planned bound: run in chunks of 32, same answers
    assert np.abs(rt.predict(big)["logits"] - torch_rt.predict(big)["logits"]).max() < 1e-4
    with pytest.raises(InputSpecError, match="axis 2 must be 28"):
        rt.predict({"pixels": np.zeros((1, 1, 8, 8), np.float32)})
    assert check_probe(pte, rt.predict).passed  # the probe every servable candidate carries holds here


def test_a_custom_operator_is_refused_by_name(tmp_path):
    from slimship.candidate import original_candidate
    from slimship.passes import run_pass
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_custom_op")
    orig = original_candidate(w, tmp_path / "original")
    with pytest.raises(ExportError, match=r"refused operations \['slimship_test::fancy'\]") as err:
        run_pass("convert-executorch", orig, w, {"max_batch": 8}, tmp_path / "pte")
    assert err.value.attempts == {"executorch": "refused: slimship_test::fancy"}
    assert not (tmp_path / "pte").exists()  # no half-written candidate


def test_refused_operations_are_read_from_each_toolchain_message():
    from slimship.passes.executorch import refused_operations

    assert refused_operations("Missing out variants: {'a::b', 'c::d'}") == ["a::b", "c::d"]
    assert refused_operations(
        "\nOperator torch._ops.aten.mkldnn_rnn_layer.default is not in Core ATen opset (https://...)"
    ) == ["torch._ops.aten.mkldnn_rnn_layer.default"]
    assert refused_operations("XNNPACK reshape only supports 1 dynamic dimension. This may occur when ") == [
        "aten.view_copy (XNNPACK reshape, 2 dynamic dims)"
    ]
    assert refused_operations("shape mismatch") == []


def test_missing_package_names_the_extra(monkeypatch, mnist, tmp_path):
    from slimship.candidate import new_candidate
    from slimship.passes import run_pass
    from slimship.runtime.executorch_backend import ExecuTorchRuntime

    # every executorch module (and the ones slimship imports by name) unimportable: `import` raises ImportError
    names = [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]
    names += [
        "executorch",
        "executorch.runtime",
        "executorch.exir",
        "executorch.extension.pybindings",
        "executorch.extension.pybindings._C",
        "executorch.extension.pybindings.portable_lib",
        "executorch.backends.xnnpack.partition.xnnpack_partitioner",
    ]
    for name in set(names):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("SLIMSHIP_EXECUTORCH_TOOLCHAIN", raising=False)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'slimship\[executorch\]'"):
        ExecuTorchRuntime(tmp_path / "model.pte", 1)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")
    cand = new_candidate(
        tmp_path / "src", name="x", format="torch", artifact="model.safetensors", workload=mnist
    )
    with pytest.raises(ExportError, match=r"pip install 'slimship\[executorch\]'"):
        run_pass("convert-executorch", cand, mnist, {}, tmp_path / "out")


def test_settings_round_trip_and_follow_the_host(tmp_path):
    import json

    from slimship.runtime.settings import (
        DeploymentSettings,
        decide_executorch_settings,
        settings_for_candidate,
    )

    s = decide_executorch_settings(threads=2, flags={"avx2"}, arch="x86_64")
    assert s.runtime == "executorch" and s.cpu_class == "avx2" and not s.session_config
    assert DeploymentSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert "executorch (XNNPACK) on avx2: threads 2" in s.describe()
    here, notes = settings_for_candidate(
        {"deployment": s.to_json()}, tmp_path / "model.pte", flags={"avx512f", "avx512_vnni"}
    )
    assert here.runtime == "executorch" and notes == [f"recorded on avx2, loaded on {here.cpu_class}"]
    fresh, _ = settings_for_candidate({}, tmp_path / "model.pte")
    assert fresh.runtime == "executorch"


def test_passes_lists_it_and_says_why_coreml_and_tensorrt_are_not_offered():
    from typer.testing import CliRunner

    from slimship.cli import app

    out = CliRunner().invoke(app, ["passes"], terminal_width=400)
    assert out.exit_code == 0, out.output
    assert "convert-executorch torch → executorch" in out.output
    text = " ".join(out.output.split())
    assert "coreml not offered" in text and "macOS" in text
    assert "tensorrt not offered" in text and "NVIDIA GPU" in text


def test_a_crash_in_the_converter_is_named_and_this_process_goes_on(monkeypatch, mnist, tmp_path):
    from slimship.candidate import original_candidate
    from slimship.passes import run_pass
    from slimship.runtime import create_runtime

    orig = original_candidate(mnist, tmp_path / "original")
    monkeypatch.setenv("SLIMSHIP_EXECUTORCH_CONVERT_CRASH", "1")  # the subprocess SIGSEGVs itself first
    with pytest.raises(ExportError, match=r"converter .* crashed with SIGSEGV in its subprocess") as err:
        run_pass("convert-executorch", orig, mnist, {"max_batch": 4, "verify_samples": 8}, tmp_path / "pte")
    assert "this process was not affected" in str(err.value) and err.value.attempts == {
        "executorch": "crashed: -11"
    }
    assert not (tmp_path / "pte").exists()  # no half-written candidate
    out = create_runtime(orig, mnist, threads=1).predict(mnist.example_inputs(2))["logits"]
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_a_crash_in_the_runtime_is_caught_by_its_load_probe(et_chain, mnist, monkeypatch, tmp_path):
    from slimship.errors import RuntimeUnavailableError
    from slimship.runtime import create_runtime

    _orig, _onnx, pte = et_chain
    monkeypatch.setenv("SLIMSHIP_EXECUTORCH_PROBE_CRASH", "1")  # the probe child SIGSEGVs itself
    with pytest.raises(RuntimeUnavailableError, match=r"crashed with SIGSEGV in a probe subprocess") as err:
        create_runtime(pte, mnist, threads=1)
    assert "this process was not affected and did not load it" in str(err.value)


_MIXED_THREADS = """
import sys
import numpy as np, torch
from slimship.candidate import load_candidate
from slimship.runtime import create_runtime
from slimship.workload import resolve_workload
cand = load_candidate(sys.argv[1])
w = resolve_workload(cand.workload)
rts = [create_runtime(cand, w, threads=t) for t in (2, 1, 2, 1)]  # all alive at once
for i in range(20):
    for rt in rts:
        rt.predict(w.example_inputs(1 + i % 7))
    torch.nn.functional.conv2d(torch.randn(8, 3, 32, 32), torch.randn(4, 3, 3, 3))  # allocations a corrupt heap trips on
print("threads", [rt.threads for rt in rts], "note" in str(rts[1].describe()))
"""


def test_runtimes_asking_for_different_thread_counts_share_the_pool_and_survive(et_chain):
    """Resizing XNNPACK's pool under a loaded program frees memory that program still writes to (a SIGSEGV or
    "corrupted size vs. prev_size" later, anywhere); run in a child so a regression fails here, not the whole run."""
    _orig, _onnx, pte = et_chain
    done = subprocess.run(
        [sys.executable, "-c", _MIXED_THREADS, str(pte.path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "SLIMSHIP_EXECUTORCH_PROBE": "off",
        },  # the crash under test is in this child itself
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert (
        "threads [2, 2, 2, 2] True" in done.stdout
    )  # the first sized the pool; the others run on it and say so
