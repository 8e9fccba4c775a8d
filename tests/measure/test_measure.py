from __future__ import annotations

import json

import pytest

from slimship.candidate import load_candidate
from slimship.errors import CandidateError, ConfigError
from slimship.measure.bench import BenchTarget, bench
from slimship.measure.evaluate import evaluate


def test_evaluate_reports_quality_and_fidelity(digits, digits_chain):
    orig, _exp, opt = digits_chain
    ref = evaluate(orig, digits, "torch", progress=False)
    onnx_result = evaluate(opt, digits, progress=False)
    assert ref["quality"]["accuracy"] >= 95.0
    assert ref["fidelity"]["top1_agreement"] == 1.0 and ref["fidelity"]["max_abs_error"] == 0.0
    assert onnx_result["quality"]["accuracy"] == pytest.approx(ref["quality"]["accuracy"], abs=0.3)
    assert onnx_result["fidelity"]["logit_cosine_min"] > 0.99999
    assert onnx_result["runtime"]["backend"] == "onnxruntime"


def test_bench_json_has_every_field(digits, digits_chain):
    orig, _exp, opt = digits_chain
    result = bench(
        [BenchTarget("torch", orig, "torch"), BenchTarget("ort", opt, "onnxruntime")],
        digits,
        batch_sizes=(1, 8),
        runs=30,
        warmup=2,
        threads=1,
        min_seconds=0.05,
        progress=False,
    )
    json.dumps(result)  # serialisable
    assert result["schema"] == "slimship.bench/1" and result["baseline"] == "torch"
    assert result["settings"]["interleaved"] is True and result["settings"]["threads"] == 1
    m = result["machine"]
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert flag in m["isa"]
    assert (
        m["cpu_model"]
        and m["physical_cores"] >= 1
        and m["packages"]["onnxruntime"]
        and m["packages"]["torch"]
    )
    for c in result["candidates"]:
        assert (
            c["file_size_bytes"] > 1000
            and c["memory"]["peak_rss_mb"] > 0
            and c["memory"]["model_peak_mb"] >= 0
        )
        assert [r["batch_size"] for r in c["results"]] == [1, 8]
        for r in c["results"]:
            lat = r["latency_ms"]
            assert r["runs"] >= 30
            assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert r["throughput_items_per_s"] == pytest.approx(r["batch_size"] / (lat["mean"] / 1000))
            assert r["speedup_vs_baseline_p50"] > 0
    base = result["candidates"][0]
    assert all(r["speedup_vs_baseline_p50"] == 1.0 for r in base["results"])
    assert base["size_ratio_vs_baseline"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runs": 10}, "at least 30"),
        ({"baseline": "nope"}, "baseline 'nope'"),
        ({"batch_sizes": (0,)}, "positive"),
        ({"warmup": 0}, "warmup"),
        ({"max_seconds": 0}, "max_seconds must be positive"),
    ],
)
def test_bench_rejects_bad_settings(digits, digits_chain, kwargs, message):
    targets = [BenchTarget("a", digits_chain[0], "torch")]
    with pytest.raises(ConfigError, match=message):
        bench(targets, digits, memory=False, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="unique"):
        bench(targets * 2, digits, memory=False, progress=False)


def test_a_time_budget_cuts_slow_batches_to_ten_rounds_and_says_so(digits, digits_chain):
    """max_seconds (how `slimship run` times slow batches): the budget stops the rounds early, never under 10,
    and the row says so; a batch whose calls are fast still gets its full runs. Warm-up stops after two calls
    once they took min_seconds."""
    from slimship.measure.bench import MIN_BUDGET_RUNS

    orig, _exp, opt = digits_chain
    result = bench(
        [BenchTarget("torch", orig, "torch"), BenchTarget("ort", opt, "onnxruntime")],
        digits,
        batch_sizes=(1, 256),
        runs=30,
        warmup=5,
        threads=1,
        min_seconds=1e-9,  # warm-up: two calls; no extra rounds for fast models
        max_seconds=1e-9,  # every batch's budget is spent after its first round
        memory=False,
        progress=False,
    )
    assert result["settings"]["max_seconds"] == 1e-9 and MIN_BUDGET_RUNS == 10
    for c in result["candidates"]:
        for r in c["results"]:
            assert r["runs"] == MIN_BUDGET_RUNS and r["runs_cut_by_time_budget"] is True
    full = bench(
        [BenchTarget("ort", opt, "onnxruntime")],
        digits,
        batch_sizes=(1,),
        threads=1,
        max_seconds=60.0,  # a budget the fast calls never reach: all 30 runs, nothing flagged
        memory=False,
        progress=False,
    )
    row = full["candidates"][0]["results"][0]
    assert row["runs"] >= 30 and row["runs_cut_by_time_budget"] is False


def test_candidate_errors(digits_chain, tmp_path):
    with pytest.raises(CandidateError, match="no candidate.json"):
        load_candidate(tmp_path)
    (tmp_path / "candidate.json").write_text("{not json")
    with pytest.raises(CandidateError, match="can't read"):
        load_candidate(tmp_path)
    exp = digits_chain[1]
    assert [c.name for c in digits_chain[2].lineage()] == ["optimized", "exported", "original"]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "candidate.json").write_text((exp.path / "candidate.json").read_text())
    (copy / "model.onnx").write_bytes(exp.artifact_path.read_bytes()[:-10] + b"corrupted!")
    with pytest.raises(CandidateError, match="changed or corrupted"):
        load_candidate(copy).verify_artifact()
