"""Routing: a model's group of served versions, their order, and how versionless requests are split between them.

Versions are ordered numerically where they are numbers ("2" before "10"), then by name. Without weights the
registry's production version takes every versionless request when it is loaded, else the newest version; with
weights (A/B, canary) a request goes to a version in proportion to its weight, pinned by a sticky key when the
policy names a header. The server and the dashboard read the same shares.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slimship.serve.compare import ShadowStats
from slimship.serve.config import TrafficPolicy
from slimship.serve.endpoint import ServedEndpoint


def version_key(v: str) -> tuple[int, Any]:
    """Sort key of a version label: numbers numerically, before any other label (sorted by name)."""
    return (0, int(v)) if v.isdigit() else (1, v)


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=version_key)


def next_version(versions: Iterable[str]) -> str:
    """The label a load without one gets: one past the highest numeric label (1 for the first)."""
    return str(1 + max((int(v) for v in versions if v.isdigit()), default=0))


@dataclass
class ModelGroup:
    name: str
    versions: dict[str, ServedEndpoint] = field(default_factory=dict)
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    #: shadow version → agreement with the primary's answers
    shadow_stats: dict[str, ShadowStats] = field(default_factory=dict)

    def labels(self) -> list[str]:
        """The loaded version labels, in version order."""
        return sorted_versions(self.versions)

    def default_version(self) -> str:
        """Where versionless requests go without weights: the registry's production version if it is loaded (a
        candidate loaded next to it gets no traffic until told), else the newest version."""
        prod = [v for v, ep in self.versions.items() if ep.source.get("stage") == "production"]
        return max(prod or self.versions, key=version_key)

    def production_version(self) -> str | None:
        """The loaded version the registry has in production, if any."""
        return next((v for v, ep in self.versions.items() if ep.source.get("stage") == "production"), None)

    def weights(self) -> dict[str, float]:
        """The policy's positive weights of loaded versions."""
        return {v: w for v, w in self.policy.weights.items() if v in self.versions and w > 0}

    def shares(self) -> dict[str, float]:
        """Percent of versionless requests each loaded version answers."""
        weights = self.weights()
        total = sum(weights.values())
        default = self.default_version() if self.versions else None
        return {
            v: (weights.get(v, 0.0) / total * 100) if total else (100.0 if v == default else 0.0)
            for v in self.labels()
        }

    def route(self, sticky_value: str | None) -> ServedEndpoint:
        weights = self.weights()
        if not weights:
            return self.versions[self.default_version()]
        total = sum(weights.values())
        if sticky_value is not None:
            digest = hashlib.sha256(f"{self.name}\0{sticky_value}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            u = random.random()
        acc = 0.0
        for v in sorted(weights, key=version_key):
            acc += weights[v] / total
            if u < acc:
                return self.versions[v]
        return self.versions[max(weights, key=version_key)]

    def without(self, version: str) -> TrafficPolicy:
        """The policy once ``version`` is gone: its weight and a shadow naming it dropped."""
        weights = {v: w for v, w in self.policy.weights.items() if v != version}
        shadow = self.policy.shadow
        if shadow is not None and shadow.version == version:
            shadow = None
        return self.policy.model_copy(update={"weights": weights, "shadow": shadow})
