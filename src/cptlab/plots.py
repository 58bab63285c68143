"""Matplotlib figures for report.html and compare.html, each returned as a PNG data URI, and the
series they draw, pulled from metrics.jsonl records.

Figures are built on `matplotlib.figure.Figure` directly (rendered by the Agg canvas), never through
pyplot: no global state, no display needed, and nothing leaks between reports. Accuracies are drawn
in percent. Sizes stay near 6x3 inches at 100 dpi so an embedded report remains a few hundred KB.
Labels are never parsed as mathtext: a run named 'a$_$b' is text, not a formula that fails to parse.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from typing import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from .metric_names import DRIFT, DRIFT_FAMILIES, EVAL, FAULT, STAGE_END, TRAIN

DPI = 100
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def shade(hex_colour: str, towards_white: float) -> str:
    """The colour mixed with white by the given fraction (0: unchanged)."""
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * towards_white):02x}" for c in rgb)


def _plain_text(draw):
    """Build and render a figure with mathtext off: every label (run names, domains) is literal text.
    Texts read the setting when created, tick labels as late as the rendering, so it covers both."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _style(ax, title: str | None = None) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and stages are whole numbers
    if title:
        ax.set_title(title, fontsize=9, loc="left")


def _short(text: str, n: int = 16) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -- series from metrics records ------------------------------------------------------------------
def finite(value) -> float:
    """A finite float, else NaN (None, strings and infinities alike)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(global steps, values) of one key over the records that have it, in step order."""
    points = sorted((r["global_step"], finite(r[key])) for r in records
                    if key in r and not math.isnan(finite(r.get("global_step"))))
    return [p[0] for p in points], [p[1] for p in points]


def stage_bounds(records: list[dict], label: Callable[[int], str]) -> list[tuple[float, float, str]]:
    """(first, last global step, label(stage)) of each stage 1..S from the global steps its records saw."""
    last: dict[int, float] = {}
    for r in records:
        step = finite(r.get("global_step"))
        if r.get("event") in (TRAIN, EVAL, FAULT, STAGE_END) and isinstance(r.get("stage"), int) \
                and r["stage"] > 0 and not math.isnan(step):
            last[r["stage"]] = max(last.get(r["stage"], 0.0), step)
    bounds, lo = [], 0.0
    for s in sorted(last):
        bounds.append((lo, last[s], label(s)))
        lo = last[s]
    return bounds


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def drift_table(records: list[dict]) -> tuple[dict[str, tuple[list, list]], bool]:
    """key -> (x, values) of each numeric param/, response/, artifacts/ and general/ quantity of the drift
    records, and whether x is the global step (some stage has several drift records) rather than the stage."""
    rows = [_flatten(r) for r in records if r.get("event") == DRIFT and isinstance(r.get("stage"), int)]
    stages = [r.get("stage") for r in rows]
    by_step = len(stages) != len(set(stages)) and all(not math.isnan(finite(r.get("global_step"))) for r in rows)
    table: dict[str, tuple[list, list]] = {}
    for row in rows:
        for k, v in row.items():
            if k.split("/")[0] in DRIFT_FAMILIES and not math.isnan(finite(v)):
                xs, ys = table.setdefault(k, ([], []))
                xs.append(row["global_step"] if by_step else row.get("stage"))
                ys.append(finite(v))
    return table, by_step


