"""What a scenario hands back: rows of figures, each against its target, and how a
figure is summed up from its samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    text: str
    on: str  # "value" or "ratio"
    op: str  # ">=" or "<="
    limit: float

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None or not math.isfinite(x):
            return None
        return x >= self.limit if self.op == ">=" else x <= self.limit


@dataclass
class Row:
    scenario: str
    key: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: str = ""
    status: str = "info"  # pass | fail | info | n/a | error
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class ScenarioResult:
    name: str
    ok: bool = False
    seconds: float = 0.0
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def paired_ratio(values: Sequence[float], baselines: Sequence[float]) -> float:
    """Median of the per-run ratios: each figure is compared with the baseline run next to it."""
    return median([v / b for v, b in zip(values, baselines, strict=True)])


def make_row(
    scenario: str,
    key: str,
    figure: str,
    samples: Sequence[float],
    unit: str,
    target: Target | None = None,
    *,
    value: float | None = None,
    baseline_samples: Sequence[float] = (),
    baseline_label: str = "",
    ratio: float | None = None,
    note: str = "",
) -> Row:
    if value is None:
        value = median(samples)
    baseline = median(baseline_samples) if baseline_samples else None
    if ratio is None and baseline_samples:
        ratio = paired_ratio(samples, baseline_samples)
    met = target.met(value, ratio) if target else None
    status = "info" if target is None else ("error" if met is None else ("pass" if met else "fail"))
    return Row(
        scenario=scenario,
        key=key,
        figure=figure,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_label=baseline_label,
        ratio=ratio,
        target=target.text if target else "",
        status=status,
        samples=[round(x, 6) for x in samples],
        baseline_samples=[round(x, 6) for x in baseline_samples],
        note=note,
    )
