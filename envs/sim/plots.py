"""Plots a person would rather look at than read: latency CDFs of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def latency_cdfs(records: pd.DataFrame, path: Path, title: str = "") -> None:
    """TTFT, TPOT and E2E empirical CDFs (log x), one panel each, with SLO thresholds where uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = records[records["state"] == "finished"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, column, label in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E"), strict=True):
        values = np.sort(done[column].dropna().to_numpy())
        values = values[values > 0]
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), lw=1.5)
            for q, style in ((0.5, ":"), (0.99, "--")):
                ax.axvline(np.quantile(values, q), color="grey", ls=style, lw=0.8, label=f"P{int(q * 100)}")
        ax.set(xscale="log", xlabel=f"{label} (s)", ylim=(0, 1.01), title=label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIDELITY_MARKERS = {"ttft": "o", "tpot": "s", "e2e": "^"}


def fidelity_scatter(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Measured vs simulated latency, log-log: one marker per (run, stage, metric), filled for the mean and
    hollow for the P90, shape by metric, colour by run; the diagonal is perfect fidelity, the dotted lines
    a factor of two either way. ``table`` has the columns of :func:`servegym.envs.sim.serving_runs.replay`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    runs = list(dict.fromkeys(table["run"]))
    colours = plt.get_cmap("tab10")
    values = []
    for index, run in enumerate(runs):
        rows = table[table["run"] == run]
        for metric, marker in FIDELITY_MARKERS.items():
            for stat in ("mean", "p90"):
                x = rows[f"{metric}_{stat}_measured_ms"].to_numpy(dtype=float)
                y = rows[f"{metric}_{stat}_sim_ms"].to_numpy(dtype=float)
                ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
                if not ok.any():
                    continue
                colour = colours(index % 10)
                ax.scatter(
                    x[ok],
                    y[ok],
                    marker=marker,
                    s=36,
                    facecolors=colour if stat == "mean" else "none",
                    edgecolors=colour,
                    label=run if metric == "ttft" and stat == "mean" else None,
                )
                values += [*x[ok], *y[ok]]
    if values:
        low, high = min(values) / 2, max(values) * 2
        line = np.array([low, high])
        ax.plot(line, line, color="black", lw=0.8)
        for factor in (0.5, 2.0):
            ax.plot(line, line * factor, color="grey", lw=0.6, ls=":")
        ax.set(xlim=(low, high), ylim=(low, high))
    for metric, marker in FIDELITY_MARKERS.items():
        ax.scatter([], [], marker=marker, color="black", label=metric.upper())
    ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="simulated (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or "measured vs simulated (filled: mean, hollow: P90)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
