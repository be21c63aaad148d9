"""Compare policies on identical workloads and seeds; print tables with 95% CIs, save CSV/JSON and plots.

    python experiments/evaluate.py                                   # conf/evaluate.yaml's grid
    python experiments/evaluate.py policies=[vllm_rr,vllm_prism] workloads=[azure_conv] seeds=[0,1,2]
    python experiments/evaluate.py loads=[0.5,0.75,1.0,1.25] max_rate.enabled=true
    python experiments/evaluate.py +saved.ppo=outputs/train/RUN/best +saved.onnx=outputs/train/RUN/best/export \
        workloads=[azure_conv,azure_code] loads=[1.0,1.25]       # saved policies, incl. a held-out trace

Policies and workloads are named by their files in ``conf/policy`` and ``conf/workload``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.configs import ConfigError, named_configs
from agents.harness import (
    Task,
    head_to_head,
    max_sustainable_load,
    run_tasks,
    saved_policy_spec,
    summarise,
)
from agents.user_errors import exit_on_user_error

SHOWN = (
    ("SLO att.", "slo_attainment", "{:.1%}"),
    ("goodput r/s", "goodput_rps", "{:.2f}"),
    ("tok/s", "throughput_tok_s", "{:,.0f}"),
    ("TTFT P50 s", "ttft_p50_s", "{:.3f}"),
    ("TTFT P99 s", "ttft_p99_s", "{:.2f}"),
    ("TPOT P50 ms", "tpot_p50_s", "ms"),
    ("TPOT P99 ms", "tpot_p99_s", "ms"),
    ("preempt/req", "preemption_rate", "{:.3f}"),
)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _cell(mean: float, half: float, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    scale = 1e3 if fmt == "ms" else 1.0
    fmt = "{:.1f}" if fmt == "ms" else fmt
    text = fmt.format(mean * scale)
    if half is not None and not math.isnan(half):
        text += " ±" + fmt.replace("+", "").format(half * scale).lstrip()
    return text


def print_tables(table, reference: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for (workload, load), group in table.groupby(["workload", "load"], sort=False):
        title = f"{workload} (load x{load:g}; mean ±95% CI over {int(group['seeds'].iloc[0])} seeds)"
        rich_table = Table(title=title)
        rich_table.add_column("policy")
        for label, _, _ in SHOWN:
            rich_table.add_column(label, justify="right")
        if reference:
            rich_table.add_column(f"att. / {reference}", justify="right")
            rich_table.add_column(f"att. − {reference} (paired)", justify="right")
        for row in group.itertuples():
            cells = [_cell(getattr(row, key), getattr(row, f"{key}_ci"), fmt) for _, key, fmt in SHOWN]
            if reference:
                ratio = getattr(row, "slo_attainment_vs_ref", math.nan)
                cells.append("-" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x")
                cells.append(_cell(row.slo_attainment_diff, row.slo_attainment_diff_ci, "{:+.1%}"))
            rich_table.add_row(row.policy, *cells)
        console.print(rich_table)


def print_head_to_head(table) -> None:
    """One saved policy against each other policy, paired over seeds."""
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
                _cell(row.slo_attainment_diff, row.slo_attainment_diff_ci, "{:+.1%}"),
                str(row.wins),
                str(row.ties),
                str(row.losses),
            )
        console.print(rich_table)


def plot_attainment_vs_load(table, path: Path) -> None:
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


def plot_cdfs(rows: list[dict], path: Path, workload: str) -> None:
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


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The whole comparison; returns {"table": DataFrame, "rows": [...], "max_rate": {...}}."""
    policies = named_configs("policy", list(cfg.policies), _plain(cfg.get("policy_overrides")))
    for name, path in _plain(cfg.get("saved")).items():  # trained runs and exports beside the heuristics
        if name in policies:
            raise ConfigError(f"saved policy {name!r} has the name of a conf/policy entry; rename it")
        policies[name] = saved_policy_spec(path)
    workloads = named_configs("workload", list(cfg.workloads), _plain(cfg.get("workload_overrides")))
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    seeds, loads = [int(s) for s in cfg.seeds], [float(x) for x in cfg.loads]
    tasks = [Task(p, w, s, x) for w in workloads for x in loads for p in policies for s in seeds]
    rows = run_tasks(
        tasks, policies, workloads, cluster, jobs=int(cfg.jobs), keep_records=True, progress=bool(cfg.progress)
    )
    reference = cfg.get("reference")
    table = summarise(rows, reference=reference if reference in policies else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame([{k: v for k, v in r.items() if k != "records"} for r in rows]).to_csv(
        out_dir / "runs.csv", index=False
    )
    table.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.json").write_text(table.to_json(orient="records", indent=1))
    print_tables(table, reference if reference in policies else None)
    for name in _plain(cfg.get("saved")):
        duel = head_to_head(rows, name)
        duel.to_csv(out_dir / f"head_to_head_{name}.csv", index=False)
        print_head_to_head(duel)
    for workload in workloads:
        first = [r for r in rows if r["workload"] == workload and r["seed"] == seeds[0] and r["load"] == loads[-1]]
        plot_cdfs(first, out_dir / f"latency_cdf_{workload}.png", workload)
    if len(loads) > 1:
        plot_attainment_vs_load(table, out_dir / "attainment_vs_load.png")
    result: dict[str, Any] = {"table": table, "rows": rows, "max_rate": {}}
    if cfg.max_rate.enabled:
        result["max_rate"] = max_rates(cfg, policies, workloads, cluster, seeds)
        (out_dir / "max_rate.json").write_text(json.dumps(result["max_rate"], indent=1))
        for workload, by_policy in result["max_rate"].items():
            print(
                f"max sustainable load at {cfg.max_rate.target:.0%} attainment, {workload}: "
                + ", ".join(f"{p} x{v['load']:.2f} ({v['rate_rps']:.1f} req/s)" for p, v in by_policy.items())
            )
    print(f"outputs: {out_dir}")
    return result


def max_rates(cfg, policies, workloads, cluster, seeds) -> dict[str, dict[str, dict[str, float]]]:
    """Per workload and policy: the largest load multiplier meeting the target attainment (bisection)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for workload in workloads:
        out[workload] = {}
        for policy in policies:
            offered: dict[float, float] = {}

            def attainment(load: float, policy=policy, workload=workload, offered=offered) -> float:
                rows = run_tasks(
                    [Task(policy, workload, s, load) for s in seeds],
                    policies,
                    workloads,
                    cluster,
                    jobs=int(cfg.jobs),
                    progress=False,
                )
                offered[load] = float(np.mean([r["offered_rps"] for r in rows]))
                return float(np.mean([r["slo_attainment"] for r in rows]))

            load = max_sustainable_load(
                attainment, target=float(cfg.max_rate.target), iterations=int(cfg.max_rate.iterations)
            )
            out[workload][policy] = {"load": load, "rate_rps": offered.get(load, 0.0)}
    return out


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        result = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    table = result["table"]
    return float(table["slo_attainment"].mean())


if __name__ == "__main__":
    main()
