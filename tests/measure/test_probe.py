"""Probes: real inputs + the original's outputs carried by a candidate, re-checked on the host that runs it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from slimship.candidate import load_candidate
from slimship.errors import CandidateError
from slimship.measure.probe import PROBE_FILE, add_probe, check_probe
from slimship.runtime import create_runtime


@pytest.fixture(scope="module")
def probed(digits, digits_chain, tmp_path_factory):
    from slimship.passes import run_pass

    q = run_pass("quantize-dynamic", digits_chain[2], digits, {}, tmp_path_factory.mktemp("probe") / "q")
    return add_probe(q, digits)


def test_a_probe_records_the_fidelity_here_and_passes_here(probed, digits):
    rec = probed.info["probe"]
    assert (probed.path / PROBE_FILE).exists() and rec["samples"] == 32 and rec["cpu_class"]
    fid = rec["outputs"]["logits"]
    assert 0.98 <= fid["cosine_mean"] <= 1.0 and fid["top1_agreement"] >= 0.9
    rt = create_runtime(probed, digits)
    check = check_probe(load_candidate(probed.path), rt.predict, rt.settings.session_config)
    assert check.passed, check.summary()
    assert check.host["logits"].cosine_mean == pytest.approx(fid["cosine_mean"], abs=1e-6)
    assert "holds" in check.summary()


def test_a_host_that_falls_short_is_refused_naming_both_cpu_classes(probed, digits):
    rt = create_runtime(probed, digits)
    rng = np.random.default_rng(0)

    def degraded(batch):
        out = rt.predict(batch)
        return {
            k: v + rng.normal(0, 0.3 * float(np.abs(v).mean()), v.shape).astype(v.dtype)
            for k, v in out.items()
        }

    check = check_probe(probed, degraded)
    assert not check.passed
    assert any("cosine" in f for f in check.failures) and "recorded on" in check.summary()
    assert f"on this host ({check.host_cpu_class})" in check.failures[-1]


def test_altered_weights_missing_probes_and_mismatched_inputs_are_clear_errors(probed, digits, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(probed.path, copy)
    data = bytearray((copy / probed.artifact).read_bytes())
    data[-200] ^= 0x55
    (copy / probed.artifact).write_bytes(bytes(data))
    with pytest.raises(CandidateError, match="changed or corrupted"):
        check_probe(load_candidate(copy), lambda b: {})
    # an older candidate without a probe: the message says how to add one
    meta = json.loads((probed.path / "candidate.json").read_text())
    meta["info"].pop("probe")
    bare = tmp_path / "bare"
    shutil.copytree(probed.path, bare)
    (bare / "candidate.json").write_text(json.dumps(meta))
    with pytest.raises(CandidateError, match="--add-probe"):
        check_probe(load_candidate(bare), lambda b: {})
    # a probe whose inputs don't fit the model
    with pytest.raises(CandidateError, match="can't run its probe's inputs"):
        check_probe(
            probed, lambda b: create_runtime(probed, digits).predict({"wrong": next(iter(b.values()))})
        )
    # a probe file changed after it was recorded
    changed = tmp_path / "changed"
    shutil.copytree(probed.path, changed)
    (changed / PROBE_FILE).write_bytes((changed / PROBE_FILE).read_bytes() + b"x")
    with pytest.raises(CandidateError, match="probe file .* was changed"):
        check_probe(load_candidate(changed), lambda b: {})
