"""Typed records stored in candidate.json: they write the same JSON shape they read back."""

from __future__ import annotations

import json

from slimship.measure.complexity import ComplexityRecord
from slimship.measure.verify import OutputAgreement, VerificationReport
from slimship.passes.quantize import QuantizationReport
from slimship.train import FinetuneReport

STORED_VERIFICATION = {
    "samples": 64,
    "thresholds": {"min_cosine": 0.9999, "atol": 1e-4, "rtol": 1e-3, "min_top1_agreement": 1.0},
    "outputs": {
        "logits": {
            "max_abs_error": 2e-6,
            "max_abs_reference": 9.5,
            "cosine_min": 0.99999,
            "cosine_mean": 0.999995,
            "top1_agreement": 1.0,
        },
        "embedding": {
            "max_abs_error": 1e-3,
            "max_abs_reference": 1.0,
            "cosine_min": 0.998,
            "cosine_mean": 0.999,
        },
    },
    "passed": False,
    "failures": ["embedding: min cosine 0.998000 < 0.9999"],
}


def _same_json(a, b):
    assert json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def test_verification_report_reads_and_writes_the_stored_shape():
    rep = VerificationReport.from_json(STORED_VERIFICATION)
    assert rep.outputs["logits"].top1_agreement == 1.0 and rep.outputs["embedding"].top1_agreement is None
    assert rep.cosine_min == 0.998 and rep.max_abs_error == 1e-3 and not rep.passed
    _same_json(rep.to_json(), STORED_VERIFICATION)
    empty = VerificationReport.from_json(None)
    assert empty.cosine_min is None and not empty.passed
    assert OutputAgreement.from_json({"cosine_min": 0.5}).max_abs_error == 0.0


def test_complexity_record_round_trips_and_recomputes_ratios():
    rec = ComplexityRecord(
        batch_size=8,
        macs_before=400,
        macs_after=100,
        params_before=50,
        params_after=25,
        torch_latency_ms_before=4.0,
        torch_latency_ms_after=2.0,
    )
    stored = rec.to_json()
    assert stored["macs_ratio"] == 4.0 and stored["params_ratio"] == 2.0 and stored["torch_speedup"] == 2.0
    assert ComplexityRecord.from_json(json.loads(json.dumps(stored))) == rec


def test_finetune_report_round_trips():
    rep = FinetuneReport(
        loss="kl",
        lr=1e-3,
        batch_size=64,
        steps=10,
        epochs_run=1,
        validations=1,
        stopped_by="epochs",
        seconds=1.5,
        val_loss_before=2.0,
        val_loss_best=1.0,
        kept="trained",
        history=[{"epoch": 1, "step": 10, "train_loss": 1.2, "val_loss": 1.0}],
        train_batches=9,
        val_batches=1,
    )
    stored = json.loads(json.dumps(rep.to_json()))
    assert FinetuneReport.from_json(stored) == rep and rep.improved
    assert set(stored) >= {"loss", "steps", "stopped_by", "kept", "history", "val_loss_best"}


def test_quantization_report_reads_a_candidates_info():
    info = {
        "quantized_nodes": 12,
        "excluded_nodes": ["MatMul_3"],
        "smoothing": [],
        "seconds": 0.4,
        "warnings": [],
        "ops_after": {"MatMulInteger": 12},
        "int8_initializers": 12,
        "fidelity_to_parent": STORED_VERIFICATION,
        "size_ratio_vs_parent": 3.6,
    }
    rep = QuantizationReport.from_info(info)
    assert rep.quantized_nodes == 12 and rep.fidelity_to_parent.cosine_min == 0.998
    stored = rep.to_info()
    _same_json(stored, {k: v for k, v in info.items() if k != "smoothing"})
    static = QuantizationReport.from_info({k: v for k, v in info.items() if k != "quantized_nodes"})
    assert static.quantized_nodes is None and "quantized_nodes" not in static.to_info()