# -- accuracy matrix ------------------------------------------------------------------------------
def draw_heatmap(ax, R: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                 trained: Sequence[int] = (), fontsize: float = 8) -> None:
    """R [rows, cols] in percent (NaN = not evaluated); trained[s-1] = column of row s's own domain."""
    shown = np.ma.masked_invalid(R)
    ax.imshow(shown, cmap="YlGnBu", vmin=0, vmax=100, aspect="auto")
    ax.set_facecolor("#eeeeee")
    for (i, j), v in np.ndenumerate(R):
        text = "–" if np.isnan(v) else f"{v:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                color="white" if not np.isnan(v) and v > 60 else "#222222")
    for s, j in enumerate(trained, start=1):  # outline the cell each stage trained on
        if 0 <= j < R.shape[1] and s < R.shape[0]:
            ax.add_patch(Rectangle((j - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.6))
    ax.set_xticks(range(len(col_labels)), [_short(c) for c in col_labels], rotation=30, ha="right",
                  fontsize=fontsize)
    ax.set_yticks(range(len(row_labels)), [_short(r, 22) for r in row_labels], fontsize=fontsize)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


@_plain_text
def accuracy_heatmap(R: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                     trained: Sequence[int] = ()) -> str:
    width = min(9.0, 2.2 + 0.85 * len(col_labels))
    height = min(6.0, 1.2 + 0.38 * len(row_labels))
    fig = _figure(max(width, 4.5), max(height, 2.2))
    draw_heatmap(fig.add_subplot(), R, row_labels, col_labels, trained)
    return data_uri(fig)


@_plain_text
def heatmap_grid(panels: list[tuple[str, str, np.ndarray, list[str], list[str], list[int]]]) -> str:
    """Small multiples: (title, colour, R, row_labels, col_labels, trained) per run; as many a row as
    fit a ~13-inch page at a readable cell size (one a row for a twelve-domain matrix)."""
    n_cols_max = max(len(p[4]) for p in panels)
    n_rows_max = max(len(p[3]) for p in panels)
    width = max(3.0, 1.8 + 0.55 * n_cols_max)
    ncols = max(1, min(len(panels), int(13.0 // width)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(width * ncols, (1.5 + 0.38 * n_rows_max) * nrows)
    for k, (title, col, R, rows, cols, trained) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        draw_heatmap(ax, R, rows, cols, trained, fontsize=8)
        r, g, b = (int(col[i:i + 2], 16) for i in (1, 3, 5))
        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 150 else "black"  # readable on the run's colour
        ax.set_title(_short(title, 40), fontsize=9, color=ink, loc="left", fontweight="bold",
                     bbox=dict(facecolor=col, edgecolor="none", boxstyle="round,pad=0.25"))
    return data_uri(fig)


@_plain_text
def runs_grid(panels: dict[str, list[tuple[str, str, list, list]]], xlabel: str, ncols: int = 3) -> str:
    """One small panel per quantity, one line per run in the run's colour: {title: [(label, colour, x, y)]}."""
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(max(3.4 * ncols, 5.0), 2.4 * nrows + 0.4)
    handles = {}
    for k, (title, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for label, col, x, y in lines:
            (line,) = ax.plot(x, y, color=col, marker="o", markersize=3.5, linewidth=1.4)
            handles.setdefault(label, line)
        _style(ax, title)
        ax.set_xlabel(xlabel, fontsize=7)
        ticks = sorted({t for _, _, x, _ in lines for t in x})
        if len(ticks) <= 12:
            ax.set_xticks(ticks)
    fig.legend(list(handles.values()), [_short(h, 40) for h in handles], fontsize=7, frameon=False,
               loc="outside upper center", ncols=min(4, len(handles)))
    return data_uri(fig)


# -- curves over global steps -----------------------------------------------------------------------
def _stage_bands(ax, bounds: Sequence[tuple[float, float, str]]) -> None:
    """Alternate shading per stage, a dashed line at each boundary, and the stage's label on top."""
    left, right = ax.get_xlim()  # only the stages this panel's data reaches
    inches = ax.figure.get_size_inches()[0] * ax.get_position().width
    for k, (lo, hi, label) in enumerate(bounds):
        lo_in, hi_in = max(lo, left), min(hi, right)
        if (hi_in - lo_in) < 0.08 * (right - left):  # a sliver of the panel: nothing worth labelling
            continue
        if k % 2:
            ax.axvspan(lo_in, hi_in, color="#000000", alpha=0.04, linewidth=0)
        if k and lo >= left:
            ax.axvline(lo, color="#888888", linestyle="--", linewidth=0.8)
        room = (hi_in - lo_in) / (right - left) * inches * 17  # characters of 7 pt text that fit
        short = " ".join(label.split(" ")[:3])  # "2 · SDPO sorting" -> "2 · SDPO" -> "2"
        text = next((t for t in (label, short, label.split(" ")[0]) if len(t) <= room), "")
        ax.text((lo_in + hi_in) / 2, 1.0, text, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7, color="#555555", clip_on=False)
    ax.set_xlim(left, right)


@_plain_text
def accuracy_over_steps(series: dict[str, tuple[list, list]], bounds: Sequence[tuple[float, float, str]]) -> str:
    """series: domain -> (global_steps, accuracy %); bounds: (start, end, label) per stage."""
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    for k, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, color=color(k), label=name)
    _style(ax)
    _stage_bands(ax, bounds)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("global step", fontsize=8)
    ax.set_ylabel("greedy accuracy (%)", fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return data_uri(fig)


def _smooth(x: Sequence[float], y: np.ndarray, bounds: Sequence[tuple[float, float, str]]) -> np.ndarray:
    """Exponential moving average over ~5% of the points, NaN-tolerant, restarted at each stage
    boundary so that one stage's values never leak into the next."""
    alpha = min(1.0, 2.0 / (max(len(y) / 20, 1.0) + 1))
    starts = {i for i in range(1, len(x)) for lo, _, _ in bounds if x[i - 1] <= lo < x[i]}
    out, level = np.empty_like(y), np.nan
    for i, v in enumerate(y):
        if i in starts or np.isnan(level):
            level = v
        elif not np.isnan(v):
            level = alpha * v + (1 - alpha) * level
        out[i] = level
    return out


Panels = dict[str, dict[str, tuple[list, list]]]  # panel title -> line label -> (x, y); "" = an unlabelled line
Axes = dict[str, tuple[str, float | None]]  # panel title -> (y-axis label, least top of an axis from zero; None: fit)


def _grid(panels: Panels, ncols: int, width: float, height: float):
    """A figure with one subplot per panel, and [(title, index, axes, lines)]."""
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(max(width * ncols, 5.0), height * nrows)
    return fig, [(title, k, fig.add_subplot(nrows, ncols, k + 1), lines)
                 for k, (title, lines) in enumerate(panels.items())]


def _lines(ax, k: int, lines: dict[str, tuple[list, list]], bounds=(), marker: bool = False) -> None:
    """Draw a panel's lines: long noisy ones faint with a per-stage moving average on top."""
    for m, (label, (x, y)) in enumerate(lines.items()):
        col = color(k if len(lines) == 1 else m)
        y = np.asarray(y, dtype=float)
        if len(y) > 12 and not marker:
            ax.plot(x, y, color=col, alpha=0.3, linewidth=0.8)
            ax.plot(x, _smooth(x, y, bounds), color=col, linewidth=1.6, label=label or None)
        else:
            ax.plot(x, y, color=col, marker="o", markersize=3.5, linewidth=1.4, label=label or None)
    if len(lines) > 1:
        ax.legend(fontsize=6.5, frameon=False, ncols=2 if len(lines) > 3 else 1)


def _axis(ax, title: str, axes: Axes | None) -> None:
    """The panel's y-axis label and, for rates, an axis from zero up to at least `least_top` (a few
    answers must not fill it; labels.Label.axis_top)."""
    ylabel, least_top = (axes or {}).get(title, ("", None))
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=7)
    if least_top is not None:
        top = max([v for line in ax.get_lines() for v in np.asarray(line.get_ydata(), dtype=float)
                   if np.isfinite(v)], default=0.0)
        ax.set_ylim(0, max(top * 1.15, least_top) if top > 0 else max(least_top, 1.0))


@_plain_text
def curve_grid(panels: Panels, bounds: Sequence[tuple[float, float, str]] = (), ncols: int = 2,
               axes: Axes | None = None) -> str:
    """Curves over global steps, one small panel each, stages shaded and labelled."""
    fig, items = _grid(panels, ncols, 3.6, 2.2)
    for title, k, ax, lines in items:
        _lines(ax, k, lines, bounds)
        _style(ax, title)
        _axis(ax, title, axes)
        if bounds:
            _stage_bands(ax, bounds)
            ax.set_title(title, fontsize=9, loc="left", pad=12)
        ax.set_xlabel("global step", fontsize=7)
    return data_uri(fig)


@_plain_text
def stage_grid(panels: Panels, stage_labels: dict[int, str], ncols: int = 3, axes: Axes | None = None,
               notes: dict[str, list[str]] | None = None, size: tuple[float, float] = (3.2, 2.3)) -> str:
    """Values measured once per stage (drift, artifacts), one small panel each, stages on the x axis.
    notes: panel title -> a text per point of its first line (e.g. the counts behind a rate)."""
    fig, items = _grid(panels, ncols, *size)
    for title, k, ax, lines in items:
        _lines(ax, k, lines, marker=True)
        _style(ax, title)
        _axis(ax, title, axes)
        x, y = next(iter(lines.values()))
        for xi, yi, text in zip(x, y, (notes or {}).get(title, [])):
            if np.isfinite(yi):
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6.5,
                            color="#444444")
        ticks = sorted({t for x, _ in lines.values() for t in x})
        names = [stage_labels.get(t, str(t)).replace(" · ", " ").split(" ", 2) for t in ticks]
        ax.set_xticks(ticks, [" ".join(n[:2]) + ("\n" + _short(n[2], 12) if len(n) > 2 else "") for n in names],
                      fontsize=7)
    return data_uri(fig)


# -- comparison ---------------------------------------------------------------------------------------
@_plain_text
def grouped_bars(categories: Sequence[str], bars: list[tuple[str, str, list, list | None, list | None]],
                 ylabel: str = "final greedy accuracy (%)", ylim: tuple[float, float] | None = (0, 105),
                 height: float = 3.2) -> str:
    """bars: (label, colour, values, low, high) per series; low/high (may be None) draw whiskers.
    ylim None: the axis fits the data and a line marks zero (for signed changes)."""
    fig = _figure(min(11.0, 3.0 + 0.55 * len(categories) * max(1, len(bars)) ** 0.7), height)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(categories))
    for k, (label, col, values, low, high) in enumerate(bars):
        pos = x - 0.4 + width * (k + 0.5)
        vals = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(pos, vals, width * 0.92, color=col, label=_short(label, 40))
        if low is not None and high is not None:
            lo = np.array([np.nan if v is None else v for v in low], dtype=float)
            hi = np.array([np.nan if v is None else v for v in high], dtype=float)
            ax.errorbar(pos, vals, yerr=[np.maximum(vals - lo, 0), np.maximum(hi - vals, 0)], fmt="none", ecolor="#333333", capsize=2,
                        linewidth=0.9)
    _style(ax)
    ax.grid(axis="x", visible=False)
    ax.set_xticks(x, ["\n".join(_short(line, 24) for line in c.split("\n")) for c in categories],
                  rotation=20 if len(categories) > 4 else 0, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    else:
        ax.axhline(0.0, color="#555555", linewidth=0.8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return data_uri(fig)


@_plain_text
def lines_by_run(series: list[tuple[str, str, list, list]], xlabel: str, ylabel: str) -> str:
    """series: (label, colour, x, y) per run, one line each."""
    fig = _figure(7.0, 3.0)
    ax = fig.add_subplot()
    for label, col, x, y in series:
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, color=col, label=_short(label, 40))
    _style(ax)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return data_uri(fig)


@_plain_text
def band_lines(series: list[tuple[str, str, list, list, list, list]], xlabel: str, ylabel: str,
               ylim: tuple[float, float] | None = (-3, 103)) -> str:
    """series: (label, colour, x, mean, low, high) per group: the mean as a line, [low, high] (e.g. a 95%
    interval over seeds) as a shaded band; NaN bounds leave gaps."""
    fig = _figure(7.0, 3.0)
    ax = fig.add_subplot()
    def arr(values: list) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    for label, col, x, mean, low, high in series:
        ax.fill_between(x, arr(low), arr(high), color=col, alpha=0.18, linewidth=0)
        ax.plot(x, arr(mean), marker="o", markersize=3, linewidth=1.5, color=col, label=_short(label, 40))
    _style(ax)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return data_uri(fig)


@_plain_text
def scatter_by_run(series: list[tuple[str, str, list, list]], xlabel: str, ylabel: str, bins: int = 6,
                   binned: list[dict] | None = None, binned_label: str = "binned mean (all runs)") -> str:
    """series: (label, colour, x, y) per run, one dot per point; a dark line joins the mean y of all
    points within each of `bins` equal-count bins of x (pooled over runs), and a thin line marks y = 0.
    binned: bins computed elsewhere instead ({distance, mean, low, high} each, in the plot's units, e.g.
    over independent units): the dark line joins their means, with their intervals as error bars."""
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    for label, col, x, y in series:
        ax.scatter(x, y, s=14, color=col, alpha=0.75, linewidths=0, label=_short(label, 40), zorder=3)
    xs = np.array([v for _, _, x, _ in series for v in x], dtype=float)
    ys = np.array([v for _, _, _, y in series for v in y], dtype=float)
    order = np.argsort(xs, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, len(order))) if len(g)]
    if binned:
        mid = np.array([b["mean"] for b in binned], dtype=float)
        err = np.array([[m - b["low"] if b["low"] == b["low"] else 0.0 for m, b in zip(mid, binned)],
                        [b["high"] - m if b["high"] == b["high"] else 0.0 for m, b in zip(mid, binned)]])
        ax.errorbar([b["distance"] for b in binned], mid, yerr=err, color="#222222", linewidth=1.6, marker="s",
                    markersize=4, capsize=3, label=binned_label, zorder=4)
    elif len(groups) > 1:
        ax.plot([xs[g].mean() for g in groups], [ys[g].mean() for g in groups], color="#222222", linewidth=1.6,
                marker="s", markersize=4, label="binned mean (all runs)")
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    _style(ax)
    ax.xaxis.set_major_locator(MaxNLocator())  # distances are not whole numbers
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return data_uri(fig)
