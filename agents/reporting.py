"""Results as text and figures: one formatter of a metric cell (mean ± 95% CI half-width), the tables built
on it (the evaluation's terminal tables and head-to-heads, the reproductions' markdown tables, a
simulation's summary) and the evaluation's plots."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

Column = tuple[str, str, str]  # (label, metric key, format: a str.format spec or "ms")

TABLE_COLUMNS: tuple[Column, ...] = (
    ("SLO att.", "slo_attainment", "{:.1%}"),
    ("goodput r/s", "goodput_rps", "{:.2f}"),
    ("tok/s", "throughput_tok_s", "{:,.0f}"),
    ("TTFT P50 s", "ttft_p50_s", "{:.3f}"),
    ("TTFT P99 s", "ttft_p99_s", "{:.2f}"),
    ("TPOT P50 ms", "tpot_p50_s", "ms"),
    ("TPOT P99 ms", "tpot_p99_s", "ms"),
    ("preempt/req", "preemption_rate", "{:.3f}"),
)

SUMMARY_ROWS: tuple[tuple[str, str | tuple[str, ...], str], ...] = (  # several keys: shown "a / b"
    ("requests", "num_requests", "{:,}"),
    ("completed", "completed", "{:,}"),
    ("rejected", "rejected", "{:,}"),
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("goodput (req/s)", "goodput_rps", "{:.2f}"),
    ("throughput (output tok/s)", "throughput_tok_s", "{:,.0f}"),
    ("TTFT P50 / P99 (s)", ("ttft_p50_s", "ttft_p99_s"), "{:.3f}"),
    ("TPOT P50 / P99 (ms)", ("tpot_p50_s", "tpot_p99_s"), "ms"),
    ("E2E P50 / P99 (s)", ("e2e_p50_s", "e2e_p99_s"), "{:.2f}"),
    ("preemptions", "preemptions", "{:,}"),
    ("simulated time (s)", "sim_s", "{:,.1f}"),
    ("wall time (s)", "wall_s", "{:.2f}"),
    ("simulated requests per wall second", "requests_per_wall_s", "{:,.0f}"),
)


def _isnan(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isnan(value)


def cell(
    mean: float | None, half: float | None = None, fmt: str = "{}", *, separator: str = " ±", missing: str | None = "-"
) -> str:
    """``mean`` in ``fmt`` followed, when ``half`` is known, by ``separator`` and the half-width in the same
    format without its sign. ``fmt="ms"``: seconds shown as milliseconds with one decimal. A missing mean
    (None or NaN) shows ``missing``; ``missing=None`` prints NaN as the format does (``nan``)."""
    if mean is None or (missing is not None and _isnan(mean)):
        return "-" if missing is None else missing
    if fmt == "ms":
        fmt, mean, half = "{:.1f}", mean * 1e3, None if half is None else half * 1e3
    text = fmt.format(mean)
    if half is not None and not _isnan(half):
        text += separator + fmt.replace("+", "").format(half).lstrip()
    return text


def print_summary(summary: Mapping[str, Any], title: str) -> None:
    """A simulation's summary (``ClusterResult.summary()``) and its per-instance table, in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in SUMMARY_ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        table.add_row(label, " / ".join(cell(summary[k], fmt=fmt, missing=None) for k in keys))
    console = Console(width=100)
    console.print(table)
    instances = Table(title="per instance")
    for column in ("#", "GPU", "role", "completed", "TTFT P50 (s)", "TPOT P50 (ms)", "KV blocks", "preemptions"):
        instances.add_column(column, justify="right")
    for row in summary["per_instance"]:
        instances.add_row(
            str(row["instance"]),
            row["gpu"],
            row["role"],
            str(row["completed"]),
            cell(row["ttft_p50_s"], fmt="{:.3f}", missing=None),
            cell(row["tpot_p50_s"], fmt="ms", missing=None),
            cell(row["kv_blocks"], fmt="{:,}"),
            str(row["preemptions"]),
        )
    console.print(instances)


