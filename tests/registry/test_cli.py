"""`slimship registry …` and `slimship run --register` from the command line, on a SQLite registry."""

from __future__ import annotations

import json

from tests.test_cli import slimship


def test_registry_commands_end_to_end(tmp_path, digits_chain):
    _, exp, opt = digits_chain
    root = ["--root", str(tmp_path / "reg")]
    assert "no models" in slimship("registry", "list", *root).stdout
    assert (
        "registered digits v1"
        in slimship("registry", "register", str(exp.path), "digits", "--tag", "owner=ml", *root).stdout
    )
    assert (
        "registered digits v2"
        in slimship(
            "registry", "register", str(opt.path), "digits", "--parent", "1", "--stage", "production", *root
        ).stdout
    )
    listing = slimship("registry", "list", "digits", *root).stdout.splitlines()
    assert (
        listing[0].startswith("v1")
        and "none" in listing[0]
        and listing[1].startswith("v2")
        and "production" in listing[1]
    )
    shown = json.loads(slimship("registry", "show", "digits", "production", *root).stdout)
    assert shown["number"] == 2 and shown["parent"] == 1 and shown["events"][0]["kind"] == "registered"
    assert (
        "digits v1 is now staging"
        in slimship("registry", "stage", "digits", "1", "staging", "--reason", "retry", *root).stdout
    )
    assert "digits v1 is now archived" in slimship("registry", "archive", "digits", "1", *root).stdout
    assert json.loads(slimship("registry", "list", "--json", *root).stdout)[0]["production"] == 2
    assert "removed 0 blobs" in slimship("registry", "gc", *root).stdout
    bad = slimship("registry", "show", "digitz", *root, check=False)
    assert (
        bad.returncode == 2 and "no model 'digitz'" in bad.stderr and "did you mean ['digits']" in bad.stderr
    )
    bad = slimship("registry", "register", str(exp.path), "digits", "--tag", "nokey", *root, check=False)
    assert bad.returncode == 2 and "use KEY=VALUE" in bad.stderr


def test_run_register_records_recipe_run_and_measurements(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "workload: digits\npasses:\n  - pass: export\n  - pass: quantize-dynamic\nconstraints: {max_quality_drop: 5}\n"
    )
    out = slimship(
        "run",
        str(recipe),
        "-o",
        str(tmp_path / "run"),
        "-b",
        "8",
        "--register",
        "digits-int8",
        "--registry-root",
        str(tmp_path / "reg"),
    ).stdout
    assert "registered digits-int8 v1" in out
    from slimship.registry import Registry

    v = Registry(tmp_path / "reg").get("digits-int8", 1)
    assert v.recipe["passes"][1]["pass"] == "quantize-dynamic" and v.run["step"] == "quantize-dynamic"
    assert v.measurements["evaluation"]["quality"]["accuracy"] > 90 and v.tags == {"constraints": "hold"}
    assert v.measurements["latency"][0]["batch_size"] == 8 and v.format == "onnx"
