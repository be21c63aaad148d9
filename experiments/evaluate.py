"""Compare policies on identical workloads and seeds; print tables with 95% CIs, save CSV/JSON and plots.

    python experiments/evaluate.py                                   # conf/evaluate.yaml's grid
    python experiments/evaluate.py policies=[vllm_rr,vllm_prism] workloads=[azure_conv] seeds=[0,1,2]
    python experiments/evaluate.py loads=[0.5,0.75,1.0,1.25] max_rate.enabled=true
    python experiments/evaluate.py +saved.ppo=outputs/train/RUN/best +saved.onnx=outputs/train/RUN/best/export \
        workloads=[azure_conv,azure_code] loads=[1.0,1.25]       # saved policies, incl. a held-out trace
    python experiments/evaluate.py scenario=long-context policies=[vllm_lor,vllm_prism]   # a scenario's setting
    python experiments/evaluate.py +custom.mine=examples/my_router.py:PendingTokens   # a user's own class

Policies and workloads are named by their files in ``conf/policy`` and ``conf/workload`` (or ``policy_dirs``,
a user's folders); ``scenario=NAME`` (``conf/scenario``) replaces the cluster, workloads, seeds, loads and
reference by the scenario's (its test windows at its test load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from servegym.agents.configs import named_configs
from servegym.agents.harness import (
    Task,
    head_to_head,
    max_sustainable_load,
    policy_specs,
    run_tasks,
    summarise,
    warn_if_one_window,
)
from servegym.agents.reporting import plot_attainment_vs_load, plot_cdfs, print_head_to_head, print_tables
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs import scenarios


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The whole comparison; returns {"table": DataFrame, "rows": [...], "max_rate": {...}}."""
    policies = policy_specs(
        list(cfg.policies),
        _plain(cfg.get("saved")),
        _plain(cfg.get("custom")),
        _plain(cfg.get("policy_overrides")),
        dirs=list(cfg.get("policy_dirs") or []),
    )
    reference = cfg.get("reference")
    search = (0.05, 4.0)
    scenario = scenarios.from_config(cfg)
    if scenario is not None:  # the scenario's cluster, test windows, seeds, test load and reference
        window = scenario.window(scenario.windows["test"])
        workloads = {scenario.name: {**window, **_plain(cfg.get("workload_overrides")).get(scenario.name, {})}}
        cluster = scenario.cluster
        seeds, loads = list(cfg.get("scenario_seeds") or scenario.seeds["test"]), [scenario.loads["test"]]
        search = tuple(scenario.loads["search"])
        refs = [d.reference for d in scenario.decisions.values() if d.reference in policies]
        reference = refs[0] if refs else reference
    else:
        workloads = named_configs("workload", list(cfg.workloads), _plain(cfg.get("workload_overrides")))
        cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
        seeds, loads = [int(s) for s in cfg.seeds], [float(x) for x in cfg.loads]
    warn_if_one_window(workloads, seeds)
    tasks = [Task(p, w, s, x) for w in workloads for x in loads for p in policies for s in seeds]
    rows = run_tasks(
        tasks, policies, workloads, cluster, jobs=int(cfg.jobs), keep_records=True, progress=bool(cfg.progress)
    )
    table = summarise(rows, reference=reference if reference in policies else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame([{k: v for k, v in r.items() if k != "records"} for r in rows]).to_csv(
        out_dir / "runs.csv", index=False
    )
    table.to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.json").write_text(table.to_json(orient="records", indent=1))
    print_tables(table, reference if reference in policies else None)
    for name in [*_plain(cfg.get("saved")), *_plain(cfg.get("custom"))]:
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
        result["max_rate"] = max_rates(cfg, policies, workloads, cluster, seeds, search)
        (out_dir / "max_rate.json").write_text(json.dumps(result["max_rate"], indent=1))
        for workload, by_policy in result["max_rate"].items():
            print(
                f"max sustainable load at {cfg.max_rate.target:.0%} attainment, {workload}: "
                + ", ".join(f"{p} x{v['load']:.2f} ({v['rate_rps']:.1f} req/s)" for p, v in by_policy.items())
            )
    print(f"outputs: {out_dir}")
    return result


def max_rates(cfg, policies, workloads, cluster, seeds, search=(0.05, 4.0)) -> dict[str, dict[str, dict[str, float]]]:
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
                attainment,
                target=float(cfg.max_rate.target),
                low=search[0],
                high=search[1],
                iterations=int(cfg.max_rate.iterations),
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
