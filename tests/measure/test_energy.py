"""The RAPL reader on a fake powercap tree (these VMs expose none), and the honest answer where there is none."""

from __future__ import annotations

import pytest

from slimship.measure.energy import measure_energy, rapl_zones


def _zone(root, name, label, energy, max_uj=1_000_000):
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_energy_over_a_window_with_wraparound_on_a_fake_powercap(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 10)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)  # a sub-zone: counted inside its package, not again
    assert [z.name for z in rapl_zones(tmp_path)] == ["package-0", "package-1"]
    t = [0.0]

    def clock():
        return t[0]

    def work():
        t[0] += 20.0  # three calls of 20 s: a 60 s window
        # package 0 wraps (999_000 → 1_000_000 max → 4_000): 5_000 µJ; package 1 grows 2_000_000 µJ
        (p0 / "energy_uj").write_text("4000\n")
        (p1 / "energy_uj").write_text("2000010\n")
        return 32

    r = measure_energy(work, 60, root=tmp_path, clock=clock)
    assert r.available and r.calls == 3 and r.items == 96 and r.seconds == 60.0
    assert r.joules == pytest.approx(0.005 + 2.0)
    assert r.joules_per_item == pytest.approx(2.005 / 96) and r.watts == pytest.approx(2.005 / 60)
    assert r.to_json()["zones"] == ["package-0", "package-1"]


def test_no_powercap_is_said_plainly_and_short_windows_are_refused(tmp_path):
    r = measure_energy(lambda: 1, root=tmp_path / "absent")
    assert not r.available and r.joules is None and "not measurable on this host" in r.reason
    (tmp_path / "empty").mkdir()
    assert "no RAPL zones" in measure_energy(lambda: 1, root=tmp_path / "empty").reason
    with pytest.raises(ValueError, match="≥ 60 s"):
        measure_energy(lambda: 1, 5, root=tmp_path)
