"""Low-rank factorisation, weight sharing, distillation and the shared trainer, on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.candidate import load_torch_model, original_candidate
from slimship.errors import CandidateError, CompressionError, ConfigError
from slimship.passes import export, run_pass
from slimship.passes.share import SHIPPED, load_shared
from slimship.train import FinetuneConfig, finetune
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def digits_original(digits, tmp_path_factory):
    return original_candidate(digits, tmp_path_factory.mktemp("digits-orig"))


def _logits(model, workload, n=64):
    x = torch.from_numpy(workload.example_inputs(n)["pixels"])
    with torch.no_grad():
        return model(x).numpy()


# ---- low-rank ------------------------------------------------------------------------------------


def test_lowrank_is_exact_at_full_rank_and_shrinks_below_it(digits, digits_original, tmp_path):
    from slimship.passes.lowrank import factorize

    ref = load_torch_model(digits_original, digits)
    model = load_torch_model(digits_original, digits)
    fc = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    full = min(model.get_submodule(fc).weight.shape)
    factorize(model, fc, full)
    np.testing.assert_allclose(_logits(model, digits), _logits(ref, digits), atol=1e-4)

    c = run_pass(
        "lowrank",
        digits_original,
        digits,
        {"ranks": {fc: 8}, "min_speedup": 0, "finetune": None},
        tmp_path / "lr",
    )
    rebuilt = load_torch_model(c, digits)
    layer = rebuilt.get_submodule(fc)
    assert layer.down.weight.shape[0] == 8 and layer.up.weight.shape[1] == 8
    assert c.info["structure"] == [{"op": "factorize", "module": fc, "rank": 8}]
    assert c.info["complexity"]["params_after"] < c.info["complexity"]["params_before"]
    assert export(c, digits, out_dir=tmp_path / "onnx").info["verification"]["passed"]


def test_lowrank_break_even_is_measured_and_respected(digits, digits_original, tmp_path):
    # a rank that saves parameters but is timed on ONNX Runtime; with an impossible speed bar nothing qualifies
    with pytest.raises(CompressionError, match="no layer was factorised"):
        run_pass(
            "lowrank",
            digits_original,
            digits,
            {"energy": 0.5, "min_speedup": 50.0, "finetune": None},
            tmp_path / "a",
        )
    c = run_pass(
        "lowrank",
        digits_original,
        digits,
        {"energy": 0.5, "min_speedup": 0.01, "finetune": None},
        tmp_path / "b",
    )
    timed = [d["ort_timing"] for d in c.info["layers"].values() if "ort_timing" in d]
    assert timed and all(t["dense_ms"] > 0 and t["factorised_ms"] > 0 for t in timed)


def test_lowrank_param_budget(digits, digits_original, tmp_path):
    c = run_pass(
        "lowrank",
        digits_original,
        digits,
        {"param_ratio": 0.3, "round_to": 1, "min_speedup": 0, "finetune": None},
        tmp_path,
    )
    kept = [d for d in c.info["layers"].values() if d["decision"] == "factorised"]
    assert kept and all(d["why"].startswith("param_ratio") for d in c.info["layers"].values())
    total = sum(d["in"] * d["out"] for d in c.info["layers"].values())
    used = sum(d["rank"] * (d["in"] + d["out"]) for d in c.info["layers"].values())
    assert used <= 0.3 * total * 1.05


def test_lowrank_rank_by_measured_sensitivity(digits, digits_original):
    from slimship.passes.lowrank import LowRankConfig, sensitivity_ranks

    model = load_torch_model(digits_original, digits)
    layers = {"9": model.get_submodule("9")}
    loose = sensitivity_ranks(model, digits, layers, LowRankConfig(sensitivity=0.5, round_to=2))["9"]
    strict = sensitivity_ranks(model, digits, layers, LowRankConfig(sensitivity=0.9999, round_to=2))["9"]
    assert 2 <= loose < strict <= 32


def test_l1_regularised_training_shrinks_weights(digits, digits_original):
    from slimship.passes.prune import StructuredPruneConfig, structured_prune

    totals = {}
    for l1 in (0.0, 1e-2):
        student = load_torch_model(digits_original, digits)
        structured_prune(student, digits, StructuredPruneConfig(channel_ratio=0.25, finetune=None))
        finetune(
            student,
            load_torch_model(digits_original, digits),
            digits,
            FinetuneConfig(epochs=2, l1_weight=l1, patience=100),
        )
        totals[l1] = sum(
            float(m.weight.detach().abs().sum())
            for m in student.modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        )
    assert totals[1e-2] < 0.95 * totals[0.0]  # measured 0.93: Adam normalises the step, so L1 pulls gently


def test_lowrank_bad_layers(digits, digits_original, tmp_path):
    with pytest.raises(ConfigError, match="match no Linear"):
        run_pass(
            "lowrank", digits_original, digits, {"layers": ["*.nothing"], "finetune": None}, tmp_path / "a"
        )
    with pytest.raises(ConfigError, match="no layer named"):
        run_pass("lowrank", digits_original, digits, {"ranks": {"fc9": 4}, "finetune": None}, tmp_path / "b")


def test_minilm_ffn_lowrank_exports(minilm, minilm_original, tmp_path):
    orig = minilm_original
    c = run_pass(
        "lowrank",
        orig,
        minilm,
        {
            "layers": ["*.0.intermediate.dense"],
            "ranks": {},
            "energy": 0.5,
            "min_speedup": 0,
            "finetune": None,
            "measure_batch_size": 1,
            "verify_export": False,
        },
        tmp_path / "lr",
    )
    (decision,) = c.info["layers"].values()
    assert decision["decision"] == "factorised" and decision["rank"] % 8 == 0 and decision["rank"] < 384
    assert export(c, minilm, out_dir=tmp_path / "onnx").info["verification"]["passed"]


# ---- weight sharing ------------------------------------------------------------------------------


def test_weight_sharing_codebooks_and_shipped_file(digits, digits_original, tmp_path):
    c = run_pass("share", digits_original, digits, {"bits": 4, "finetune": {"epochs": 1}}, tmp_path)
    model = load_torch_model(c, digits)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            assert len(torch.unique(m.weight)) <= 16
    shipped = c.path / SHIPPED
    assert c.info["shipped_bytes"] == shipped.stat().st_size
    assert (
        c.info["shipped_ratio_vs_original"] > 4.0
    )  # a 9 k-parameter model: the header and BN tensors weigh in
    shared = {k: t for k, t in c.info["codec"]["tensors"].items() if t["kind"] != "dense"}
    weights = sum(int(np.prod(t["shape"])) for t in shared.values())
    assert sum(t["bytes"] for t in shared.values()) <= weights * 4 / 8 + 16 * 4 * len(
        shared
    )  # ≤ 4 bits/weight + codebooks
    restored = load_shared(shipped, digits)
    np.testing.assert_array_equal(_logits(restored, digits), _logits(model, digits))
    assert c.info["runtime_bytes"] > c.info["shipped_bytes"]


def test_prune_share_encode_keeps_zeros_exact(digits, digits_original, tmp_path):
    sparse = run_pass(
        "sparsify", digits_original, digits, {"sparsity": 0.7, "finetune": None}, tmp_path / "s"
    )
    c = run_pass("share", sparse, digits, {"bits": 3, "finetune": {"epochs": 1}}, tmp_path / "h")
    assert all(layer["zero_cluster"] for layer in c.info["layers"].values())
    model = load_torch_model(c, digits)
    before = load_torch_model(sparse, digits)
    for (n, a), (_, b) in zip(model.named_parameters(), before.named_parameters(), strict=True):
        if n.endswith("weight") and a.ndim > 1:
            assert torch.equal(a == 0, b == 0), n  # exactly the pruned weights are zero


def test_shipped_file_damage_is_detected(digits, digits_original, tmp_path):
    c = run_pass("share", digits_original, digits, {"bits": 5, "finetune": None}, tmp_path)
    data = bytearray((c.path / SHIPPED).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.slimw"
    bad.write_bytes(bytes(data))
    with pytest.raises(CandidateError, match="damaged"):
        load_shared(bad, digits)


# ---- distillation and the trainer ----------------------------------------------------------------


def test_student_from_scratch_distilled_and_label_only(digits, digits_original, tmp_path):
    from slimship.measure.evaluate import evaluate

    runs = {}
    for loss in ("kl", "labels"):
        cfg = {
            "student": {"width": 0.5, "init": "random"},
            "finetune": {"loss": loss, "epochs": 4, "seed": 0},
        }
        runs[loss] = run_pass("distill", digits_original, digits, cfg, tmp_path / loss)
    for c in runs.values():
        assert c.info["complexity"]["params_ratio"] > 2.5
        assert evaluate(c, digits, progress=False)["quality"]["accuracy"] > 60.0  # both learn from scratch
    assert runs["labels"].info["finetune"]["loss"] == "labels"


def test_trainer_time_budget_and_unknown_feature_module(digits, digits_original):
    teacher = load_torch_model(digits_original, digits)
    student = load_torch_model(digits_original, digits)
    rep = finetune(student, teacher, digits, FinetuneConfig(epochs=50, max_seconds=1.0, patience=100))
    assert rep.stopped_by == "time budget" and rep.epochs_run < 50
    assert rep.kept.startswith("initial")  # a copy of the teacher can't improve: the report says so
    with pytest.raises(CompressionError, match="doesn't exist"):
        finetune(
            student, teacher, digits, FinetuneConfig(epochs=1, feature_weight=1.0), feature_map={"nope": "0"}
        )


def test_trainer_feature_matching_with_projection(digits, digits_original):
    from slimship.passes.prune import StructuredPruneConfig, structured_prune

    teacher = load_torch_model(digits_original, digits)
    student = load_torch_model(digits_original, digits)
    structured_prune(student, digits, StructuredPruneConfig(channel_ratio=0.5, finetune=None))
    rep = finetune(
        student, teacher, digits, FinetuneConfig(epochs=2, feature_weight=1.0), feature_map={"2": "2"}
    )
    assert rep.steps > 0 and rep.val_loss_best <= rep.val_loss_before


def test_labels_loss_needs_labels(minilm, minilm_original, tmp_path):
    orig = minilm_original
    with pytest.raises(CompressionError, match="needs labelled"):
        run_pass(
            "distill",
            orig,
            minilm,
            {"student": {"num_layers": 2}, "finetune": {"loss": "labels", "max_batches_per_epoch": 1}},
            tmp_path / "d",
        )


def test_distillation_needs_training_data(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build")
    orig = original_candidate(w, tmp_path / "o")
    with pytest.raises(CompressionError, match="needs training data"):
        run_pass("distill", orig, w, {"student": {"width": 0.5}}, tmp_path / "d")


def test_trainer_validates_every_n_steps_on_a_bounded_held_out_set(digits, digits_original):
    from slimship.passes.prune import StructuredPruneConfig, structured_prune

    teacher = load_torch_model(digits_original, digits)
    student = load_torch_model(digits_original, digits)
    structured_prune(student, digits, StructuredPruneConfig(channel_ratio=0.5, finetune=None))
    rep = finetune(
        student, teacher, digits, FinetuneConfig(epochs=1, eval_every=5, max_val_batches=1, patience=100)
    )
    assert rep.val_batches == 1
    steps = [h["step"] for h in rep.history]
    assert steps[:-1] == list(range(5, 5 * len(steps), 5)) and steps[-1] == rep.steps
    assert rep.val_loss_best == min(h["val_loss"] for h in rep.history)


def test_weight_sharing_stores_tied_weights_once_and_keeps_them_tied(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_tied")
    orig = original_candidate(w, tmp_path / "o")
    c = run_pass("share", orig, w, {"bits": 4, "finetune": None}, tmp_path / "s")
    tied = {"emb.weight", "head.weight"}
    assert len(tied & set(c.info["layers"])) == 1  # clustered once
    restored = load_shared(c.path / SHIPPED, w)
    assert restored.head.weight.data_ptr() == restored.emb.weight.data_ptr()
    assert len(torch.unique(restored.head.weight)) <= 16
    tokens = torch.from_numpy(w.example_inputs(4)["tokens"])
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens), load_torch_model(c, w)(tokens))


def test_lowrank_splits_a_1x1_convolution(tmp_path):
    from slimship.passes.lowrank import factorize
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_conv1x1")
    orig = original_candidate(w, tmp_path / "o")
    x = torch.from_numpy(w.example_inputs(8)["image"])
    ref, full = load_torch_model(orig, w), load_torch_model(orig, w)
    factorize(full, "2", 16)  # full rank: the same function
    with torch.no_grad():
        torch.testing.assert_close(full(x), ref(x), atol=1e-5, rtol=1e-4)
    c = run_pass("lowrank", orig, w, {"ranks": {"2": 4}, "min_speedup": 0, "finetune": None}, tmp_path / "lr")
    split = load_torch_model(c, w).get_submodule("2")
    assert type(split).__name__ == "LowRankConv1x1"
    assert split.down.weight.shape == (4, 16, 1, 1) and split.up.weight.shape == (32, 4, 1, 1)
    assert c.info["export_check"]["passed"]


def test_typed_verbs_read_like_the_style_guide(digits, digits_original, tmp_path):
    import slimship

    c = slimship.prune(
        digits_original,
        digits,
        slimship.StructuredPruneConfig(channel_ratio=0.25, finetune=None, verify_export=False),
        tmp_path,
    )
    assert c.pass_name == "prune" and c.parent_id == digits_original.id


def test_explicit_ranks_alone_touch_only_those_layers(minilm, tmp_path):
    from slimship.passes.lowrank import LowRankConfig, candidate_layers

    model = minilm.build_model()
    name = "backbone.encoder.layer.0.intermediate.dense"
    assert list(candidate_layers(model, minilm, LowRankConfig(ranks={name: 64}))) == [name]
    assert (
        len(candidate_layers(model, minilm, LowRankConfig(ranks={name: 64}, energy=0.9))) > 30
    )  # a rule widens it
