"""Simulated vs live: the same cluster, workload window, seed and policy in the simulator and in front of twins.

    python -m servegym.serving.parity --cluster conf/cluster/h100x8.yaml --policy vllm_rr vllm_lor vllm_prism \
        --workload conf/workload/poisson.yaml --requests 200 --seed 0 --time-scale 4

For each policy: the simulator runs the window (``servegym.envs.sim.cluster.Cluster`` built as
``experiments/simulate.py`` builds it, vLLM batching), then one twin per engine of the cluster (the
engine configs the simulator builds, the same seed and engine index, so the same profile and noise
stream) serves it behind the router with that policy (scrape interval = the cluster's
``snapshot_interval_s``, in simulated time), while the load generator replays the same arrivals
open-loop. Prints, per policy, simulated vs live (SLO attainment, goodput, TTFT/TPOT P50/P90, E2E P50,
all in simulated units) and how often both sent a request to the same engine; with several policies,
both rankings. Live numbers differ by what the live side cannot avoid: scrape staleness (gauges up to
one interval old, taken at other moments than the simulator's ticks), tokens and requests on the wire
(the router tap counts them when relayed), and event-loop jitter, which the run measures and prints.

Both sides see the same request information: the load generator sends each request's SLO class and
session in headers and its prefix structure as token-id segments, which the router (and a twin with prefix
caching) hash as the simulator's ``hash_ids``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from servegym.envs.sim.cluster import Cluster, ClusterConfig
from servegym.envs.sim.config import cluster_from
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import VllmPolicy
from servegym.envs.sim.request import Request
from servegym.envs.sim.workload import WorkloadError
from servegym.serving.loadgen import replay, summary, workload_requests
from servegym.serving.router import start_router
from servegym.serving.router_config import RouterConfigError, load_routing_policy, policy_spec, router_config
from servegym.serving.twin import TwinConfig, start_twin

VLLM_BATCH = "servegym.envs.sim.policies.VllmPolicy"
MIN_SCRAPE_S = 0.01  # simulated scrape interval for a cluster whose router sees live state (interval 0)
METRICS: tuple[tuple[str, str, float, str], ...] = (  # key, label, display scale, unit
    ("slo_attainment", "SLO attainment", 100.0, "%"),
    ("goodput_rps", "goodput", 1.0, "req/s"),
    ("ttft_p50_s", "TTFT P50", 1e3, "ms"),
    ("ttft_p90_s", "TTFT P90", 1e3, "ms"),
    ("tpot_p50_s", "TPOT P50", 1e3, "ms"),
    ("tpot_p90_s", "TPOT P90", 1e3, "ms"),
    ("e2e_p50_s", "E2E P50", 1e3, "ms"),
)


class ParityError(ValueError):
    """A parity run that cannot be set up (the message names what to change)."""


@dataclass
class PolicyParity:
    """One policy's window, simulated and live (simulated units), and what the live run measured about itself."""

    policy: str
    simulated: dict[str, float]
    live: dict[str, float]
    same_engine: float  # share of requests both sides sent to the same engine
    live_errors: int
    loop_lag_ms: dict[str, float] = field(default_factory=dict)  # event-loop lateness (wall ms), p50/p99/max


def window_metrics(summary_row: Mapping[str, Any], records: pd.DataFrame) -> dict[str, float]:
    """The compared figures: the summary's (the simulator's definitions) plus TTFT and TPOT P90."""
    done = records[records["state"] == "finished"]
    out = {key: float(summary_row[key]) for key, *_ in METRICS if key in summary_row}
    for column in ("ttft_s", "tpot_s"):
        values = done[column].dropna()
        out[column.replace("_s", "_p90_s")] = float(np.percentile(values, 90)) if len(values) else math.nan
    return out


def _same_window(requests: Sequence[Request]) -> list[Request]:
    """Fresh copies of the window (the load generator sends the same SLO classes, sessions and prefixes)."""
    return [
        Request(
            r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, r.slo, session_id=r.session_id, hash_ids=r.hash_ids
        )
        for r in requests
    ]


def slo_classes(requests: Sequence[Request]) -> list[dict[str, Any]]:
    """The window's SLO classes for the router's config, in order of first appearance."""
    seen: dict[str, dict[str, Any]] = {}
    for r in requests:
        seen.setdefault(r.slo.name, {"name": r.slo.name, "ttft_s": r.slo.ttft_s, "tpot_s": r.slo.tpot_s,
                                     "e2e_s": r.slo.e2e_s})  # fmt: skip
    return list(seen.values())


