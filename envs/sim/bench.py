"""Speed benchmark of the simulator: simulated requests and engine steps per wall second, peak memory.

    python -m envs.sim.bench            # the default scenario (~80% load) and a 64-instance cluster

Figures are printed, never asserted: they belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
import resource
import time

from envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from envs.sim.engine import EngineConfig
from envs.sim.policies import LeastOutstandingRequests
from envs.sim.workload import TraceWorkload

SCENARIOS = {
    # name: (groups, rate_scale on the Azure conversation trace)
    "default: 4x H100 + 4x A100, Llama-3-8B, Azure conv x13 (~80% load)": (
        (InstanceGroup(4, EngineConfig(gpu="H100-SXM")), InstanceGroup(4, EngineConfig(gpu="A100-80GB"))),
        13.0,
    ),
    "64x H100, Llama-3-8B, Azure conv x200 (~1,100 req/s)": ((InstanceGroup(64, EngineConfig(gpu="H100-SXM")),), 200.0),
}


def run_benchmarks(repeats: int = 3) -> list[str]:
    lines = []
    for name, (groups, scale) in SCENARIOS.items():
        best = None
        for _ in range(repeats):
            requests = TraceWorkload(path="azure_conv", rate_scale=scale).generate(0)
            cluster = Cluster(ClusterConfig(groups, snapshot_interval_s=0.1), LeastOutstandingRequests())
            started = time.perf_counter()
            result = cluster.run(requests)
            wall = time.perf_counter() - started
            steps = sum(e.step_count for e in cluster.engines)
            if best is None or wall < best[0]:
                best = (wall, len(requests), steps, result.summary()["slo_attainment"])
        wall, count, steps, attainment = best
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lines.append(
            f"{name}: {count / wall:,.0f} simulated requests/s, {steps / wall / 1e6:.2f} M engine steps/s "
            f"({count:,} requests, {steps:,} steps in {wall:.2f} s; SLO attainment {attainment:.1%}; "
            f"peak RSS so far {peak_mib:,.0f} MiB)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for line in run_benchmarks(args.repeats):
        print(line)


if __name__ == "__main__":
    main()
