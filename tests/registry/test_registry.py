"""The registry on SQLite and on a real PostgreSQL: versions, lineage, stages, verified fetches, crash safety,
concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from slimship.errors import RegistryError


def test_register_fetch_stage_and_lineage(registry, digits_chain):
    orig, exp, opt = digits_chain
    v1 = registry.register(exp.path, "digits", measurements={"accuracy": 99.4}, tags={"team": "ml"})
    v2 = registry.register(
        opt.path, "digits", parent=1, recipe={"passes": ["export", "optimize"]}, run={"dir": "runs/x"}
    )
    assert (v1.number, v2.number) == (1, 2) and v2.parent == 1 and v1.digest != v2.digest
    assert v2.original["name"] == "digits" and v2.original["original_candidate_id"] == orig.id
    assert (
        v2.recipe == {"passes": ["export", "optimize"]}
        and v1.measurements == {"accuracy": 99.4}
        and v1.tags == {"team": "ml"}
    )
    # the fetched candidate is a verified copy with the same bytes
    cand = registry.fetch("digits", 2)
    assert cand.format == "onnx" and cand.artifact_path.read_bytes() == opt.artifact_path.read_bytes()
    assert cand.path != opt.path
    # stages: one production version at a time, the old one archived with an event saying why
    registry.set_stage("digits", 1, "production")
    registry.set_stage("digits", 2, "production", reason="faster")
    assert [v.stage for v in registry.versions("digits")] == ["archived", "production"]
    assert registry.get("digits", "production").number == 2 and registry.get("digits", "latest").number == 2
    kinds = [(e["version"], e["kind"], e["detail"].get("to")) for e in registry.events("digits")]
    assert kinds == [
        (1, "registered", None),
        (1, "verified", None),  # its probe's figures: the CPU class it was made on
        (2, "registered", None),
        (2, "verified", None),
        (1, "stage", "production"),
        (1, "stage", "archived"),
        (2, "stage", "production"),
    ]
    from slimship.machine import cpu_class

    assert registry.verified_on("digits", 1) == [cpu_class()]
    assert registry.models()[0] | {"created": None} == {
        "name": "digits",
        "versions": 2,
        "latest": 2,
        "production": 2,
        "description": "",
        "created": None,
    }
    # identical content is stored once
    v3 = registry.register(opt.path, "digits")
    assert v3.digest == v2.digest and v3.number == 3


def test_bad_requests_are_clear_errors(registry, digits_chain):
    _, exp, _ = digits_chain
    registry.register(exp.path, "digits")
    with pytest.raises(RegistryError, match=r"no model 'digit' in the registry; did you mean \['digits'\]"):
        registry.get("digit")
    with pytest.raises(RegistryError, match=r"'digits' has no version 7; versions: \[1\]"):
        registry.get("digits", 7)
    with pytest.raises(RegistryError, match=r"'digits' has no production version; stages: v1 none"):
        registry.get("digits", "production")
    with pytest.raises(RegistryError, match="stage 'prod' is not one of"):
        registry.set_stage("digits", 1, "prod")
    with pytest.raises(RegistryError, match="model name 'my model' must be"):
        registry.register(exp.path, "my model")
    with pytest.raises(RegistryError, match="parent version 5 of 'digits' does not exist"):
        registry.register(exp.path, "digits", parent=5)
    with pytest.raises(RegistryError, match="can't register"):
        registry.register(exp.path.parent, "digits")
    assert [v.number for v in registry.versions("digits")] == [1]  # failed registrations left nothing


def test_a_changed_artifact_is_refused(registry, digits_chain):
    _, exp, _ = digits_chain
    registry.register(exp.path, "digits")
    cand = registry.fetch("digits", 1)
    data = bytearray(cand.artifact_path.read_bytes())
    data[-10] ^= 0xFF
    cand.artifact_path.write_bytes(bytes(data))
    with pytest.raises(
        RegistryError,
        match=r"digits v1: .*model.onnx does not match the registered sha256.*refusing to serve it",
    ):
        registry.fetch("digits", 1)
    # a damaged blob in the store is caught when checking out again
    import shutil

    shutil.rmtree(cand.path)
    blob = registry.store.blob_path(registry.get("digits", 1).files["model.onnx"]["sha256"])
    os.chmod(blob, 0o644)
    blob.write_bytes(b"not a model")
    with pytest.raises(RegistryError, match="does not match the registered sha256"):
        registry.fetch("digits", 1)


WRITER = """
import sys
from slimship.registry import Registry
reg = Registry(sys.argv[1], url=sys.argv[2])
for _ in range(int(sys.argv[4])):
    v = reg.register(sys.argv[3], "digits")
    print(v.number, flush=True)
