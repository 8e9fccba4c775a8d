"""Recipes: the shipped examples load; every kind of broken recipe names the file, the line and the field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from slimship.errors import ConfigError
from slimship.pipeline.recipe import load_recipe, recipe_json_schema

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["mnist", "minilm", "digits"])
def test_example_recipes_load(name):
    r = load_recipe(ROOT / "examples" / "recipes" / f"{name}.yaml")
    assert r.workload == name and r.passes


def test_published_schema_is_current_and_covers_every_pass():
    from slimship.passes import PASSES

    published = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())
    assert published == json.loads(json.dumps(recipe_json_schema()))  # regenerate: see DEVELOPERS.md
    names = {v["properties"]["pass"]["const"] for v in published["properties"]["passes"]["items"]["oneOf"]}
    assert names == set(PASSES)


def _write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text).lstrip())
    return p


GOOD_HEAD = """
version: 1
workload: digits
passes:
"""


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            GOOD_HEAD + "  - pass: prunee\n",
            ["recipe.yaml:4:", "passes[0].pass", "unknown pass 'prunee'", "did you mean ['prune']"],
        ),
        (
            GOOD_HEAD + "  - pass: prune\n    config: {channel_ratio: lots}\n",
            ["recipe.yaml:5:", "passes[0].config (prune)", "channel_ratio", "'lots'"],
        ),
        ("version: 1\npasses:\n  - pass: export\n", ["recipe.yaml:1:", "workload: Field required"]),
        (
            GOOD_HEAD + "  - pass: prune\nconstraints:\n  max_quality_drop: 1\n  min_fidelity: 1.0\n",
            ["recipe.yaml:7:", "constraints.min_fidelity", "lossy"],
        ),
        (
            GOOD_HEAD + "  - pass: export\nconstrains: {}\n",
            ["recipe.yaml:5:", "constrains", "Extra inputs are not permitted", "allowed keys"],
        ),
        (
            GOOD_HEAD + "  - pass: export\n    confg: {}\n",
            [
                "recipe.yaml:5:",
                "passes[0].confg",
                "allowed keys: ['pass', 'name', 'config', 'skip', 'fallbacks']",
            ],
        ),
        (
            GOOD_HEAD + "  - pass: quantize-dynamic\n  - pass: prune\n",
            ["recipe.yaml:5:", "passes[1].pass", "takes a torch model", "onnx"],
        ),
        (
            GOOD_HEAD + "  - pass: export\nconstraints:\n  max_latency_ms: {batch_size: 0, value: 5}\n",
            ["recipe.yaml:6:", "constraints.max_latency_ms.batch_size", "greater than or equal to 1"],
        ),
        ("workload: digits\npasses: [\n", ["recipe.yaml:", "not valid YAML"]),
        ("- just\n- a list\n", ["a recipe is a mapping"]),
        (
            GOOD_HEAD + "  - pass: export\n    name: a\n  - pass: optimize\n    name: a\n",
            ["step names must be unique"],
        ),
        (
            GOOD_HEAD + "  - pass: export\n  - pass: optimize\n  - pass: quantize-static\n",
            ["recipe.yaml:6:", "FusedConv", "drop the optimize step"],
        ),
    ],
    ids=[
        "unknown-pass",
        "wrong-type",
        "missing-workload",
        "contradictory",
        "unknown-key",
        "unknown-step-key",
        "format-chain",
        "bad-constraint",
        "bad-yaml",
        "not-a-mapping",
        "duplicate-names",
        "static-after-fusion",
    ],
)
def test_broken_recipes_name_file_line_and_field(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


SEARCH = (
    GOOD_HEAD
    + """  - pass: prune
  - pass: export
  - pass: quantize-dynamic
search:
  trials: 10
  params:
"""
)


def test_a_search_space_loads(tmp_path):
    r = load_recipe(
        _write(
            tmp_path,
            SEARCH + "    prune.channel_ratio: {low: 0.2, high: 0.6, step: 0.1}\n"
            "    quantize-dynamic.smooth: {choices: [none, all]}\n"
            "    prune.finetune.epochs: {choices: [1, 2]}\n",
        )
    )
    assert r.search is not None and r.search.trials == 10 and len(r.search.params) == 3


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        (
            "    prunee.channel_ratio: {low: 0.2, high: 0.6}",
            ["recipe.yaml:10:", "search.params.prunee.channel_ratio", "steps: ['prune'"],
        ),
        (
            "    prune.chanel_ratio: {low: 0.2, high: 0.6}",
            ["recipe.yaml:10:", "no config field 'chanel_ratio'"],
        ),
        ("    prune.channel_ratio: {low: 0.6, high: 0.2}", ["recipe.yaml:10:", "low < high"]),
        (
            "    prune.channel_ratio: {choices: [0.3, 1.5]}",
            ["recipe.yaml:10:", "the value 1.5 is not valid for prune", "channel_ratio"],
        ),
        (
            "    quantize-dynamic.smooth: {choices: [some]}",
            ["the value 'some' is not valid for quantize-dynamic"],
        ),
        ("    prune.channel_ratio: {choices: [0.3], low: 0.1}", ["either choices"]),
    ],
    ids=[
        "unknown-step",
        "unknown-field",
        "empty-range",
        "invalid-choice",
        "invalid-literal",
        "choices-and-range",
    ],
)
def test_broken_search_spaces(tmp_path, line, needles):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, SEARCH + line + "\n"))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_a_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


PASS_SEARCH = (
    GOOD_HEAD
    + """  - pass: export
  - name: int8
    pass: quantize-static
search:
  params:
"""
)


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        (
            "    int8.pass: {choices: [quantize-static, quantize-dinamic]}\n",
            ["recipe.yaml:9:", "unknown pass 'quantize-dinamic'"],
        ),
        (
            "    int8.pass: {choices: [quantize-static, prune]}\n",
            [
                "recipe.yaml:9:",
                "with int8.pass = prune the steps don't connect",
                "'prune' takes a torch model but the step before gives onnx",
            ],
        ),
        ("    int8.pass: [quantize-static]\n", ["recipe.yaml:9:", "search.params.int8.pass"]),
        (
            "    int8.pass: {choices: [quantize-static, quantize-dynamic]}\n    int8.bits: {choices: [4, 8]}\n",
            ["recipe.yaml:10:", "quantize-static / quantize-dynamic has no config field 'bits'", "smooth"],
        ),
        (
            "    int8.pass: {choices: [quantize-static, quantize-dynamic]}\n    int8.smooth: {choices: [all, most]}\n",
            ["recipe.yaml:10:", "'most' is not valid for quantize-dynamic"],
        ),
    ],
    ids=[
        "unknown-alternative",
        "format-mismatch",
        "not-choices",
        "field-in-no-alternative",
        "bad-value-for-the-pass-that-has-it",
    ],
)
def test_searched_pass_alternatives_are_validated(tmp_path, params, needles):
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, PASS_SEARCH + params))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_a_field_of_one_alternative_applies_only_to_it(tmp_path):
    from slimship.pipeline.recipe import effective_params
    from slimship.pipeline.search.state import space_size
    from slimship.pipeline.search.trial import apply_params

    r = load_recipe(
        _write(
            tmp_path,
            PASS_SEARCH + "    int8.pass: {choices: [quantize-static, quantize-dynamic]}\n"
            "    int8.smooth: {choices: [none, all]}\n"
            "    int8.calibration: {choices: [minmax, entropy]}\n",
        )
    )
    params = {"int8.pass": "quantize-static", "int8.smooth": "all", "int8.calibration": "entropy"}
    assert effective_params(r, params) == {"int8.pass": "quantize-static", "int8.calibration": "entropy"}
    step = apply_params(r, params)[1]
    assert step.pass_name == "quantize-static" and step.config == {"calibration": "entropy"}
    step = apply_params(r, {**params, "int8.pass": "quantize-dynamic"})[1]
    assert step.pass_name == "quantize-dynamic" and step.config == {"smooth": "all"}
    assert space_size(r) == 4  # static × 2 calibrations + dynamic × 2 smoothings, not 8


def _properties(node, path=""):
    """(path, property schema) of every property in a JSON Schema, $defs and nested schemas included."""
    if isinstance(node, dict):
        for key, prop in (node.get("properties") or {}).items():
            yield f"{path}.{key}", prop
        for key, value in node.items():
            yield from _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _properties(value, f"{path}[{i}]")


def test_recipe_schema_properties_are_documented():
    props = list(_properties(recipe_json_schema()))
    undocumented = [p for p, s in props if not (isinstance(s, dict) and s.get("description"))]
    assert len(props) > 250
    share = 1 - len(undocumented) / len(props)
    assert share >= 0.95, f"{share:.1%} of {len(props)} properties documented; missing: {undocumented}"
