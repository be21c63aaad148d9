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
