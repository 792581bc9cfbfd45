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
    status: str = "info"  # pass | fail | bound (missed, and so is its ceiling) | info | n/a | error
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    note: str = ""
    # The target's measure (value or ratio) of the same work with no queuectl Python at all,
    # in the same run: its statements alone (tools/bench/trace.py), or the store's own bulk
    # writers. A target missed whose ceiling misses it too is "bound": out of reach on this
    # schema and machine, whatever queuectl's Python does.
    ceiling: float | None = None
    ceiling_label: str = ""
    # What the ceiling leaves out: all of queuectl's Python (NO_PYTHON), or all but the
    # least a queue needs for the work, written by hand (LEAST_PYTHON: a tighter ceiling).
    ceiling_means: str = ""
    target_on: str = ""  # the target's measure: "value" or "ratio"
    target_limit: float | None = None  # the bar the target sets for that measure


NO_PYTHON = "no queuectl Python"
LEAST_PYTHON = "the least Python"


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
    ceiling_samples: Sequence[float] = (),
    ceiling_label: str = "",
    ceiling_baseline_samples: Sequence[float] = (),
    ceiling_means: str = "",
) -> Row:
    """A figure from its samples (the median; against ``baseline_samples``, the median of
    the per-run ratios). ``ceiling_samples``: the same work with no queuectl Python, run
    beside each sample, which tells a target out of reach (status "bound") from one missed;
    for a ratio target, taken against ``ceiling_baseline_samples`` where the baseline's own
    work has queuectl in it too (else against ``baseline_samples``). ``ceiling_means``:
    ``LEAST_PYTHON`` for a ceiling that is the work with the least Python it needs, written
    by hand, rather than with none (``NO_PYTHON``, the default)."""
    if value is None:
        value = median(samples)
    baseline = median(baseline_samples) if baseline_samples else None
    if ratio is None and baseline_samples:
        ratio = paired_ratio(samples, baseline_samples)
    ceiling = None
    if ceiling_samples and target is not None:
        ceiling = (paired_ratio(ceiling_samples,
                                ceiling_baseline_samples or baseline_samples)
                   if target.on == "ratio" else median(ceiling_samples))
    met = target.met(value, ratio) if target else None
    status = "info" if target is None else ("error" if met is None else ("pass" if met else "fail"))
    if status == "fail" and ceiling is not None and target and not target.met(ceiling, ceiling):
        status = "bound"
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
        ceiling=ceiling,
        ceiling_label=ceiling_label if ceiling is not None else "",
        ceiling_means=(ceiling_means or NO_PYTHON) if ceiling is not None else "",
        target_on=target.on if target else "",
        target_limit=target.limit if target else None,
    )
