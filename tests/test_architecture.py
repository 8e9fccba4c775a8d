"""The architecture is checked, not hoped: a layered import contract (import-linter, configured in pyproject.toml),
no import cycle between modules — module-level or lazy — and no private name imported from another module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests import architecture
from tests.conftest import ROOT


def test_the_layered_import_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_import_cycles_even_through_lazy_imports():
    cycles = architecture.cycles(architecture.graph(include_lazy=True))
    assert cycles == [], "import cycles (module-level or inside functions): " + "; ".join(
        " ↔ ".join(c) for c in cycles
    )


def test_no_private_name_is_imported_from_another_module():
    found = architecture.private_imports()
    assert found == [], "make these public where they are shared, or move them:\n" + "\n".join(found)


def test_the_probe_sees_cycles_and_private_imports(tmp_path, monkeypatch):
    """The probe itself can fail: a lazy cycle and a private import in a throw-away package are both reported."""
    pkg = tmp_path / "slimship"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from slimship.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from slimship import a\n\n_hidden = 1\n")
    monkeypatch.setattr(architecture, "SRC", tmp_path)
    assert architecture.cycles(architecture.graph()) == [["slimship.a", "slimship.b"]]
    assert architecture.cycles(architecture.graph(include_lazy=False)) == []
    assert architecture.private_imports() == ["slimship.a:1 imports _hidden from slimship.b"]
