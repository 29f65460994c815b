"""Benchmark output: Markdown tables, the JSON file, the environment block and the plots (grouped bars, lines).

Knows nothing about models or about what the numbers mean; the benchmarks hand it rows.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list], digits: int = 2) -> str:
    """A Markdown table, padded so it also reads in a terminal: first column left-aligned, the others right;
    None prints as '-'."""
    cells = [headers] + [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]
    rule = [":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = []
    for n, r in enumerate(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("| " + " | ".join(padded) + " |")
        if n == 0:
            lines.append("| " + " | ".join(rule) + " |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _save(fig, plt, path: str) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grouped_bars(
    path: str, panels: list[tuple[str, dict[str, dict[str, float | None]]]], groups: list[str], ylabel: str
) -> bool:
    """One panel per (title, {series: {group: value}}): bars grouped by `groups`, one bar per series.

    Returns False (and says so) when matplotlib is not installed; the benchmark's numbers do not depend on it.
    """
    plt = _pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(groups)), 3.8 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / max(len(series), 1)
        for s, (name, values) in enumerate(series.items()):
            xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [values.get(g) or 0.0 for g in groups], width, label=name)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, plt, path)
    return True


Series = dict[str, tuple[list[float], list[float], str]]
"""label -> (x values, y values, matplotlib format string: line style, optionally a colour such as "C1--")."""


def plot_lines(
    path: str,
    panels: list[tuple[str, Series]],
    xlabel: str,
    ylabels: str | list[str],
    ncols: int = 2,
    log2_x: bool = False,
) -> bool:
    """One panel per (title, series), lines with markers; `ylabels` is one label for all panels or one per panel.

    Returns False (and says why) when there is nothing to plot or matplotlib is not installed.
    """
    if not panels:
        print(f"nothing to plot: no plot written to {path}", file=sys.stderr)
        return False
    plt = _pyplot(path)
    if plt is None:
        return False
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    labels = [ylabels] * len(panels) if isinstance(ylabels, str) else ylabels
    for ax, (title, series), ylabel in zip(axes.flat, panels, labels, strict=False):
        for label, (xs, ys, style) in series.items():
            ax.plot(xs, ys, style, marker="o", label=label)
        if log2_x:
            ax.set_xscale("log", base=2)
        xs_all = sorted({x for xs, _, _ in series.values() for x in xs})
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    _save(fig, plt, path)
    return True
