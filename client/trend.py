"""`restwise device trend`: the last weeks against your own baseline, as a picture.

One panel per series, each day's value (dots, joined where days follow each other) against
the person's own baseline (a line), the same baselines the coach states its reasons against
(:mod:`restwise.models.features`, computed over the whole history, so the first shown day
already has its baseline):

=====================  ===========================================================
readiness (0-10)       your check-in answers; baseline: mean of the 60 days before
HRV (RMSSD, ms)        nightly RMSSD; baseline: exp(mean lnRMSSD of the 60 days
                       before), i.e. the geometric mean the coach compares with
resting HR (bpm)       baseline: mean of the 60 days before
sleep (h)              the night ending on the day; baseline: mean of the 60 days before
session-RPE load (AU)  daily session-RPE load; baseline: its 28-day mean (chronic load)
heart-rate load        daily TRIMP; baseline: its own 28-day mean. Never added to the
(TRIMP)                session-RPE load (another unit)
=====================  ===========================================================

A series without a single value in the window is left out (and named). In the terminal the
picture is drawn with ``plotext``; ``--png FILE`` writes the same panels with matplotlib.

Events: :class:`TrendEvent` marks a day with a vertical line and a label in both pictures.
:func:`past_events` gives the past early warnings: the days the coach would have issued its
7-day warning of a low week (:func:`restwise.models.warning.past_warnings`: each day computed
from the days up to it only, above the operating point, at most one a week). They are
recomputed from the person's days, never stored.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from restwise.client.cli_support import KeystoreOpt, PassFileOpt, StoreOpt, console, device_errors, open_store
from restwise.client.dataset import daily_data
from restwise.models.features import DailyData, compute_raw_features
from restwise.models.warning import past_warnings

DEFAULT_WEEKS = 8
MAX_WEEKS = 104


@dataclass(frozen=True)
class TrendEvent:
    """A day to mark on the trend (e.g. a past early warning), with a short label."""

    day: str
    label: str


@dataclass(frozen=True)
class TrendPanel:
    key: str
    title: str
    unit: str
    values: np.ndarray  # one per day of the window, NaN when missing
    baseline: np.ndarray  # the person's baseline on each day, NaN while there is none

    def summary(self) -> dict:
        """Mean of the last 7 shown days with a value, and the baseline on the last day."""
        last7 = self.values[-7:]
        known = last7[np.isfinite(last7)]
        base = self.baseline[np.isfinite(self.baseline)]
        return {
            "series": self.key, "unit": self.unit,
            "last_7_days_mean": round(float(known.mean()), 2) if known.size else None,
            "baseline": round(float(base[-1]), 2) if base.size else None,
            "days_with_values": int(np.isfinite(self.values).sum()),
        }


@dataclass(frozen=True)
class Trend:
    days: list[str]
    panels: list[TrendPanel]
    missing: list[str] = field(default_factory=list)  # series without a value in the window
    events: tuple[TrendEvent, ...] = ()


def past_events(data: DailyData, days: Sequence[str]) -> list[TrendEvent]:
    """The past early warnings between ``days[0]`` and ``days[-1]`` (none without readiness
    answers), labelled with the risk the coach showed that day."""
    if not days or not np.isfinite(data["readiness"]).any():
        return []
    return [TrendEvent(day, f"warning {round(100 * risk)}%") for day, risk in past_warnings(data, days[0], days[-1])]


# key, title, unit, values(data, raw) -> array, baseline(data, raw) -> array
_SERIES = (
    ("readiness", "Readiness (0-10)", "0-10",
     lambda d, r: d["readiness"], lambda d, r: r.column("readiness_baseline")),
    ("hrv", "HRV (RMSSD, ms)", "ms",
     lambda d, r: d["rmssd_ms"], lambda d, r: np.exp(r.column("hrv_baseline"))),
    ("resting_hr", "Resting heart rate (bpm)", "bpm",
     lambda d, r: d["resting_hr"], lambda d, r: r.column("rhr_baseline")),
    ("sleep", "Sleep (h)", "h",
     lambda d, r: r.column("sleep_minutes") / 60.0, lambda d, r: r.column("sleep_baseline") / 60.0),
    ("load", "Session-RPE load (AU)", "AU",
     lambda d, r: d["load"], lambda d, r: r.column("chronic_load")),
    ("hr_load", "Heart-rate load (TRIMP)", "TRIMP",
     lambda d, r: d["hr_load"], lambda d, r: r.column("hr_chronic_load")),
)


def build_trend(data: DailyData, weeks: int = DEFAULT_WEEKS, *, end: str | None = None,
                events: Sequence[TrendEvent] = ()) -> Trend:
    """The last ``weeks`` weeks up to ``end`` (default: the last day of data)."""
    if not 1 <= weeks <= MAX_WEEKS:
        raise ValueError(f"weeks must be between 1 and {MAX_WEEKS}")
    end = end or data.days[-1]
    stop = data.index_of(end) + 1 if end <= data.days[-1] else len(data)
    start = max(0, stop - 7 * weeks)
    raw = compute_raw_features(data)
    days = data.days[start:stop]
    panels, missing = [], []
    with np.errstate(invalid="ignore", over="ignore"):
        for key, title, unit, values_of, baseline_of in _SERIES:
            values = np.asarray(values_of(data, raw), dtype=float)[start:stop]
            baseline = np.asarray(baseline_of(data, raw), dtype=float)[start:stop]
            if not np.isfinite(values).any():
                missing.append(title)
                continue
            panels.append(TrendPanel(key, title, unit, values, baseline))
    shown = [e for e in events if days and days[0] <= e.day <= days[-1]]
    return Trend(days=days, panels=panels, missing=missing, events=tuple(shown))


def _ticks(days: list[str]) -> tuple[list[int], list[str]]:
    """One tick per week (x = 1..n), labelled MM-DD."""
    positions = list(range(1, len(days) + 1, 7))
    if positions[-1] != len(days):
        positions.append(len(days))
    return positions, [days[p - 1][5:] for p in positions]


def render_terminal(trend: Trend, *, width: int = 100, height_per_panel: int = 12,
                    colorless: bool = False) -> str:
    """The trend drawn with plotext, as text (one panel per series)."""
    # Imported here, not at the top: plotext costs ~0.3 s to import, and this module is
    # loaded by every `restwise device` command (it registers `trend`).
    import plotext

    plotext.terminal.limit(False, False)  # taller than the window: it scrolls
    fig = plotext.figure
    fig.clear()
    n = len(trend.panels)
    if n == 0:
        return ""
    fig.subplots(n, 1)
    fig.plot_size(width, height_per_panel * n)
    positions, labels = _ticks(trend.days)
    index = {d: i + 1 for i, d in enumerate(trend.days)}
    for row, panel in enumerate(trend.panels, start=1):
        sub = fig.subplot(row, 1)
        sub.title(f"{panel.title}: dots = you, line = your baseline")
        sub.legend(False)
        finite = [(i + 1, float(v)) for i, v in enumerate(panel.values) if math.isfinite(v)]
        ys = [y for _, y in finite]
        base = [(i + 1, float(b)) for i, b in enumerate(panel.baseline) if math.isfinite(b)]
        if base:
            line = sub.signal([x for x, _ in base], [b for _, b in base], marker="·")
            line.lines()
            sub.draw(line)
            ys += [b for _, b in base]
        dots = sub.signal([x for x, _ in finite], [y for _, y in finite], marker="●")
        for k in range(1, len(finite)):
            dots.line(k, finite[k][0] - finite[k - 1][0] == 1)  # join consecutive days only
        sub.draw(dots)
        lo, hi = min(ys), max(ys)
        for event in trend.events:
            x = index[event.day]
            mark = sub.signal([x, x], [lo, hi], marker="|")
            mark.lines()
            sub.draw(mark)
        sub.ruler("x").ticks(positions, labels)
    return fig.build().string(colorless=colorless)


def render_png(trend: Trend, path: Path | str) -> None:
    """The same panels as a PNG picture (matplotlib)."""
    import matplotlib  # late: matplotlib costs ~0.3 s to import, only --png needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late, as matplotlib above (after choosing the Agg backend)

    n = max(1, len(trend.panels))
    x = np.array([dt.date.fromisoformat(d) for d in trend.days])
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.1 * n + 0.6), dpi=110, sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], trend.panels):
        ax.plot(x, panel.values, "o-", ms=3, lw=1, color="#2b7bba", label="you")
        ax.plot(x, panel.baseline, "-", lw=2, color="#999999", label="your baseline")
        for event in trend.events:
            ax.axvline(dt.date.fromisoformat(event.day), color="#d62728", lw=1)
            ax.annotate(event.label, (dt.date.fromisoformat(event.day), 1.0),
                        xycoords=("data", "axes fraction"), fontsize=7, color="#d62728",
                        va="top", ha="left")
        ax.set_ylabel(panel.unit)
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    if trend.days:
        fig.suptitle(f"{trend.days[0]} to {trend.days[-1]}", fontsize=9)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add `trend` to the device CLI."""

    @app.command()
    def trend(
        weeks: int = typer.Option(DEFAULT_WEEKS, "--weeks", "-w", min=1, max=MAX_WEEKS,
                                  help="How many weeks back to show."),
        png: Optional[Path] = typer.Option(None, "--png", help="Also write the picture to this PNG file."),
        as_json: bool = typer.Option(False, "--json", help="Print the series' summary as JSON instead of a picture."),
        store: Optional[Path] = StoreOpt,
        passphrase_file: Optional[Path] = PassFileOpt,
        keystore: Optional[Path] = KeystoreOpt,
    ) -> None:
        """The last weeks of readiness, HRV, resting HR, sleep and each kind of training load,
        against your own baseline, with the days the 7-day warning was given marked: a picture
        in the terminal (and a PNG with --png)."""
        with device_errors():
            with open_store(store, passphrase_file, keystore) as s:
                data = daily_data(s)
                days = data.days[-7 * weeks:]
                result = build_trend(data, weeks, events=past_events(data, days))
        if png is not None:
            render_png(result, png)
        if as_json:
            typer.echo(json.dumps({
                "from": result.days[0], "to": result.days[-1],
                "series": [p.summary() for p in result.panels], "missing": result.missing,
                "events": [{"day": e.day, "label": e.label} for e in result.events],
            }))
        else:
            text = render_terminal(result, width=min(120, max(60, console.width)),
                                   colorless=not console.is_terminal)
            typer.echo(text)
            typer.echo(f"{result.days[0]} to {result.days[-1]}"
                       + (f"; no data for: {', '.join(result.missing)}" if result.missing else ""))
        if png is not None:
            typer.echo(f"Wrote {png}.")


__all__ = ["TrendEvent", "TrendPanel", "Trend", "build_trend", "past_events", "render_terminal",
           "render_png", "register"]
