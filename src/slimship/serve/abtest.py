"""A/B outcomes: feedback for answered requests, per-variant rates with confidence intervals, and a significance test.

The server remembers which version answered each request id (the protocol's ``id``, else ``x-request-id``) for a
while; ``POST /v2/models/{m}/feedback {"id": …, "outcome": true|false|number, "metric": "conversion"}`` attaches an
outcome. Per metric and variant:

- binary outcomes: the rate with a Wilson 95% interval; a variant is compared with the control by a two-proportion
  z-test, or Fisher's exact test when an arm has fewer than 5 successes or failures;
- numeric outcomes: the mean with a t interval; Welch's t-test.

A difference is called significant only when every compared arm has ``min_samples`` outcomes and p < alpha (Bonferroni-
corrected when several variants are compared with one control). Below that the verdict is "not enough data", with the
smallest difference the current sample sizes could detect (80% power). Looking at a fixed-horizon test again and
again inflates false positives: decide the sample size first and read the verdict once it is reached.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from slimship.serve.protocol import NotFound, ProtocolError


@dataclass
class Arm:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    binary: bool = True

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.total_sq += x * x
        if x not in (0.0, 1.0):
            self.binary = False

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def var(self) -> float:
        if self.n < 2:
            return float("nan")
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


def wilson(successes: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good coverage even near 0 or 1 and for small n)."""
    from scipy.stats import norm

    if n == 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + conf / 2))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(arm: Arm, conf: float = 0.95) -> tuple[float, float]:
    from scipy.stats import t

    if arm.n < 2:
        return (float("-inf"), float("inf"))
    half = float(t.ppf(0.5 + conf / 2, arm.n - 1)) * math.sqrt(arm.var / arm.n)
    return (arm.mean - half, arm.mean + half)


def compare(control: Arm, variant: Arm, binary: bool) -> dict[str, Any]:
    """p-value and the difference (variant − control) with its 95% interval."""
    from scipy import stats

    diff = variant.mean - control.mean
    if binary:
        s1, s2 = round(control.total), round(variant.total)
        f1, f2 = control.n - s1, variant.n - s2
        se = math.sqrt(
            control.mean * (1 - control.mean) / control.n + variant.mean * (1 - variant.mean) / variant.n
        )
        if min(s1, s2, f1, f2) < 5:
            p = float(stats.fisher_exact([[s2, f2], [s1, f1]]).pvalue)
            test = "fisher_exact"
        else:
            pooled = (s1 + s2) / (control.n + variant.n)
            se0 = math.sqrt(pooled * (1 - pooled) * (1 / control.n + 1 / variant.n))
            p = float(2 * stats.norm.sf(abs(diff) / se0)) if se0 > 0 else 1.0
            test = "two_proportion_z"
    else:
        se = math.sqrt(control.var / control.n + variant.var / variant.n)
        if se == 0:
            p, test = (1.0 if diff == 0 else 0.0), "welch_t"
        else:
            p = float(
                stats.ttest_ind_from_stats(
                    variant.mean,
                    math.sqrt(variant.var),
                    variant.n,
                    control.mean,
                    math.sqrt(control.var),
                    control.n,
                    equal_var=False,
                ).pvalue
            )
            test = "welch_t"
    return {
        "test": test,
        "p_value": p,
        "difference": diff,
        "difference_ci95": (diff - 1.96 * se, diff + 1.96 * se),
        "detectable_difference": (1.96 + 0.8416) * se,
    }


class FeedbackStore:
    """Which version answered which request, and the outcomes reported for them."""

    def __init__(self, max_ids: int = 200_000, ttl_s: float = 24 * 3600.0) -> None:
        self.max_ids, self.ttl_s = max_ids, ttl_s
        # (model, id) → (version, time answered, metrics that already have an outcome)
        self._ids: OrderedDict[tuple[str, str], tuple[str, float, set[str]]] = OrderedDict()
        self.arms: dict[tuple[str, str], dict[str, Arm]] = {}  # (model, metric) → version → Arm
        #: (model, version) → requests it answered (every one, its id remembered or since forgotten)
        self._answered: dict[tuple[str, str], int] = {}

    def count(self, model: str, version: str) -> None:
        """One more request answered by ``version``."""
        key = (model, version)
        self._answered[key] = self._answered.get(key, 0) + 1

    def tallies(self, model: str) -> dict[str, int]:
        """Requests each version of ``model`` answered (what the clients got, counted by the server)."""
        return {v: n for (m, v), n in sorted(self._answered.items()) if m == model}

    def remember(self, model: str, request_id: str, version: str) -> None:
        key = (model, request_id)
        self._ids[key] = (version, time.time(), set())
        self._ids.move_to_end(key)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def record(self, model: str, request_id: str, outcome: Any, metric: str = "outcome") -> str:
        """Attach an outcome; returns the version that answered. Unknown, expired or repeated ids are errors."""
        if isinstance(outcome, bool):
            value = 1.0 if outcome else 0.0
        elif isinstance(outcome, int | float) and math.isfinite(float(outcome)):
            value = float(outcome)
        else:
            raise ProtocolError(f"outcome must be true/false or a finite number, got {outcome!r}")
        hit = self._ids.get((model, request_id))
        if hit is None or time.time() - hit[1] > self.ttl_s:
            raise NotFound(
                f"no answered request {request_id!r} for {model} (ids are kept {self.ttl_s / 3600:g} h, the last "
                f"{self.max_ids}); send the `id` of the inference request or its x-request-id response header"
            )
        if metric in hit[2]:
            raise ProtocolError(
                f"request {request_id!r} already has a {metric!r} outcome; each request counts once", 409
            )
        hit[2].add(metric)
        self.arms.setdefault((model, metric), {}).setdefault(hit[0], Arm()).add(value)
        return hit[0]

    def summary(
        self, model: str, control: str | None = None, alpha: float = 0.05, min_samples: int = 30
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (m, metric), arms in self.arms.items():
            if m != model:
                continue
            binary = all(a.binary for a in arms.values())
            ctl = control if control in arms else max(arms, key=lambda v: (arms[v].n, v))
            variants: dict[str, Any] = {}
            for v, a in sorted(arms.items()):
                lo, hi = wilson(a.total, a.n) if binary else mean_interval(a)
                variants[v] = {"n": a.n, ("rate" if binary else "mean"): a.mean, "ci95": [lo, hi]}
            others = [v for v in arms if v != ctl]
            level = alpha / max(1, len(others))
            comparisons = {}
            for v in sorted(others):
                a, c = arms[v], arms[ctl]
                if min(a.n, c.n) < max(2, min_samples):
                    cmp: dict[str, Any] = {
                        "verdict": "not enough data",
                        "why": f"{min(a.n, c.n)} outcomes in the smaller arm; {min_samples} needed",
                    }
                    if min(a.n, c.n) >= 2:
                        cmp.update(compare(c, a, binary))
                else:
                    cmp = compare(c, a, binary)
                    cmp["verdict"] = "significant" if cmp["p_value"] < level else "no significant difference"
                cmp["alpha"] = level
                comparisons[f"{v} vs {ctl}"] = cmp
            out[metric] = {
                "kind": "rate" if binary else "mean",
                "control": ctl,
                "variants": variants,
                "comparisons": comparisons,
                "min_samples": min_samples,
            }
        return out
