"""The CLI as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES


def slimship(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "slimship.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"slimship {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def test_quickstart_on_digits_writes_results_and_summary(tmp_path):
    out = tmp_path / "qs"
    proc = slimship("quickstart", "-w", "digits", "-o", str(out), "-b", "1,16", "--no-memory")
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "slimship.quickstart/1"
    assert [c["name"] for c in results["candidates"]] == ["original", "exported", "optimized"]
    assert set(results["evaluations"]) == {"pytorch-fp32", "ort-fp32", "ort-fp32-optimized"}
    for ev in results["evaluations"].values():
        assert ev["fidelity"]["top1_agreement"] == 1.0
    assert results["bench"]["baseline"] == "pytorch-fp32"
    summary = (out / "summary.md").read_text()
    assert "## Latency and throughput" in summary and "ort-fp32-optimized" in summary
    assert "results.json" in proc.stdout
    # a second run reuses the verified candidates instead of exporting again
    again = slimship("quickstart", "-w", "digits", "-o", str(out), "-b", "1", "--no-memory")
    assert "reusing exported" in again.stderr and "reusing optimized" in again.stderr


@pytest.mark.slow
def test_export_eval_and_bench_commands(tmp_path):
    slimship("export", "-w", "digits", "-o", str(tmp_path / "run"))
    assert (tmp_path / "run" / "optimized" / "model.onnx").exists()
    ev = slimship(
        "eval", str(tmp_path / "run" / "optimized"), "-w", "digits", "--json-out", str(tmp_path / "eval.json")
    )
    assert "accuracy=" in ev.stdout and "top1_agreement=1" in ev.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == 360
    slimship(
        "bench",
        "pt=original@torch",
        f"ort={tmp_path / 'run' / 'optimized'}",
        f"file={tmp_path / 'run' / 'exported' / 'model.onnx'}",
        "-w",
        "digits",
        "-b",
        "1,4",
        "--no-memory",
        "--json-out",
        str(tmp_path / "bench.json"),
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [c["label"] for c in data["candidates"]] == ["pt", "ort", "file"]


def test_user_errors_are_one_clear_line_without_a_traceback(tmp_path):
    cases = [
        (["eval", "original", "-w", "nosuch"], "unknown workload 'nosuch'"),
        (["eval", str(tmp_path), "-w", "digits"], "no candidate.json"),
        (["eval", "original@tensorrt", "-w", "digits"], "unknown runtime 'tensorrt'"),
        (
            ["export", "-w", f"{FIXTURES / 'factories.py'}:build_raises", "-o", str(tmp_path / "x")],
            "checkpoint weights.pt not found",
        ),
        (["export", "-w", "digits", "--opset", "99", "-o", str(tmp_path / "y")], "opset"),
    ]
    for args, needle in cases:
        proc = slimship(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_bad_option_values(tmp_path):
    proc = slimship("bench", "original", "-w", "digits", "-b", "one", check=False)
    assert proc.returncode == 2 and "comma-separated list of integers" in proc.stderr
    proc = slimship("bench", "original", "-w", "digits", "--runs", "5", check=False)
    assert proc.returncode == 2 and "30" in proc.stderr


@pytest.mark.slow
def test_quantize_command_preflight_static_and_accuracy_aware(digits_chain, tmp_path):
    # the session's digits original + export (what `slimship export --no-optimize` writes; that command runs as a
    # subprocess in test_export_eval_and_bench_commands): a subprocess export here re-imported torch for nothing
    for cand in digits_chain[:2]:
        shutil.copytree(cand.path, tmp_path / "run" / cand.path.name)
    exported = str(tmp_path / "run" / "exported")
    pre = slimship("quantize", exported, "-w", "digits", "--preflight")
    assert "WARNING [dynamic-conv]" in pre.stdout and not (tmp_path / "run" / "exported-dynamic").exists()
    st = slimship(
        "quantize",
        exported,
        "-w",
        "digits",
        "--mode",
        "static",
        "--calibration",
        "minmax",
        "-o",
        str(tmp_path / "static"),
    )
    assert "int8-static" in st.stdout and "speed vs parent" in st.stdout
    meta = json.loads((tmp_path / "static" / "candidate.json").read_text())
    assert meta["pass_name"] == "quantize-static" and set(meta["info"]["speed_vs_parent"]) == {"1", "32"}
    aa = slimship(
        "quantize", exported, "-w", "digits", "--max-quality-drop", "0.5", "-o", str(tmp_path / "aa")
    )
    assert "met the budget" in aa.stdout and (tmp_path / "aa" / "accuracy_aware.json").exists()
    bad = slimship(
        "quantize",
        exported,
        "-w",
        "digits",
        "--mode",
        "static",
        "--calibration",
        "kl",
        "-o",
        str(tmp_path / "x"),
        check=False,
    )
    assert bad.returncode == 2 and "calibration" in bad.stderr and "Traceback" not in bad.stderr
    diag = slimship(
        "quantize",
        exported,
        "-w",
        "digits",
        "--diagnose",
        "--diagnose-top",
        "0",
        "-o",
        str(tmp_path / "diag"),
    )
    assert "exclude_nodes" in diag.stdout
    report = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert all("gain_from_reverting" in r for r in report["nodes"])  # 0 = every node measured
    # a CNN without --mode: diagnosed as static INT8, the mode that quantizes its convolutions
    assert "Paste into a quantize-static config" in (tmp_path / "diag" / "diagnosis.md").read_text()
    assert "a CNN: measuring static INT8" in diag.stderr and report["grouped_by"] == "block"
    qat = slimship(
        "quantize",
        str(tmp_path / "run" / "original"),
        "-w",
        "digits",
        "--mode",
        "qat",
        "-o",
        str(tmp_path / "qat"),
    )
    assert "int8-qat" in qat.stdout and (tmp_path / "qat" / "model.onnx").exists()
    wrong = slimship("quantize", exported, "-w", "digits", "--mode", "qat", check=False)
    assert wrong.returncode == 2 and "fine-tunes a PyTorch candidate" in wrong.stderr
    magic = slimship("quantize", exported, "-w", "digits", "--mode", "magic", check=False)
    assert magic.returncode == 2 and magic.stdout == "" and "unknown --mode 'magic'" in magic.stderr


@pytest.mark.slow
def test_compression_commands_chain_prune_sparsify_share(tmp_path):
    out = tmp_path / "p"
    proc = slimship(
        "prune", "original", "-w", "digits", "--channel-ratio", "0.5", "--epochs", "1", "-o", str(out)
    )
    assert "fewer" in proc.stdout and "measured PyTorch latency" in proc.stdout
    assert "exported:" in proc.stdout and "quality  accuracy=" in proc.stdout
    sparse = slimship(
        "prune",
        str(out / "prune"),
        "-w",
        "digits",
        "--method",
        "unstructured",
        "--sparsity",
        "0.6",
        "--epochs",
        "1",
        "--no-eval",
        "-o",
        str(out),
    )
    assert "sparsity 60" in sparse.stdout and "dense runtimes" in sparse.stdout
    shared = slimship(
        "share",
        str(out / "sparsify"),
        "-w",
        "digits",
        "--bits",
        "4",
        "--epochs",
        "1",
        "--no-eval",
        "-o",
        str(out),
    )
    assert "shipped file" in shared.stdout and (out / "share" / "model.slimw").is_file()
    lr = slimship(
        "lowrank",
        "original",
        "-w",
        "digits",
        "--param-ratio",
        "0.5",
        "--min-speedup",
        "0",
        "--no-finetune",
        "--no-eval",
        "-o",
        str(tmp_path / "lr"),
    )
    assert "factorised" in lr.stdout and "exported:" in lr.stdout
    st = slimship(
        "distill",
        "original",
        "-w",
        "digits",
        "--width",
        "0.5",
        "--epochs",
        "1",
        "--no-eval",
        "--no-export",
        "-o",
        str(tmp_path / "d"),
    )
    assert "recovery:" in st.stdout


@pytest.mark.slow
def test_compression_commands_reject_bad_input(tmp_path):
    bad = slimship("prune", "-w", "digits", "--channel-ratio", "1.5", "-o", str(tmp_path), check=False)
    assert bad.returncode == 2 and "channel_ratio" in bad.stderr and "Traceback" not in bad.stderr
    assert "PydanticUndefined" not in bad.stderr and "layer_ratios={}" in bad.stderr
    bad = slimship(
        "prune", "-w", "digits", "--ignore", "nope", "--no-finetune", "-o", str(tmp_path), check=False
    )
    assert bad.returncode == 2 and "no layer named 'nope'" in bad.stderr
    bad = slimship("prune", "-w", "digits", "--method", "magic", "-o", str(tmp_path), check=False)
    assert bad.returncode == 2 and "structured, depth or unstructured" in bad.stderr
    bad = slimship("share", "-w", "digits", "--layer-bits", "oops", "-o", str(tmp_path), check=False)
    assert bad.returncode == 2 and "LAYER=VALUE" in bad.stderr
    for verb in ("prune", "lowrank", "share", "distill", "layers"):
        assert "Example" in slimship(verb, "--help").stdout
    listing = slimship("layers", "-w", "digits").stdout
    assert "Conv2d" in listing and "16x1x3x3" in listing


@pytest.mark.slow
def test_run_command_on_the_digits_example_recipe(tmp_path):
    from tests.conftest import ROOT

    proc = slimship("run", str(ROOT / "examples" / "recipes" / "digits.yaml"), "-o", str(tmp_path / "run"))
    assert "prune" in proc.stdout and "ran" in proc.stdout
    assert "constraint max_quality_drop" in proc.stdout and "results:" in proc.stdout
    again = slimship("run", str(ROOT / "examples" / "recipes" / "digits.yaml"), "-o", str(tmp_path / "run"))
    assert again.stdout.count("reused") == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload: digits\npasses:\n  - pass: nope\n")
    err = slimship("run", str(bad), "-o", str(tmp_path / "bad"), check=False)
    assert err.returncode == 2 and "bad.yaml:3:" in err.stderr and "Traceback" not in err.stderr


def test_passes_explains_every_field_from_the_config_descriptions():
    """`slimship passes NAME` prints each field's pydantic description — the text the schema and --help carry."""
    from typer.testing import CliRunner

    from slimship.cli import app
    from slimship.passes.quantize import DynamicQuantConfig

    out = CliRunner().invoke(app, ["passes", "quantize-dynamic"], terminal_width=400)
    assert out.exit_code == 0, out.output
    for field, info in DynamicQuantConfig.model_fields.items():
        assert f"  {field} = " in out.output and " ".join(str(info.description).split()) in " ".join(
            out.output.split()
        )
    bad = CliRunner().invoke(app, ["passes", "no-such-pass"])
    assert bad.exit_code != 0
