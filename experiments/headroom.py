"""Oracle headroom of one-step lookahead over a base router (issue 14): on counterfactual windows of a
scenario, the base policy's SLO attainment, the true-future lookahead (an upper bound: every candidate
engine evaluated by simulating the base afterwards on the future the window will really see) and the
same lookahead on sampled futures (what a deployable lookahead might get), with paired 95% intervals
over the seeds.

    python experiments/headroom.py                                   # hetero_h100_a100, azure_conv x17, PRISM
    python experiments/headroom.py --policy vllm_lor --seeds 0-9 --every 4 --samples 2
    python -m servegym.experiments.headroom --cluster h100x8 --rate-scale 20
    python experiments/headroom.py --scenario multi-slo --load 18        # a scenario's cluster, workload, reference
    python experiments/headroom.py --scenario prefix-chat --policy vllm_prefix   # over another heuristic

The library function is :func:`servegym.agents.lookahead.headroom`. Lookahead children are forked
(Linux); they run the simulator and the base heuristic only.
"""

from __future__ import annotations

import argparse
import time

from servegym.agents.configs import named_configs
from servegym.agents.lookahead import MODES, headroom, routing_reference, scenario_headroom
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs import scenarios


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario",
        default=None,
        help="a conf/scenario name: its cluster, workload and reference router "
        "(then --cluster, --workload and --rate-scale are ignored, and --policy only when not given)",
    )
    parser.add_argument("--load", type=float, default=None, help="with --scenario: the load (default: its test load)")
    parser.add_argument("--cluster", default="hetero_h100_a100", help="a conf/cluster name")
    parser.add_argument("--workload", default="azure_conv", help="a conf/workload name")
    parser.add_argument("--policy", default=None, help="the base heuristic, a conf/policy name (default: PRISM)")
    parser.add_argument(
        "--rate-scale", type=float, default=17.0, help="trace speed (load factor = this / the config's)"
    )
    parser.add_argument("--seeds", default="0-5", help="window seeds, e.g. 0-5 or 1,4,9")
    parser.add_argument("--warmup", type=int, default=400, help="decisions by the base before the window")
    parser.add_argument("--horizon", type=int, default=64, help="decisions of the window")
    parser.add_argument("--num-requests", type=int, default=1000, help="requests per random window")
    parser.add_argument("--every", type=int, default=8, help="look ahead at every k-th decision of the window")
    parser.add_argument("--samples", type=int, default=1, help="sampled futures averaged per lookahead")
    parser.add_argument("--modes", default=",".join(MODES), help="of base,true,sampled")
    parser.add_argument("--jobs", type=int, default=None, help="children at once (default: CPU count)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.scenario:
            scenario = scenarios.load(args.scenario)
            name = args.policy or routing_reference(scenario)
            load_factor = scenario.loads["test"] if args.load is None else args.load
            what = f"scenario {args.scenario} at load x{load_factor:g}"
        else:
            name = args.policy or "vllm_prism"
            cluster = named_configs("cluster", [args.cluster])[args.cluster]
            workload = named_configs("workload", [args.workload])[args.workload]
            policy = named_configs("policy", [name])[name]
            load_factor = args.rate_scale / float(workload.get("rate_scale") or 1.0)
            what = f"{args.cluster}, {args.workload} x{args.rate_scale:g} (load factor {load_factor:.3f})"
        seeds = _seeds(args.seeds)
        print(
            f"headroom of one-step lookahead over {name}: {what}, windows of {args.warmup} + {args.horizon} "
            f"decisions, lookahead at every {args.every}th, {args.samples} sampled future(s), seeds {seeds}",
            flush=True,
        )
        started = time.perf_counter()
        options = dict(
            warmup=args.warmup,
            horizon=args.horizon,
            num_requests=args.num_requests,
            every=args.every,
            samples=args.samples,
            modes=args.modes.split(","),
            jobs=args.jobs,
            progress=True,
        )
        if args.scenario:
            result = scenario_headroom(scenario, load_factor, seeds, policy=name, **options)
        else:
            result = headroom(cluster, workload, policy, load_factor, seeds, **options)
    rows = result.table()
    print(
        "\n| policy | SLO attainment | met / counted per window | decisions changed | paired gain | gain (requests) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        gain = f"{row['gain']:+.2%} ± {row['gain_ci']:.2%}" if "gain" in row else ""
        requests = f"{row['gain_requests']:+.1f} ± {row['gain_requests_ci']:.1f}" if "gain" in row else ""
        print(
            f"| {row['policy']} | {row['attainment']:.2%} ± {row['ci']:.2%} | {row['met']:.1f} / {row['counted']:.0f} "
            f"| {row['changed']:.1f} | {gain} | {requests} |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s wall")
    return rows


if __name__ == "__main__":
    main()
