"""The report's figures: one PNG per file, drawn off-screen with the Agg canvas.

Figures are built with the object API (``Figure`` + ``FigureCanvasAgg``), not pyplot: nothing
touches the process-wide backend or pyplot's figure registry, so a report can run inside any
program (a notebook, the CLI, a test) and no figure outlives its save.

- ``pass_at_1_vs_round.png``: mean over clients per round, a line per method, the 95% t band
  over seeds where at least two seeds reached that round.
- ``final_per_client.png``: grouped bars (client x method) of final Pass@1 and CodeBLEU, error
  bars the 95% interval over seeds (none where n = 1).
- ``match_heatmap_<method>.png``: how often each teacher taught each student, over rounds and
  seeds (student rows with a partner), clients labelled with their model.
- ``cumulative_reward.png``: per seed, the running sum of each round's mean reward (a round
  without a reward adds 0), mean over seeds with its band, for methods that log rewards.

Every number drawn comes from :mod:`.tables`, so the figures and the tables cannot disagree.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from knexa_runtime.atomic import atomic_write_bytes

from . import tables
from .stats import mean_ci

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .report import Experiment
    from .tables import MethodResult

__all__ = ["cumulative_reward", "final_per_client", "match_heatmap", "pass_at_1_vs_round", "write_plots"]

logger = logging.getLogger(__name__)
DPI = 110


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """PNG via a temp file: a reader never sees half a picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _method_cycle(ax: Axes, n: int, *, markers: bool = True) -> None:
    """One colour per method (tab10 repeats after ten, so more methods take tab20) and, for
    lines, a marker per method too: the default preset draws twelve."""
    from cycler import cycler
    from matplotlib import colormaps

    n = max(n, 1)
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    cycle = cycler(color=[cmap(i % cmap.N) for i in range(n)])
    if markers:
        cycle += cycler(marker=[_MARKERS[i % len(_MARKERS)] for i in range(n)])
    ax.set_prop_cycle(cycle)


def _legend_name(r: MethodResult) -> str:
    return r.label + (" (partial)" if r.partial else "")


def _client_label(exp: Experiment, client: str) -> str:
    return f"{client}\n({exp.models[client]})" if client in exp.models else client


def _band(curves: dict[int, dict[int, float]]) -> tuple[list[int], list[float], list[float | None]]:
    """Rounds, mean over seeds and t half-width (None where fewer than two seeds have the round)."""
    rounds = sorted({r for c in curves.values() for r in c})
    cis = [mean_ci([c[r] for c in curves.values() if r in c]) for r in rounds]
    return rounds, [ci.mean for ci in cis], [ci.half_width for ci in cis]


