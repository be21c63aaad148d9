"""Golden summaries: every ``conf/policy`` policy on a window of the default scenario (and the PD cluster for
the pool policies), recorded so that a refactoring that changes any simulated number is caught.

    python tests/envs/sim/golden.py            # rewrite data/golden_summaries.json (after an intended change)

Regenerate only when results are meant to change (a new profile, new physics), and say so in the commit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from servegym.agents.configs import named_configs
from servegym.agents.harness import Task, run_task

GOLDEN = Path(__file__).parent / "data" / "golden_summaries.json"
ROOT = Path(__file__).resolve().parents[3]
WINDOW = {"num_requests": 1500, "random_window": True}
PD_POLICIES = ("arrow", "arrow_pools_lor", "planner_jsq", "planner_lor", "vllm_lor_static_pools")
KEYS = ("completed", "rejected", "flips", "slo_attainment", "goodput_rps", "ttft_p50_s", "ttft_p99_s",
        "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "preemption_rate", "prefix_hit_rate")  # fmt: skip


def summaries() -> dict[str, dict[str, float]]:
    """``policy/cluster`` -> the summary values in :data:`KEYS` (NaN as None)."""
    names = sorted(p.stem for p in (ROOT / "conf" / "policy").glob("*.yaml"))
    policies = named_configs("policy", names)
    workload = {**named_configs("workload", ["azure_conv"])["azure_conv"], **WINDOW}
    clusters = named_configs("cluster", ["hetero_h100_a100", "pd_h100"])
    out = {}
    for name in names:
        runs = [("hetero_h100_a100", 1.4)] + ([("pd_h100", 1.6)] if name in PD_POLICIES else [])
        for cluster, load in runs:
            row = run_task(Task(name, "azure_conv", 7, load), policies[name], workload, clusters[cluster])
            out[f"{name}/{cluster}"] = {k: None if _nan(row[k]) else float(row[k]) for k in KEYS}
    return out


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(summaries(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