"""


def _writer(store, url, cand, n, env=None):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), url, str(cand), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def test_concurrent_writers_get_unique_gap_free_numbers(registry_url, tmp_path, digits_chain):
    from slimship.registry import Registry

    _, exp, _ = digits_chain
    procs = [_writer(tmp_path / "store", registry_url, exp.path, 5) for _ in range(4)]
    numbers = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        numbers += [int(x) for x in out.split()]
    assert sorted(numbers) == list(range(1, 21))
    reg = Registry(tmp_path / "store", url=registry_url)
    assert [v.number for v in reg.versions("digits")] == list(range(1, 21))
    assert len({v.digest for v in reg.versions("digits")}) == 1  # same content, one set of blobs
    reg.close()


@pytest.mark.parametrize("point", ["mid_blob", "after_blobs", "before_commit"])
def test_a_writer_killed_mid_registration_leaves_no_version(registry_url, tmp_path, digits_chain, point):
    from slimship.registry import Registry

    _, exp, opt = digits_chain
    reg = Registry(tmp_path / "store", url=registry_url)
    reg.register(exp.path, "digits")
    p = _writer(tmp_path / "store", registry_url, opt.path, 1, env={"SLIMSHIP_REGISTRY_PAUSE": point})
    assert p.stderr is not None
    for line in p.stderr:
        if f"paused at {point}" in line:
            break
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert [v.number for v in reg.versions("digits")] == [1]  # no new version, complete or not
    assert reg.fetch("digits", 1).format == "onnx"
    # the next registration takes the next number (gap-free) and the debris of the killed writer is collectable
    assert reg.register(opt.path, "digits").number == 2
    out = reg.gc(grace_seconds=0)
    assert out["tmp_removed"] >= (1 if point == "mid_blob" else 0)
    assert reg.fetch("digits", 2).artifact_path.read_bytes() == opt.artifact_path.read_bytes()
    reg.close()


def test_gc_keeps_what_versions_reference(registry, digits_chain, tmp_path):
    _, exp, _opt = digits_chain
    registry.register(exp.path, "digits")
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"x" * 1000)
    registry.store.put_file(orphan)
    out = registry.gc(grace_seconds=0)
    assert out["blobs_removed"] == 1 and out["bytes_freed"] == 1000
    assert registry.fetch("digits", 1).format == "onnx"


def test_an_unreachable_database_is_a_clear_error(tmp_path):
    from slimship.registry import Registry

    with pytest.raises(
        RegistryError,
        match=r"can't open the registry database postgresql://u:\*\*\*@127.0.0.1:1/x: connection failed",
    ):
        Registry(tmp_path, url="postgresql://u:secret@127.0.0.1:1/x")


def test_non_finite_figures_are_stored_as_standard_json():
    """An exact verification match has SQNR +inf; PostgreSQL's json type refuses `Infinity` (it failed registrations
    there), so the registry writes standard JSON on every database and the record says "exact" in words."""
    import json as _json
    import math

    from slimship.measure.verify import OutputAgreement
    from slimship.registry.db import strict_json

    assert _json.loads(strict_json({"a": [float("inf"), 1.5, float("nan")], "b": {"c": -math.inf}})) == {
        "a": [None, 1.5, None],
        "b": {"c": None},
    }
    exact = OutputAgreement(0.0, 1.0, 1.0, 1.0, sqnr_db=float("inf"))
    record = exact.to_json()
    assert "sqnr_db" not in record and record["sqnr_exact"] is True
    _json.dumps(record, allow_nan=False)  # standard JSON
    assert OutputAgreement.from_json(record).sqnr_db == float("inf")
