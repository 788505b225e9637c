"""A training run's curves as inline SVG, drawn on the server from ``metrics.jsonl`` (nothing to fetch)."""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from markupsafe import Markup

# (metric, title): the curves the issue asks for, in the order the page shows them; a metric the run
# never logged is left out.
CURVES = (
    ("rollout/reward", "reward (train episodes)"),
    ("rollout/em", "exact match (train episodes)"),
    ("dev/em", "dev exact match (greedy)"),
    ("actor/entropy", "policy entropy"),
    ("experience/kl", "KL to reference"),
    ("rollout/policy_tokens", "response length (policy tokens)"),
    ("rollout/searches", "searches per episode"),
)
WIDTH, HEIGHT = 360, 200
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 52, 12, 24, 30
# Points get a hover label (an SVG <title>) up to this many; beyond, the line alone stays light.
MAX_MARKED_POINTS = 300


@dataclass(frozen=True, slots=True)
class Curve:
    """One metric over steps."""

    metric: str
    title: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class MetricsFile:
    """The rows of ``metrics.jsonl`` that could be read, and the lines that could not."""

    rows: tuple[dict[str, float | None], ...]
    bad_lines: tuple[int, ...]


def read_metrics(path: Path) -> MetricsFile:
    """Read ``metrics.jsonl``; unreadable lines (a truncated last line) are listed, not raised."""
    rows: list[dict[str, float | None]] = []
    bad: list[int] = []
    if not path.is_file():
        return MetricsFile((), ())
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "step" not in row:
                    raise ValueError("not a metrics row")
            except ValueError:
                bad.append(number)
                continue
            rows.append(row)
    return MetricsFile(tuple(rows), tuple(bad))


def curves(rows: Sequence[dict[str, float | None]]) -> list[Curve]:
    """The :data:`CURVES` that have at least one finite value."""
    found = []
    for metric, title in CURVES:
        points = tuple(
            (float(row["step"]), float(value))  # type: ignore[arg-type]
            for row in rows
            if isinstance(value := row.get(metric), int | float) and math.isfinite(value)
        )
        if points:
            found.append(Curve(metric, title, points))
    return found


def line_chart(curve: Curve) -> Markup:
    """An SVG line chart of one curve, with its value range, its step range and hover labels."""
    steps = [step for step, _ in curve.points]
    values = [value for _, value in curve.points]
    low_x, high_x = _padded(min(steps), max(steps))
    low_y, high_y = _padded(min(values), max(values))
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(step: float) -> float:
        return MARGIN_LEFT + (step - low_x) / (high_x - low_x) * plot_w

    def y(value: float) -> float:
        return MARGIN_TOP + (high_y - value) / (high_y - low_y) * plot_h

    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in curve.points)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'data-metric="{escape(curve.metric)}">',
        f'<text class="chart-title" x="{MARGIN_LEFT}" y="15">{escape(curve.title)}</text>',
        f'<rect class="plot" x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}"/>',
        _axis_labels(low_x, high_x, low_y, high_y),
        f'<polyline class="line" points="{path}"/>',
    ]
    if len(curve.points) <= MAX_MARKED_POINTS:
        parts += [
            f'<circle class="point" cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5">'
            f"<title>step {s:g}: {v:.4g}</title></circle>"
            for s, v in curve.points
        ]
    parts.append("</svg>")
    return Markup("".join(parts))


def _axis_labels(low_x: float, high_x: float, low_y: float, high_y: float) -> str:
    bottom = HEIGHT - MARGIN_BOTTOM
    right = WIDTH - MARGIN_RIGHT
    return (
        f'<text class="tick" x="{MARGIN_LEFT - 4}" y="{MARGIN_TOP + 4}" text-anchor="end">{high_y:.3g}</text>'
        f'<text class="tick" x="{MARGIN_LEFT - 4}" y="{bottom}" text-anchor="end">{low_y:.3g}</text>'
        f'<text class="tick" x="{MARGIN_LEFT}" y="{bottom + 14}">{low_x:g}</text>'
        f'<text class="tick" x="{right}" y="{bottom + 14}" text-anchor="end">{high_x:g}</text>'
        f'<text class="tick" x="{(MARGIN_LEFT + right) / 2}" y="{bottom + 14}" '
        'text-anchor="middle">step</text>'
    )


def _padded(low: float, high: float) -> tuple[float, float]:
    """A range that is never empty: a flat curve gets one unit (or 5% of its value) either side."""
    if high > low:
        return low, high
    pad = abs(low) * 0.05 or 1.0
    return low - pad, high + pad
