"""Accuracy on the evaluation set by round, one line per strategy (mean over trials, ± one standard deviation);
dashed, the control set's when the correction had one."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"helpful": "#1b9e77", "harmful": "#d95f02", "random": "#7570b3"}


def render_rounds(report: dict, png_path: Path, title: str | None = None) -> Path:
    """Draw a correction report's accuracy by round (round 0 = before any step) to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    before = report["evaluation"]["before"]["accuracy"]
    figure = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    for strategy, result in report["strategies"].items():
        rounds = result["by_round"]
        x = [0] + [r["round"] + 1 for r in rounds]
        mean = [100 * before] + [100 * r["accuracy"]["mean"] for r in rounds]
        std = [0.0] + [100 * r["accuracy"]["std"] for r in rounds]
        colour = COLOURS.get(strategy, "black")
        ax.plot(x, mean, marker="o", markersize=3, color=colour, label=strategy)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour, alpha=0.15)
        if report.get("control") and rounds and rounds[0].get("control_accuracy"):
            control = [100 * report["control"]["before"]["accuracy"]] + [100 * r["control_accuracy"]["mean"] for r in rounds]
            ax.plot(x, control, linestyle="--", color=colour, alpha=0.8, label=f"{strategy}, control set")
    ax.set_xlabel("round (optimiser steps on the chosen points)")
    ax.set_ylabel("evaluation accuracy (%)")
    ax.set_title(title or f"Error correction, {report['settings']['trials']} trial(s), mean ± std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    partial = png_path.with_name(png_path.name + ".partial")
    figure.savefig(partial, format="png")
    partial.replace(png_path)
    return png_path
