"""Simulate a workload on a cluster under one routing and batching policy; print and save the outcome.

    python experiments/simulate.py                                  # the built-in default scenario
    python experiments/simulate.py workload=trace workload.path=my_trace.csv
    python experiments/simulate.py cluster=h100x64 workload.rate_scale=100 policy=vllm_rr
    python experiments/simulate.py scenario=prefix-chat policy=vllm_prefix   # a scenario's cluster and test window

Writes into hydra's run directory: ``summary.json``, ``requests.parquet`` (one row per request),
``latency_cdf.png`` and the resolved config (``.hydra/``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from servegym.agents.harness import load_policy
from servegym.agents.reporting import print_summary
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs import scenarios
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from, workload_from
from servegym.envs.sim.plots import latency_cdfs
from servegym.envs.sim.workload import offered_load


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Build everything from ``cfg``, simulate, save the artefacts into ``out_dir``; returns the summary."""
    workload_map, cluster_map = cfg.workload, cfg.cluster
    scenario = scenarios.from_config(cfg)
    if scenario is not None:  # one test window of the scenario at its test load, on its cluster
        workload_map = scenario.workload_at(scenario.loads["test"], scenario.windows["test"])
        cluster_map = scenario.cluster
    workload = workload_from(workload_map)
    cluster_config = cluster_from(cluster_map)
    policy = load_policy(OmegaConf.to_container(cfg.policy, resolve=True))
    requests = workload.generate(int(cfg.workload_seed))
    cluster = Cluster(
        cluster_config, policy.router, batch_policy=policy.batch, seed=int(cfg.seed), pool_policy=policy.pools
    )
    result = cluster.run(requests, until_s=cfg.until_s, progress=bool(cfg.progress))
    records = result.records()
    summary = result.summary()
    summary["offered"] = offered_load(requests)
    summary["flips"] = [{"time_s": t, "instance": i, "from": a, "to": b} for t, i, a, b in cluster.flips]
    summary["scenario"] = {
        "scenario": scenario.name if scenario is not None else "",
        "cluster": cluster_map.get("name", ""),
        "workload": workload_map.get("name", ""),
        "policy": cfg.policy.get("name", ""),
        "profiles": cluster_config.profiles,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    records.to_parquet(out_dir / "requests.parquet", index=False)
    title = f"{summary['scenario']['workload']} on {summary['scenario']['cluster']} ({summary['scenario']['policy']})"
    latency_cdfs(records, out_dir / "latency_cdf.png", title=title)
    if not (out_dir / ".hydra").exists():
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print_summary(summary, title)
    print(f"outputs: {out_dir}")
    return summary


@hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return float(summary["slo_attainment"])


if __name__ == "__main__":
    main()