def print_tables(table: pd.DataFrame, reference: str | None, columns: Sequence[Column] = TABLE_COLUMNS) -> None:
    """``servegym.agents.harness.summarise``'s table, one terminal table per (workload, load): each metric's mean
    ±95% CI and, against ``reference``, the ratio of attainments and their paired difference."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for (workload, load), group in table.groupby(["workload", "load"], sort=False):
        title = f"{workload} (load x{load:g}; mean ±95% CI over {int(group['seeds'].iloc[0])} seeds)"
        rich_table = Table(title=title)
        rich_table.add_column("policy")
        for label, _, _ in columns:
            rich_table.add_column(label, justify="right")
        if reference:
            rich_table.add_column(f"att. / {reference}", justify="right")
            rich_table.add_column(f"att. − {reference} (paired)", justify="right")
        for row in group.itertuples():
            cells = [cell(getattr(row, key), getattr(row, f"{key}_ci"), fmt) for _, key, fmt in columns]
            if reference:
                cells.append(cell(getattr(row, "slo_attainment_vs_ref", math.nan), fmt="{:.2f}x"))
                cells.append(cell(row.slo_attainment_diff, row.slo_attainment_diff_ci, "{:+.1%}"))
            rich_table.add_row(row.policy, *cells)
        console.print(rich_table)


def print_head_to_head(table: pd.DataFrame) -> None:
    """``agents.harness.head_to_head``'s table: one saved policy against each other policy, paired over seeds."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for (workload, load, policy), group in table.groupby(["workload", "load", "policy"], sort=False):
        rich_table = Table(title=f"{policy} head to head, {workload} (load x{load:g}; paired over seeds)")
        for column in ("versus", "SLO att. difference (95% CI)", "wins", "ties", "losses"):
            rich_table.add_column(column, justify="left" if column == "versus" else "right")
        for row in group.itertuples():
            rich_table.add_row(
                row.versus,
                cell(row.slo_attainment_diff, row.slo_attainment_diff_ci, "{:+.1%}"),
                str(row.wins),
                str(row.ties),
                str(row.losses),
            )
        console.print(rich_table)


def markdown_table(table: pd.DataFrame, columns: Sequence[Column], reference: str | None = None) -> str:
    """A GitHub table of ``summarise``'s rows: mean ± 95% CI per metric, and the paired attainment
    difference to ``reference``."""
    header = ["policy", *[label for label, _, _ in columns]]
    if reference:
        header.append(f"attainment − {reference} (paired)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples():
        cells = [row.policy]
        for _, key, fmt in columns:
            cells.append(cell(getattr(row, key), getattr(row, f"{key}_ci"), fmt, separator=" ± ", missing=None))
        if reference:
            diff, half = row.slo_attainment_diff, row.slo_attainment_diff_ci
            cells.append(cell(diff, half, "{:+.1%}", separator=" ± ", missing=None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_attainment_vs_load(table: pd.DataFrame, path: Path) -> None:
    """SLO attainment (95% CI bars) against the load multiplier, one line per policy, a panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(table["workload"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        part = table[table["workload"] == workload]
        for policy, group in part.groupby("policy", sort=False):
            group = group.sort_values("load")
            ax.errorbar(
                group["load"],
                group["slo_attainment"],
                yerr=group["slo_attainment_ci"].fillna(0),
                marker="o",
                capsize=3,
                label=policy,
            )
        ax.set(xlabel="load (x the workload's rate)", ylabel="SLO attainment", title=workload, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(rows: list[dict[str, Any]], path: Path, workload: str) -> None:
    """TTFT, TPOT and E2E distributions of finished requests, one line per row (rows kept with records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for row in rows:
        records = row["records"]
        done = records[records["state"] == "finished"]
        for ax, column in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), strict=True):
            values = np.sort(done[column].dropna().to_numpy())
            values = values[values > 0]
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=row["policy"])
    for ax, label in zip(axes, ("TTFT (s)", "TPOT (s)", "E2E (s)"), strict=True):
        ax.set(xscale="log", xlabel=label, ylim=(0, 1.01))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{workload}: latency CDFs (seed {rows[0]['seed']}, load x{rows[0]['load']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
