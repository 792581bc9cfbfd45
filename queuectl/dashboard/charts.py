"""The overview's charts as SVG geometry: numbers a template draws, nothing else (the
page's scripts may come only from the dashboard itself, and users may be offline).

Each chart has a value scale on the left (round steps from zero) and the slices' times
below (UTC, as every time the dashboard shows)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

WIDTH, HEIGHT = 360, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 16, 8, 20  # room for the value labels and the time labels
BASE = HEIGHT - BOTTOM  # the y of zero
TIME_EVERY = 3  # slices between two time labels
MAX_STEPS = 4  # steps of the value scale, at most


def bars(activity: dict[str, Any]) -> dict[str, Any]:
    """Completed (below) and failed (stacked on top) runs of each slice, as rectangles."""
    slices = activity["slices"]
    most = max((s["completed"] + s["failed"] for s in slices), default=0)
    frame = _frame(activity, scale(most, whole=True), lambda v: f"{v:,.0f}")
    top, step = frame["levels"][-1]["value"], _plot_width() / len(slices)
    drawn = []
    for i, one in enumerate(slices):
        done, failed = _height(one["completed"], top), _height(one["failed"], top)
        drawn.append({"x": round(LEFT + i * step + 1, 1), "w": round(step - 2, 1),
                      "start": one["start"], "completed": one["completed"],
                      "failed": one["failed"], "done_y": round(BASE - done, 1),
                      "done_h": round(done, 1), "failed_y": round(BASE - done - failed, 1),
                      "failed_h": round(failed, 1)})
    return {**frame, "most": most, "bars": drawn}


def lines(activity: dict[str, Any], field: str) -> dict[str, Any]:
    """The p50 and p95 of ``field`` (``wait`` or ``run_time``) of each slice, as steps: a
    level across each slice that had runs, so that one slice alone still shows as a line,
    and no line across a slice that had none."""
    slices = activity["slices"]
    values = [v for s in slices for v in (s[field]["p50"], s[field]["p95"]) if v is not None]
    most = max(values, default=0.0)
    frame = _frame(activity, scale(most), _level)
    top, step = frame["levels"][-1]["value"], _plot_width() / len(slices)
    series = {}
    for rank in ("p50", "p95"):
        runs: list[list[tuple[float, float]]] = []
        for i, one in enumerate(slices):
            if one[field][rank] is None:
                continue
            y = round(BASE - _height(one[field][rank], top), 1)
            level = [(round(LEFT + i * step, 1), y), (round(LEFT + (i + 1) * step, 1), y)]
            if runs and runs[-1][-1][0] == level[0][0]:
                runs[-1] += level  # the slice before had runs: the line goes on
            else:
                runs.append(level)
        series[rank] = [" ".join(f"{x},{y}" for x, y in run) for run in runs]
    columns = [{"x": round(LEFT + i * step, 1), "w": round(step, 1), "start": s["start"],
                "p50": s[field]["p50"], "p95": s[field]["p95"]} for i, s in enumerate(slices)]
    return {**frame, "most": most, "series": series, "columns": columns}


def _frame(activity: dict[str, Any], ticks: list[float],
           label: Callable[[float], str]) -> dict[str, Any]:
    """The axes: the value scale ``ticks`` (its last the top), and a time label every
    ``TIME_EVERY`` slices (HH:MM, UTC) from the first slice's start to now."""
    bounds = [s["start"] for s in activity["slices"]] + [activity["until"]]
    step = _plot_width() / (len(bounds) - 1)
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT,
            "top": TOP, "bottom": BASE,
            "levels": [{"y": round(BASE - _height(v, ticks[-1]), 1), "value": v,
                        "label": label(v)} for v in ticks],
            "times": [{"x": round(LEFT + i * step, 1), "label": bounds[i][11:16],
                       "at": bounds[i]} for i in range(0, len(bounds), TIME_EVERY)]}


def _level(value: float) -> str:
    """A value of the seconds scale: ``0``, ``500 ms``, ``1.5 s``, ``20 s``."""
    return seconds(value).replace(".0 ", " ") if value else "0"


def _height(value: float, top: float) -> float:
    return value / top * (BASE - TOP)


def _plot_width() -> int:
    return WIDTH - LEFT - RIGHT


def scale(most: float, whole: bool = False) -> list[float]:
    """Tick values from 0 to a round top at or above ``most``, 1, 2 or 5 times a power of
    ten apart, at most ``MAX_STEPS`` steps; ``whole``: whole numbers only (counts)."""
    if most <= 0:
        return [0, 1]
    step = 10.0 ** math.floor(math.log10(most / MAX_STEPS))
    step *= next(m for m in (1, 2, 5, 10) if most / (step * m) <= MAX_STEPS)
    if whole:
        step = max(1.0, step)
    n = math.ceil(round(most / step, 9))
    return [round(i * step, 12) for i in range(n + 1)]


def seconds(value: float | None) -> str:
    """A duration as people read it: 0.4 ms, 850 ms, 2.4 s, 3.5 min."""
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2g} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
