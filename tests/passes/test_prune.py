"""Structured, depth and unstructured pruning on real models: shapes shrink, the candidate rebuilds from its
safetensors file, exports and verifies, and bad input gets a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimship.candidate import load_candidate, load_torch_model, original_candidate
from slimship.errors import CompressionError, ConfigError
from slimship.passes import (
    DepthPruneConfig,
    DistillConfig,
    LowRankConfig,
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    WeightShareConfig,
    export,
    run_pass,
)
from slimship.train import FinetuneConfig
from tests.conftest import FIXTURES

ONE_EPOCH = {"epochs": 1, "max_seconds": 120}


@pytest.mark.parametrize(
    "cfg",
    [
        StructuredPruneConfig(
            channel_ratio=0.3, head_ratio=0.25, layer_ratios={"0": 0.5}, round_to=8, ignore=["x"]
        ),
        DepthPruneConfig(keep_layers=2, criterion="fidelity"),
        UnstructuredPruneConfig(sparsity=0.9, steps=3, scope="layer"),
        LowRankConfig(param_ratio=0.4, layers=["*.dense"], finetune=None),
        WeightShareConfig(bits=4, layer_bits={"0": 8}),
        DistillConfig(finetune=FinetuneConfig(loss="labels", lr=1e-3)),
    ],
)
def test_configs_round_trip_through_json(cfg):
    again = type(cfg).parse(json.loads(json.dumps(cfg.to_json_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("cls", "data", "needle"),
    [
        (StructuredPruneConfig, {"channel_ratio": 1.5}, "channel_ratio"),
        (StructuredPruneConfig, {"channel_ratio": -0.1}, "channel_ratio"),
        (StructuredPruneConfig, {"channel_ratio": 0.0}, "nothing to prune"),
        (StructuredPruneConfig, {"layer_ratios": {"0": 1.0}}, "must be in (0, 1)"),
        (StructuredPruneConfig, {"head_ratio": 0.25, "head_dim_ratio": 0.25}, "not both"),
        (UnstructuredPruneConfig, {"sparsity": 1.0}, "sparsity"),
        (WeightShareConfig, {"bits": 9}, "bits"),
        (WeightShareConfig, {"layer_bits": {"0": 1}}, "bits must be 2–8"),
        (LowRankConfig, {"energy": 0.9, "param_ratio": 0.5}, "one of energy, param_ratio or sensitivity"),
        (DistillConfig, {"student": {"width": 1.0}}, "equals the teacher"),
        (StructuredPruneConfig, {"chanel_ratio": 0.5}, "chanel_ratio"),
    ],
)
def test_bad_configs_are_config_errors(cls, data, needle):
    with pytest.raises(ConfigError) as err:
        cls.parse(data)
    assert needle in str(err.value)


@pytest.fixture(scope="module")
def digits_original(digits, tmp_path_factory):
    return original_candidate(digits, tmp_path_factory.mktemp("digits-orig"))


@pytest.fixture(scope="module")
def digits_pruned(digits, digits_original, tmp_path_factory):
    return run_pass(
        "prune",
        digits_original,
        digits,
        {"channel_ratio": 0.5, "finetune": {"epochs": 3}},
        tmp_path_factory.mktemp("pruned"),
    )


def test_channel_pruning_removes_channels_and_recovers(digits, digits_original, digits_pruned, tmp_path):
    from slimship.measure.evaluate import evaluate

    ref = load_torch_model(digits_original, digits)
    model = load_torch_model(digits_pruned, digits)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    ref_convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c.out_channels // 2 for c in ref_convs]
    assert model[-1].out_features == 10  # the classifier keeps its outputs
    cx = digits_pruned.info["complexity"]
    assert cx["macs_ratio"] > 3.0 and cx["params_ratio"] > 3.0
    assert cx["torch_latency_ms_after"] > 0 and "speed-up is measured" in cx["note"]
    assert digits_pruned.info["structure"] == []  # shapes alone describe channel pruning
    # quality recovers by distillation: the held-out loss fell and accuracy is close to the original's
    ft = digits_pruned.info["finetune"]
    assert ft["val_loss_best"] < ft["val_loss_before"]
    acc_ref = evaluate(digits_original, digits, progress=False)["quality"]["accuracy"]
    acc = evaluate(digits_pruned, digits, progress=False)["quality"]["accuracy"]
    assert acc >= acc_ref - 6.0
    check = digits_pruned.info["export_check"]  # the pass itself exported and verified the pruned model
    assert check["passed"] and check["cosine_min"] > 0.9999 and check["onnx_bytes"] > 0
    exported = export(digits_pruned, digits, out_dir=tmp_path / "onnx")
    assert exported.info["verification"]["passed"]


def test_rebuilt_candidate_is_reproduced_exactly(digits, digits_pruned):
    a, b = (
        load_torch_model(digits_pruned, digits),
        load_torch_model(load_candidate(digits_pruned.path), digits),
    )
    x = torch.from_numpy(digits.example_inputs(8)["pixels"])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_round_to_and_layer_ratios(digits, digits_original, tmp_path):
    c = run_pass(
        "prune",
        digits_original,
        digits,
        {"channel_ratio": 0.3, "round_to": 8, "layer_ratios": {"0": 0.5}, "finetune": None},
        tmp_path,
    )
    convs = [m for m in load_torch_model(c, digits).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 8  # 16 → 8 by its own ratio
    assert all(cv.out_channels % 8 == 0 for cv in convs)


def test_bn_scale_and_global_scope(digits, digits_original, tmp_path):
    c = run_pass(
        "prune",
        digits_original,
        digits,
        {"channel_ratio": 0.4, "importance": "bn_scale", "scope": "global", "finetune": None},
        tmp_path,
    )
    assert c.info["complexity"]["params_after"] < c.info["complexity"]["params_before"]


def test_taylor_importance_uses_labels(digits, digits_original, tmp_path):
    c = run_pass(
        "prune",
        digits_original,
        digits,
        {"channel_ratio": 0.25, "importance": "taylor", "finetune": None},
        tmp_path,
    )
    assert c.info["complexity"]["macs_ratio"] > 1.2


def test_unknown_layer_names_suggest_real_ones(digits, digits_original, tmp_path):
    with pytest.raises(ConfigError, match="no layer named '9x'"):
        run_pass("prune", digits_original, digits, {"ignore": ["9x"], "finetune": None}, tmp_path)
    with pytest.raises(ConfigError, match="did you mean"):
        run_pass(
            "prune", digits_original, digits, {"layer_ratios": {"100": 0.5}, "finetune": None}, tmp_path / "b"
        )


def test_head_ratio_on_a_cnn_is_an_error(digits, digits_original, tmp_path):
    with pytest.raises(ConfigError, match="BERT-family attention"):
        run_pass(
            "prune",
            digits_original,
            digits,
            {"channel_ratio": 0.0, "head_ratio": 0.5, "finetune": None},
            tmp_path,
        )


def test_untraceable_model_names_the_operation(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_untraceable")
    orig = original_candidate(w, tmp_path / "o")
    with pytest.raises(CompressionError, match=r"act \(NumpyRelu\)") as err:
        run_pass("prune", orig, w, {"channel_ratio": 0.5, "finetune": None}, tmp_path / "p")
    assert "dependency graph" in str(err.value)


def test_fine_tuning_without_training_data_says_how_to_add_it(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build")
    orig = original_candidate(w, tmp_path / "o")
    with pytest.raises(CompressionError, match="needs training data") as err:
        run_pass("prune", orig, w, {"channel_ratio": 0.5}, tmp_path / "p")
    assert "train_inputs" in str(err.value) and "--no-finetune" in str(err.value)
    # without recovery the same pass runs
    assert (
        run_pass("prune", orig, w, {"channel_ratio": 0.5, "finetune": None}, tmp_path / "q").info["finetune"]
        is None
    )


def test_factory_training_data_is_used(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_trainable")
    orig = original_candidate(w, tmp_path / "o")
    c = run_pass(
        "prune", orig, w, {"channel_ratio": 0.5, "finetune": {"epochs": 2, "lr": 1e-2}}, tmp_path / "p"
    )
    assert c.info["finetune"]["loss"] == "kl" and c.info["finetune"]["steps"] > 0


def test_unstructured_pruning_keeps_its_mask_through_fine_tuning(digits, digits_original, tmp_path):
    c = run_pass(
        "sparsify", digits_original, digits, {"sparsity": 0.8, "steps": 2, "finetune": ONE_EPOCH}, tmp_path
    )
    assert c.info["sparsity"] == pytest.approx(0.8, abs=0.01)
    model = load_torch_model(c, digits)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)  # fine-tuning did not revive pruned weights
    assert c.info["compressed_bytes"] < 0.6 * c.info["parent_compressed_bytes"]
    assert "dense runtimes" in c.info["note"]
    assert len(c.info["finetune"]) == 2  # one recovery per schedule step


def test_per_layer_sparsity(digits, digits_original, tmp_path):
    c = run_pass(
        "sparsify", digits_original, digits, {"sparsity": 0.5, "scope": "layer", "finetune": None}, tmp_path
    )
    assert all(s == pytest.approx(0.5, abs=0.02) for s in c.info["sparsity_per_layer"].values())


# ---- transformers --------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    from slimship.workload.base import rowwise_cosine

    return float(rowwise_cosine(a, b).mean())


@pytest.mark.slow
def test_minilm_ffn_and_head_pruning_fix_attention_and_export(minilm, minilm_original, tmp_path):
    c = run_pass(
        "prune",
        minilm_original,
        minilm,
        {
            "channel_ratio": 0.5,
            "head_ratio": 0.25,
            "finetune": None,
            "measure_batch_size": 1,
            "verify_export": False,
        },
        tmp_path / "p",
    )
    model = load_torch_model(c, minilm)
    layer = model.backbone.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 768 and layer.output.dense.in_features == 768
    attn = layer.attention.self
    assert attn.num_attention_heads == 9 and attn.all_head_size == 288 and attn.query.out_features == 288
    assert attn.scaling == pytest.approx(32**-0.5)  # the head size, and so the trained scaling, is unchanged
    assert set(c.info["pruning"]["heads_per_layer"].values()) == {9}
    batch = minilm.example_inputs(4, seq_len=32)
    with torch.no_grad():
        ref = load_torch_model(minilm_original, minilm)(
            **{k: torch.from_numpy(v) for k, v in batch.items()}
        ).numpy()
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    assert 0.3 < _cosine(out, ref) < 0.999  # changed, not broken
    onnx_c = export(c, minilm, out_dir=tmp_path / "onnx")
    assert onnx_c.info["verification"]["passed"]
    q = run_pass(
        "quantize-dynamic", onnx_c, minilm, {}, tmp_path / "int8"
    )  # a pruned model can then be quantized
    assert q.size_bytes < onnx_c.size_bytes / 2


@pytest.mark.slow
def test_minilm_head_dimension_pruning(minilm, minilm_original, tmp_path):
    c = run_pass(
        "prune",
        minilm_original,
        minilm,
        {"channel_ratio": 0.0, "head_dim_ratio": 0.25, "finetune": None, "measure_batch_size": 1},
        tmp_path / "p",
    )
    assert c.info["export_check"]["passed"]  # the narrower heads export and match PyTorch
    attn = load_torch_model(c, minilm).backbone.encoder.layer[3].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (12, 24, 288)
    assert attn.scaling == pytest.approx(32**-0.5)  # the scale the weights were trained with
    assert c.info["pruning"]["head_size"] == 24
    batch = minilm.example_inputs(4, seq_len=32)
    with torch.no_grad():
        ref = load_torch_model(minilm_original, minilm)(
            **{k: torch.from_numpy(v) for k, v in batch.items()}
        ).numpy()
        out = load_torch_model(c, minilm)(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    assert 0.5 < _cosine(out, ref) < 0.9999


def test_minilm_taylor_needs_labels(minilm, minilm_original, tmp_path):
    with pytest.raises(ConfigError, match="no labels"):
        run_pass("prune", minilm_original, minilm, {"importance": "taylor", "finetune": None}, tmp_path)


def test_minilm_depth_pruning(minilm, minilm_original, tmp_path):
    c = run_pass(
        "depth-prune",
        minilm_original,
        minilm,
        {"keep_layers": 3, "finetune": None, "measure_batch_size": 1, "verify_export": False},
        tmp_path / "d",
    )
    assert c.info["layers_kept"] == [0, 2, 5]
    assert c.info["structure"] == [
        {"op": "keep_layers", "module": "backbone.encoder.layer", "keep": [0, 2, 5]}
    ]
    model = load_torch_model(c, minilm)
    assert len(model.backbone.encoder.layer) == 3
    assert c.info["complexity"]["macs_ratio"] == pytest.approx(2.0, rel=0.01)
    assert export(c, minilm, out_dir=tmp_path / "onnx").info["verification"]["passed"]


def test_minilm_depth_by_fidelity_keeps_the_least_harmful(minilm, minilm_original, tmp_path):
    c = run_pass(
        "depth-prune",
        minilm_original,
        minilm,
        {
            "keep_layers": 5,
            "criterion": "fidelity",
            "fidelity_samples": 16,
            "finetune": None,
            "measure_batch_size": 1,
            "verify_export": False,
        },
        tmp_path,
    )
    (step,) = c.info["fidelity_trace"]
    assert len(c.info["layers_kept"]) == 5 and step["dropped"] not in c.info["layers_kept"]
    assert 0.5 < step["cosine_mean_after"] < 1.0


def test_depth_pruning_bad_input(minilm, minilm_original, digits, digits_original, tmp_path):
    with pytest.raises(ConfigError, match="only 6 layers"):
        run_pass("depth-prune", minilm_original, minilm, {"keep_layers": 6, "finetune": None}, tmp_path / "a")
    with pytest.raises(ConfigError, match="ModuleList"):
        run_pass("depth-prune", digits_original, digits, {"keep_layers": 1, "finetune": None}, tmp_path / "b")


def test_expansion_scope_prunes_only_the_hidden_channels_of_inverted_residual_blocks(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_inverted_residual")
    orig = original_candidate(w, tmp_path / "original")
    c = run_pass(
        "prune",
        orig,
        w,
        {"channel_ratio": 0.5, "channel_scope": "expansion", "finetune": None, "measure_batch_size": 4},
        tmp_path / "pruned",
    )
    model = load_torch_model(c, w)
    for b in model.blocks:  # hidden 48 → 24: expansion outputs, depthwise conv, projection inputs
        assert (
            b["expand"].out_channels
            == b["dw"].in_channels
            == b["dw"].groups
            == b["project"].in_channels
            == 24
        )
        assert b["bn1"].num_features == b["bn2"].num_features == 24
    # block outputs (residual-coupled), the stem, the head and the classifier stay whole
    assert [b["project"].out_channels for b in model.blocks] == [8, 16]
    assert (
        model.stem[0].out_channels == 8 and model.head[0].out_channels == 32 and model.fc.out_features == 10
    )
    assert {k.split(".")[2] for k in c.info["pruning"]["changed_shapes"]} == {
        "expand",
        "bn1",
        "dw",
        "bn2",
        "project",
    }
    assert c.info["export_check"]["passed"]  # exported to ONNX and verified against PyTorch
    assert c.info["complexity"]["macs_after"] < c.info["complexity"]["macs_before"]


def test_expansion_convs_of_mobilenetv2_are_its_sixteen_expansion_layers():
    from slimship.passes.prune import expansion_convs
    from slimship.workload.imagenet import mobilenet_v2

    found = expansion_convs(mobilenet_v2().eval(), {"pixels": torch.zeros(1, 3, 224, 224)}, ["pixels"])
    assert found == [f"features.{i}.conv.0.0" for i in range(2, 18)]  # features.1 (t = 1) has no expansion


def test_expansion_scope_on_a_net_without_depthwise_blocks_says_so(digits_chain, digits, tmp_path):
    with pytest.raises(ConfigError, match="channel_scope 'all'"):
        run_pass(
            "prune",
            digits_chain[0],
            digits,
            {"channel_ratio": 0.5, "channel_scope": "expansion", "finetune": None},
            tmp_path / "p",
        )


def _inverted_residual_with_redundant_hidden_channels():
    """The fixture net with block 0's hidden channels 24..47 exact copies of 0..23 and hidden channel 5 a
    constant (its depthwise filter zeroed: BatchNorm shift through ReLU6 only) — what a refit can absorb exactly."""
    from tests.fixtures.factories import build_inverted_residual

    net = build_inverted_residual()["model"]
    b = net.blocks[0]
    with torch.no_grad():
        b["dw"].weight[5] = 0
        b["bn2"].bias[5] = 2.5  # relu6(2.5 - mean·γ/σ): a constant map feeding the projection
        b["expand"].weight[24:] = b["expand"].weight[:24]
        b["dw"].weight[24:] = b["dw"].weight[:24]
        for bn in (b["bn1"], b["bn2"]):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[24:] = t[:24]
    return net.eval()


def test_least_squares_refit_reproduces_the_unpruned_block_when_the_pruned_channels_are_redundant():
    import copy

    import torch_pruning as tp

    from slimship.passes._reconstruct import refit_consumers

    teacher = _inverted_residual_with_redundant_hidden_channels()
    student = copy.deepcopy(teacher)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(64, 3, 32, 32)).astype(np.float32))
    graph = tp.DependencyGraph().build_dependency(student, example_inputs=x[:2])
    removed = [5, *range(24, 48)]
    graph.get_pruning_group(student.blocks[0]["expand"], tp.prune_conv_out_channels, idxs=removed).prune()
    assert student.blocks[0]["project"].in_channels == 23
    with torch.no_grad():
        want = teacher(x)
        plain = student(x)
    batches = [{"pixels": x[i : i + 16].numpy()} for i in range(0, 64, 16)]
    report = refit_consumers(student, teacher, ["blocks.0.project"], batches, ["pixels"], ridge=1e-9)
    with torch.no_grad():
        got = student(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5)
    # removing them without a refit moves the outputs (logits ≈ 0.15) by far more
    assert float((plain - want).abs().max()) > 100 * float((got - want).abs().max())
    layer = report["layers"]["blocks.0.project"]
    assert layer["err_before"] > 0.01 and layer["err_after"] < 1e-6 and layer["refit"] == 1.0


def test_activation_importance_with_refit_keeps_an_inverted_residual_net_closer_than_magnitude(tmp_path):
    from slimship.workload import resolve_workload

    w = resolve_workload(f"{FIXTURES / 'factories.py'}:build_inverted_residual")
    orig = original_candidate(w, tmp_path / "original")
    x = w.example_inputs(4)["pixels"]
    x = np.random.default_rng(2).normal(size=(64, *x.shape[1:])).astype(np.float32)
    with torch.no_grad():
        want = load_torch_model(orig, w)(torch.from_numpy(x)).numpy()
    errors = {}
    for importance, refit in (("l2", "none"), ("activation", "least-squares")):
        c = run_pass(
            "prune",
            orig,
            w,
            {
                "channel_ratio": 0.5,
                "channel_scope": "expansion",
                "importance": importance,
                "reconstruct": refit,
                "reconstruct_samples": 96,
                "finetune": None,
                "measure_batch_size": 4,
                "verify_export": False,
            },
            tmp_path / importance,
        )
        with torch.no_grad():  # rebuilt from its safetensors file: the refit BatchNorm statistics were saved
            got = load_torch_model(c, w)(torch.from_numpy(x)).numpy()
        errors[importance] = float(((got - want) ** 2).mean() / want.var())
        rec = c.info["pruning"]["reconstruction"]
        if refit == "none":
            assert rec is None
        else:
            assert set(rec["layers"]) == {"blocks.0.project", "blocks.1.project"}
            assert rec["mean_err_after"] < rec["mean_err_before"]
    assert errors["activation"] < 0.5 * errors["l2"], errors
