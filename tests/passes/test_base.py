"""The Pass contract: configs are typed, versioned, documented and round-trip through JSON."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from slimship.errors import ConfigError
from slimship.passes import PASSES, PassConfig, list_passes


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registered_config_round_trips_through_json(name):
    cls = PASSES[name].config_cls
    cfg = cls()
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert data["version"] == cls.current_version
    again = cls.parse(data)
    assert again == cfg and type(again) is cls


@pytest.mark.parametrize("name", sorted(PASSES))
def test_a_newer_config_version_is_refused_with_the_fix(name):
    cls = PASSES[name].config_cls
    with pytest.raises(ConfigError) as info:
        cls.parse({"version": 99})
    msg = str(info.value)
    assert "version 99" in msg and f"version {cls.current_version}" in msg and "upgrade slimship" in msg


def test_an_older_config_version_goes_through_upgrade():
    class Renamed(PassConfig):
        current_version: ClassVar[int] = 2
        version: int = 2
        width: float = 0.5

        @classmethod
        def upgrade(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
            if from_version < 2 and "ratio" in data:
                data["width"] = data.pop("ratio")
            return data

    old = Renamed.parse({"version": 1, "ratio": 0.25})
    assert old == Renamed(width=0.25) and old.version == 2
    assert Renamed.parse({"width": 0.3}).width == 0.3
    with pytest.raises(ConfigError, match="upgrade slimship"):
        Renamed.parse({"version": 3})


def test_default_upgrade_is_the_identity():
    cls = PASSES["export"].config_cls
    assert cls.parse({"version": 0, "opset": 17}) == cls(opset=17)


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_config_field_is_documented_and_listed(name):
    listed = {p["name"]: p for p in list_passes()}[name]
    fields = PASSES[name].config_cls.model_fields
    assert set(listed["fields"]) == set(fields)
    undocumented = [f for f, info in listed["fields"].items() if not info["description"]]
    assert not undocumented, f"{name}: fields without a description: {undocumented}"
    for f, info in listed["fields"].items():
        assert info["description"] == fields[f].description
        assert info["default"] == listed["config"][f]


def test_requires_lists_only_extras_beyond_the_core_install():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    core = {
        d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        for d in pyproject["project"]["dependencies"]
    }
    for name, cls in PASSES.items():
        assert not core & {r.lower() for r in cls.requires}, f"{name} lists a core dependency in requires"
