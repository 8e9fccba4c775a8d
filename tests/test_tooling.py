"""Lint and type checks are part of the suite, so CI holds them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_ruff_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy", "src"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "src", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, "run `ruff format src tests benchmarks`:\n" + proc.stdout + proc.stderr


#: the complexity rule: no function above MAX_COMPLEXITY, except those in the baseline, which may only get simpler
#: (a ratchet: when one drops to the limit or below, the test asks for its line to be removed)
MAX_COMPLEXITY = 15
COMPLEXITY_BASELINE = ROOT / "tests" / "complexity_baseline.json"


def measure_complexity() -> dict[str, int]:
    import json
    import re

    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--config", f"lint.mccabe.max-complexity={MAX_COMPLEXITY}",
         "--output-format", "json", "--exit-zero", "src"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = {}
    for item in json.loads(proc.stdout):
        m = re.match(r"`(.+)` is too complex \((\d+) > \d+\)", item["message"])
        assert m, item["message"]
        rel = Path(item["filename"]).resolve().relative_to(ROOT / "src").as_posix()
        out[f"{rel}:{m.group(1)}"] = int(m.group(2))
    return dict(sorted(out.items()))


def test_complexity_ratchet():
    import json

    baseline = json.loads(COMPLEXITY_BASELINE.read_text())
    now = measure_complexity()
    new = {k: v for k, v in now.items() if k not in baseline}
    worse = {k: (baseline[k], v) for k, v in now.items() if k in baseline and v > baseline[k]}
    fixed = sorted(k for k in baseline if k not in now)
    better = {k: (baseline[k], v) for k, v in now.items() if k in baseline and v < baseline[k]}
    assert not new, f"functions above complexity {MAX_COMPLEXITY}: {new}; split them"
    assert not worse, f"functions more complex than the baseline (was, now): {worse}"
    assert not fixed and not better, (
        f"simpler than the baseline — ratchet it down in {COMPLEXITY_BASELINE.name}: remove {fixed}, lower {better}"
    )


def test_mypy_is_stricter_than_before_and_the_package_is_typed():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    for flag in (
        "check_untyped_defs",
        "disallow_untyped_defs",
        "disallow_incomplete_defs",
        "strict_equality",
    ):
        assert cfg.get(flag) is True, flag
    assert (ROOT / "src" / "slimship" / "py.typed").exists()
