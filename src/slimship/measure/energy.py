"""Energy per inference from the CPU's RAPL counters (``/sys/class/powercap``), where the host exposes them.

Read as MLPerf's power rules ask: the counters of every top-level package zone before and after a window of at
least 60 s of steady work, wrap-around handled with ``max_energy_range_uj``. Where the host exposes no RAPL zones
(most VMs, these included) the answer is "not measurable on this host" with the reason — never a figure derived
from a TDP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIN_WINDOW_S", "POWERCAP", "EnergyReading", "RaplZone", "measure_energy", "rapl_zones"]

POWERCAP = Path("/sys/class/powercap")
MIN_WINDOW_S = 60.0


@dataclass(frozen=True)
class RaplZone:
    path: Path
    name: str
    max_energy_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


@dataclass(frozen=True)
class EnergyReading:
    available: bool
    reason: str = ""
    joules: float | None = None
    seconds: float | None = None
    calls: int | None = None
    items: int | None = None
    zones: tuple[str, ...] = ()

    @property
    def joules_per_item(self) -> float | None:
        return None if self.joules is None or not self.items else self.joules / self.items

    @property
    def watts(self) -> float | None:
        return None if self.joules is None or not self.seconds else self.joules / self.seconds

    def to_json(self) -> dict[str, object]:
        return {
            "available": self.available,
            "reason": self.reason,
            "joules": self.joules,
            "seconds": self.seconds,
            "calls": self.calls,
            "items": self.items,
            "joules_per_item": self.joules_per_item,
            "average_watts": self.watts,
            "zones": list(self.zones),
            "method": f"RAPL package counters over a window of ≥ {MIN_WINDOW_S:g} s (MLPerf power rules)",
        }


def rapl_zones(root: Path = POWERCAP) -> list[RaplZone]:
    """Top-level RAPL package zones (``intel-rapl:N``; AMD's kernels expose theirs under the same name), readable."""
    zones: list[RaplZone] = []
    if not root.is_dir():
        return zones
    for d in sorted(root.glob("intel-rapl:*")):
        if d.name.count(":") != 1:  # sub-zones (core, uncore, dram) are inside their package
            continue
        try:
            name = (d / "name").read_text().strip()
            max_uj = int((d / "max_energy_range_uj").read_text().strip())
            int((d / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            continue
        zones.append(RaplZone(d, name, max_uj))
    return zones


def _unavailable(root: Path) -> str:
    if not root.exists():
        return f"not measurable on this host: {root} does not exist (no RAPL powercap; typical of VMs)"
    if not any(root.glob("intel-rapl:*")):
        return f"not measurable on this host: {root} has no RAPL zones"
    return f"not measurable on this host: the RAPL counters under {root} are not readable (permissions: energy_uj is root-only on recent kernels)"


def measure_energy(
    work: Callable[[], int],
    min_seconds: float = MIN_WINDOW_S,
    root: Path = POWERCAP,
    clock: Callable[[], float] = time.perf_counter,
) -> EnergyReading:
    """Run ``work`` (one call → the number of items it processed) repeatedly for ≥ ``min_seconds`` and read the
    package energy it took. ``min_seconds`` below 60 is refused: RAPL windows shorter than that mislead."""
    if min_seconds < MIN_WINDOW_S:
        raise ValueError(
            f"energy windows must be ≥ {MIN_WINDOW_S:g} s (MLPerf power rules), got {min_seconds}"
        )
    zones = rapl_zones(root)
    if not zones:
        return EnergyReading(False, _unavailable(root))
    start = [z.read_uj() for z in zones]
    t0 = clock()
    calls = items = 0
    while clock() - t0 < min_seconds:
        items += work()
        calls += 1
    seconds = clock() - t0
    end = [z.read_uj() for z in zones]
    total_uj = 0
    for z, a, b in zip(zones, start, end, strict=True):
        total_uj += b - a if b >= a else b + z.max_energy_uj - a  # the counter wrapped once
    return EnergyReading(True, "", total_uj / 1e6, seconds, calls, items, tuple(z.name for z in zones))
