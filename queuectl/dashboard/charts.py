"""The overview's charts as SVG geometry: numbers a template draws, nothing else (the
page's scripts may come only from the dashboard itself, and users may be offline)."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT, TOP = 360, 110, 8  # TOP: room above the highest value


def bars(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """Completed (below) and failed (stacked on top) runs of each slice, as rectangles."""
    most = max((s["completed"] + s["failed"] for s in slices), default=0)
    scale = (HEIGHT - TOP) / most if most else 0
    step = WIDTH / len(slices)
    drawn = []
    for i, one in enumerate(slices):
        done, failed = one["completed"] * scale, one["failed"] * scale
        x = round(i * step + 1, 1)
        drawn.append({"x": x, "w": round(step - 2, 1), "start": one["start"],
                      "completed": one["completed"], "failed": one["failed"],
                      "done_y": round(HEIGHT - done, 1), "done_h": round(done, 1),
                      "failed_y": round(HEIGHT - done - failed, 1), "failed_h": round(failed, 1)})
    return {"width": WIDTH, "height": HEIGHT, "most": most, "bars": drawn}


def lines(slices: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """The p50 and p95 of ``field`` (``wait`` or ``run_time``) of each slice, as polylines
    through the slices that had runs."""
    values = [v for s in slices for v in (s[field]["p50"], s[field]["p95"]) if v is not None]
    most = max(values, default=0.0)
    scale = (HEIGHT - TOP) / most if most else 0
    step = WIDTH / len(slices)
    series = {}
    for rank in ("p50", "p95"):
        points = [(round(i * step + step / 2, 1), round(HEIGHT - s[field][rank] * scale, 1))
                  for i, s in enumerate(slices) if s[field][rank] is not None]
        series[rank] = {"points": " ".join(f"{x},{y}" for x, y in points),
                        "dots": points}
    return {"width": WIDTH, "height": HEIGHT, "most": most, "series": series}


def seconds(value: float | None) -> str:
    """A duration as people read it: 850 ms, 2.4 s, 3.5 min."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
