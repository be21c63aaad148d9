"""Speed benchmark of the simulator: simulated requests and engine steps per wall second, peak memory.

    python -m servegym.envs.sim.bench                      # the default scenario (~80% load) and a 64-instance cluster
    python -m servegym.envs.sim.bench --soak 1000000       # a million requests streamed through the default cluster

The soak streams windows of the Azure conversation trace back to back (only one window in memory),
keeps no finished request (``keep_requests=False``) and aggregates outcomes in a
:class:`servegym.envs.sim.metrics.StreamingSummary`; it prints the resident memory every tenth of the run, which
stays flat when nothing grows with the number of requests simulated.

Figures are printed, never asserted: they belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
import resource
import time

from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.metrics import StreamingSummary
from servegym.envs.sim.policies import LeastOutstandingRequests, Observer
from servegym.envs.sim.request import Request
from servegym.envs.sim.workload import SloMix, TraceWorkload, stream

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


def resident_mib() -> float:
    """The process's current resident memory (MiB), from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Progress(Observer):
    """Prints finished requests, resident memory and speed every ``every`` completions."""

    def __init__(self, every: int) -> None:
        self.every, self.count, self.started = every, 0, time.perf_counter()

    def on_finish(self, request: Request) -> None:
        self.count += 1
        if self.count % self.every == 0:
            wall = time.perf_counter() - self.started
            print(
                f"  {self.count:>9,} finished  RSS {resident_mib():6.1f} MiB  {self.count / wall:8,.0f} req/s",
                flush=True,
            )


def soak(total: int, window: int = 20_000) -> str:
    """Stream ``total`` requests through the default scenario's cluster; returns the closing line."""
    groups, scale = next(iter(SCENARIOS.values()))
    slo = SloMix.from_config([{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}])
    workload = TraceWorkload(path="azure_conv", rate_scale=scale, num_requests=window, random_window=True, slo=slo)
    cluster = Cluster(ClusterConfig(groups, snapshot_interval_s=0.1), LeastOutstandingRequests(), keep_requests=False)
    outcomes = StreamingSummary()
    cluster.subscribe(outcomes)
    cluster.subscribe(_Progress(max(1, total // 10)))
    started = time.perf_counter()
    cluster.start(stream(workload, 0, total))
    cluster.env.run()
    wall = time.perf_counter() - started
    summary = outcomes.summary(total)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (
        f"soak: {total:,} requests ({summary['completed']:,} finished, {cluster.num_rejected:,} rejected, "
        f"SLO attainment {summary['slo_attainment']:.1%}, TTFT P99 {summary['ttft_p99_s']:.2f} s) in {wall:,.0f} s "
        f"({total / wall:,.0f} requests/s, {cluster.env.now / 3600:.1f} simulated hours); "
        f"RSS at the end {resident_mib():.0f} MiB, peak {peak_mib:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--soak", type=int, default=0, help="stream this many requests instead (memory soak)")
    args = parser.parse_args()
    if args.soak:
        print(soak(args.soak))
        return
    for line in run_benchmarks(args.repeats):
        print(line)


if __name__ == "__main__":
    main()
