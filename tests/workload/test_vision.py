from __future__ import annotations

import numpy as np
import pytest

from slimship.candidate import original_candidate
from slimship.measure.evaluate import evaluate


def test_mnist_reference_reaches_97_percent(mnist, tmp_path):
    orig = original_candidate(mnist, tmp_path / "original")
    result = evaluate(orig, mnist, "torch", limit=None, progress=False)
    assert result["samples"] == 1000
    assert result["quality"]["accuracy"] >= 97.0
    assert result["fidelity"]["top1_agreement"] == 1.0


def test_digits_split_is_fixed_and_stratified(digits):
    x_tr, _y_tr, x_te, y_te = digits._split()
    assert len(x_te) == 360 and len(x_tr) == 1437
    counts = np.bincount(y_te, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert x_tr.dtype == np.float32 and x_tr.shape[1:] == (1, 8, 8)


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    from safetensors.torch import save_file  # noqa: F401 - real safetensors in use

    from slimship.workload.vision import DigitsWorkload

    states = []
    for run in range(2):
        monkeypatch.setenv("SLIMSHIP_CACHE_DIR", str(tmp_path / f"cache{run}"))
        model = DigitsWorkload().build_model()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        cached = list((tmp_path / f"cache{run}" / "references").glob("digits-*.safetensors"))
        assert len(cached) == 1
    for key in states[0]:
        assert np.array_equal(states[0][key].numpy(), states[1][key].numpy()), key


def test_example_inputs_have_the_requested_batch(mnist):
    for bs in (1, 7, 32):
        batch = mnist.example_inputs(bs)
        assert batch["pixels"].shape == (bs, 1, 28, 28)


@pytest.mark.parametrize("bs", [1, 100])
def test_eval_batches_cover_every_sample_once(digits, bs):
    seen = np.concatenate([idx for idx, _ in digits.eval_batches(batch_size=bs)])
    assert np.array_equal(np.sort(seen), np.arange(digits.eval_size()))