def _line_with_band(ax: Axes, x: list[int], mean: list[float], half: list[float | None], name: str,
                    scale: float = 1.0, bounds: tuple[float, float] | None = None) -> None:
    """A mean line and its interval band, the band clipped to ``bounds`` (a fraction cannot
    leave [0, 1] however wide the t interval of two seeds is)."""
    y = np.asarray(mean) * scale
    (line,) = ax.plot(x, y, label=name)
    h = np.asarray([np.nan if v is None else v * scale for v in half], dtype=float)
    if np.isfinite(h).any():
        lo, hi = y - h, y + h
        if bounds is not None:
            lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def pass_at_1_vs_round(exp: Experiment, results: Sequence[MethodResult], path: Path) -> Path | None:
    fig = _figure((8, 5))
    ax = fig.subplots()
    _method_cycle(ax, len(results))
    drawn = False
    for r in results:
        curves = tables.per_seed_curves(exp, r.name, "pass_at_1")
        if curves:
            _line_with_band(ax, *_band(curves), _legend_name(r), scale=100.0, bounds=(0.0, 100.0))
            drawn = True
    if not drawn:
        return None
    ax.set(xlabel="round (completed)", ylabel="Pass@1 (%), mean over clients",
           title=f"Pass@1 vs round — mean over seeds, 95% t band clipped to [0, 100] "
                 f"({exp.directory.name})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    return _save(fig, path)


def final_per_client(exp: Experiment, results: Sequence[MethodResult], path: Path) -> Path | None:
    shown = [r for r in results if r.per_client]
    if not shown:
        return None
    clients = list(exp.clients)
    fig = _figure((max(8.0, 0.6 * len(clients) * len(shown)), 8.0))
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(clients))
    width = 0.8 / len(shown)
    for ax, key, ylabel, scale in ((axes[0], "pass_at_1", "Pass@1 (%)", 100.0),
                                   (axes[1], "codebleu", "CodeBLEU", 1.0)):
        _method_cycle(ax, len(shown), markers=False)
        for j, r in enumerate(shown):
            cis = [r.per_client.get(c, {}).get(key) for c in clients]
            y = np.asarray([np.nan if ci is None or ci.mean is None else ci.mean * scale for ci in cis])
            h = np.asarray([np.nan if ci is None or ci.half_width is None else ci.half_width * scale
                            for ci in cis])
            xs = x - 0.4 + width * (j + 0.5)
            ax.bar(xs, y, width, label=_legend_name(r))
            ok = np.isfinite(y) & np.isfinite(h)  # no whisker where n = 1
            if ok.any():  # whiskers clipped to the metric's range [0, scale]
                low, high = np.clip(y - h, 0, scale), np.clip(y + h, 0, scale)
                ax.errorbar(xs[ok], y[ok], yerr=[(y - low)[ok], (high - y)[ok]], fmt="none",
                            ecolor="black", capsize=2, linewidth=1)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"Final round per client — mean over seeds, 95% CI ({exp.directory.name})")
    axes[1].set_xticks(x, [_client_label(exp, c) for c in clients])
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    return _save(fig, path)


def match_heatmap(exp: Experiment, method: str, path: Path) -> Path | None:
    teachers, students, counts = tables.match_counts(exp, method)
    grid = np.asarray(counts, dtype=int)
    if grid.sum() == 0:
        return None
    fig = _figure((1.3 * len(students) + 3, 1.0 * len(teachers) + 2))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="Blues", vmin=0)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > grid.max() / 2 else "black")
    ax.set_xticks(range(len(students)), [_client_label(exp, c) for c in students])
    ax.set_yticks(range(len(teachers)), [_client_label(exp, c) for c in teachers])
    ax.set(xlabel="student", ylabel="teacher",
           title=f"{tables.label(method)}: teacher → student matches\n(all rounds and seeds)")
    fig.colorbar(im, ax=ax, label="times matched", ticks=MaxNLocator(integer=True))
    return _save(fig, path)


def cumulative_reward(exp: Experiment, results: Sequence[MethodResult], path: Path) -> Path | None:
    fig = _figure((8, 5))
    ax = fig.subplots()
    _method_cycle(ax, len(results))
    drawn = False
    for r in results:
        if r.cis["reward"].mean is None:
            continue
        curves = tables.per_seed_curves(exp, r.name, "reward", cumulative=True, missing=0.0)
        _line_with_band(ax, *_band(curves), _legend_name(r))
        drawn = True
    if not drawn:
        return None
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="round (completed)", ylabel="cumulative mean reward (Eq. 3)",
           title=f"Cumulative reward — mean over seeds, 95% t band ({exp.directory.name})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    return _save(fig, path)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_plots(exp: Experiment, results: Sequence[MethodResult], out: Path) -> list[Path]:
    """Every figure that has something to show, under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [pass_at_1_vs_round(exp, results, out / "pass_at_1_vs_round.png"),
             final_per_client(exp, results, out / "final_per_client.png")]
    paths += [match_heatmap(exp, r.name, out / f"match_heatmap_{_file_safe(r.name)}.png") for r in results]
    paths.append(cumulative_reward(exp, results, out / "cumulative_reward.png"))
    return [p for p in paths if p is not None]