def _count(config: ClusterConfig) -> int:
    return sum(group.count for group in config.groups)


def check_cluster(cluster: Mapping[str, Any]) -> str:
    """The model every engine serves; refuses what twins and a single-model load generator cannot serve."""
    config = cluster_from(dict(cluster))
    models = {group.engine.model for group in config.groups}
    if len(models) != 1:
        raise ParityError(f"parity replays one model; the cluster serves {sorted(models)}")
    roles = {str(group.engine.role) for group in config.groups}
    if roles != {"both"}:
        raise ParityError(f"twins are colocated engines; the cluster has roles {sorted(roles)} (prefill/decode pools)")
    if config.oracle:
        raise ParityError("an oracle cluster reveals output lengths to the router; a live router cannot see them")
    return models.pop()


def check_batching(policy: str, num_engines: int) -> None:
    """Twins batch as vLLM does; a bundle that batches otherwise cannot be compared."""
    batch = policy_spec(policy, num_engines).get("batch") or {"_target_": VLLM_BATCH}
    if batch.get("_target_") != VLLM_BATCH:
        target = batch.get("_target_")
        raise ParityError(f"policy {policy}: batches with {target}; twins run vLLM batching ({VLLM_BATCH})")


def simulate(
    cluster: Mapping[str, Any], policy: str, requests: Sequence[Request], seed: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """The window in the simulator under ``policy``'s router and vLLM batching."""
    config = cluster_from(dict(cluster))
    router = load_routing_policy(policy, _count(config))
    result = Cluster(config, router, batch_policy=VllmPolicy(), seed=seed).run(_same_window(requests))
    records = result.records()
    return window_metrics(result.summary(), records), records


class LoopLag:
    """How late the event loop wakes a sleeper (wall ms): the jitter every live timestamp carries."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s, self.lags_ms = period_s, []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lags_ms.append((time.perf_counter() - started - self.period_s) * 1e3)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, float]:
        lags = np.asarray(self.lags_ms or [0.0])
        return {"p50": float(np.percentile(lags, 50)), "p99": float(np.percentile(lags, 99)), "max": float(lags.max())}


async def serve(
    cluster: Mapping[str, Any],
    policy: str,
    requests: Sequence[Request],
    seed: int,
    time_scale: float,
    time_limit_s: float,
) -> tuple[dict[str, float], pd.DataFrame, dict[str, float]]:
    """The window live: twins of the cluster's engines, the router with ``policy``, the load generator."""
    config = cluster_from(dict(cluster))
    model = check_cluster(cluster)
    engines = [group.engine for group in config.groups for _ in range(group.count)]
    interval_s = max(config.snapshot_interval_s, MIN_SCRAPE_S)
    async with contextlib.AsyncExitStack() as stack:
        twins = []
        for index, engine in enumerate(engines):
            twin_config = TwinConfig(time_scale=time_scale, seed=seed, engine_index=index, name=str(index))
            twins.append(await stack.enter_async_context(start_twin(twin_config, engine=engine)))
        served = router_config(
            {
                "cluster": dict(cluster),
                "backends": [twin.url for twin in twins],
                "time_scale": time_scale,
                "scrape_interval_s": interval_s * time_scale,  # the simulator's snapshot cadence, on the wall
                "stale_s": max(2.0, 20 * interval_s * time_scale),
                "slo": slo_classes(requests),
            }
        )
        router = await stack.enter_async_context(start_router(served, load_routing_policy(policy, len(engines))))
        with LoopLag() as lag:
            records, wall_s = await replay(router.url, requests, model, time_scale, time_limit_s, served.segment_tokens)
    live = summary(records, wall_s, time_scale)
    return window_metrics(live, records), records, lag.summary() | {"errors": float(live["errors"])}


def compare(
    cluster: Mapping[str, Any],
    policies: Sequence[str],
    requests: Sequence[Request],
    seed: int = 0,
    time_scale: float = 1.0,
    time_limit_s: float = 120.0,
) -> list[PolicyParity]:
    """Every policy on the same window, simulated then live (checked before anything runs)."""
    num_engines = _count(cluster_from(dict(cluster)))
    check_cluster(cluster)
    for policy in policies:
        check_batching(policy, num_engines)
    out = []
    for policy in policies:
        simulated, sim_records = simulate(cluster, policy, requests, seed)
        live, live_records, stats = asyncio.run(serve(cluster, policy, requests, seed, time_scale, time_limit_s))
        live_engine = pd.to_numeric(live_records["instance"], errors="coerce")
        same = float(np.mean(sim_records["instance"].to_numpy() == live_engine.to_numpy()))
        errors = int(stats.pop("errors"))
        out.append(PolicyParity(policy, simulated, live, same, errors, stats))
    return out


def ranking(results: Sequence[PolicyParity], side: str) -> list[str]:
    """Policies best first by SLO attainment, ties broken by the lower TTFT P90."""
    key = lambda r: (-getattr(r, side)["slo_attainment"], getattr(r, side)["ttft_p90_s"])  # noqa: E731
    return [r.policy for r in sorted(results, key=key)]


def _cell(value: float, scale: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value * scale:.1f}" if scale != 1.0 else f"{value:.2f}"


def _difference(sim: float, live: float, unit: str) -> str:
    if not (math.isfinite(sim) and math.isfinite(live)):
        return "n/a"
    if unit == "%":
        return f"{(live - sim) * 100:+.1f} pt"
    return f"{(live - sim) / sim * 100:+.1f}%" if sim else "n/a"


def render(results: Sequence[PolicyParity], title: str) -> str:
    """The side-by-side tables and, with several policies, both rankings."""
    lines = [title]
    for result in results:
        lines += ["", f"policy {result.policy}", f"  {'metric':<22}{'simulated':>11}{'live':>11}{'live - sim':>13}"]
        for key, label, scale, unit in METRICS:
            sim, live = result.simulated.get(key, math.nan), result.live.get(key, math.nan)
            lines.append(
                f"  {label + ' (' + unit + ')':<22}{_cell(sim, scale):>11}{_cell(live, scale):>11}"
                f"{_difference(sim, live, unit):>13}"
            )
        lag = result.loop_lag_ms
        lines.append(
            f"  same engine as simulated: {result.same_engine:.0%}; live errors: {result.live_errors}; "
            f"event-loop lag (wall ms) p50 {lag.get('p50', 0):.2f}, p99 {lag.get('p99', 0):.2f}, "
            f"max {lag.get('max', 0):.1f}"
        )
    if len(results) > 1:
        simulated, live = ranking(results, "simulated"), ranking(results, "live")
        lines += [
            "",
            "ranking by SLO attainment (ties: lower TTFT P90)",
            f"  simulated: {' > '.join(simulated)}",
            f"  live:      {' > '.join(live)}",
            f"  same: {'yes' if simulated == live else 'no'}",
        ]
    return "\n".join(lines)


def _cluster_mapping(value: str) -> dict[str, Any]:
    path = Path(value)
    if not path.exists():
        path = Path("conf/cluster") / f"{value}.yaml"
    if not path.exists():
        raise ParityError(f"cluster {value}: no such file (a conf/cluster YAML or name)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ParityError(f"{path}: expected a mapping")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servegym.serving.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", required=True, help="a conf/cluster YAML (or its name)")
    parser.add_argument("--policy", nargs="+", required=True, help="conf/policy names/YAMLs, runs or exports")
    parser.add_argument("--workload", required=True, help="a workload YAML (conf/workload/*.yaml)")
    parser.add_argument("--requests", type=int, default=100, help="the first N requests of the workload")
    parser.add_argument("--rate-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="workload and simulator seed (the twins' too)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second")
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="wall seconds per live run")
    args = parser.parse_args(argv)
    try:
        if args.requests < 1 or not args.time_scale > 0:
            raise ParityError("--requests must be at least 1 and --time-scale positive")
        cluster = _cluster_mapping(args.cluster)
        requests = workload_requests(args.workload, args.requests, args.rate_scale, args.seed)
        results = compare(cluster, args.policy, requests, args.seed, args.time_scale, args.time_limit_s)
    except (ParityError, RouterConfigError, ClusterConfigError, WorkloadError, OSError, ValueError) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
    title = (
        f"{Path(args.workload).stem} on {Path(args.cluster).stem}: {len(requests)} requests, seed {args.seed}, "
        f"time scale {args.time_scale:g} (simulated units)"
    )
    print(render(results, title))


if __name__ == "__main__":
    main()
