"""Speed benchmark of the environments: steps per second for each id (random masked actions), single and
in an 8-way vector environment.

    python -m servegym.envs.bench
    python -m servegym.envs.bench --windows-only
    python -m servegym.envs.bench --windows-only --router servegym.agents.routing.predictive.Prism \
        --router-arg slo_tpot_s=0.1

``--windows-only`` measures the counterfactual windows alone: as today (every episode simulates its
warm-up, its reference run and a drain), and branched from warm snapshots (``branches=16``: warm-up and
reference once per snapshot, each episode a forked worker; with the drain ending once every awaited
request's outcome is decided). ``--split`` says where a branched window's time goes (the agent's steps, the
truncating steps with their drains, the resets with their forks and snapshots). ``--router`` (a dotted
class path, imported by name: envs never import agents) sets the inline and reference heuristic.

Figures are printed, never asserted: they belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
import importlib
import time

import gymnasium as gym
import numpy as np
import servegym.envs as envs

WORKLOAD = {
    "kind": "trace",
    "path": "azure_conv",
    "rate_scale": 8.0,
    "num_requests": 4000,
    "random_window": True,
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}


# The training recipe's episodes (conf/env/route.yaml): 400 warm-up decisions, 64 for the agent, a drain;
# each reset also runs the relative reward's reference simulation.
WINDOWS = {"reward": "relative", "horizon": 64, "warmup": 400, "drain": True, "load_range": (0.8, 1.5)}
WINDOW_WORKLOAD = dict(WORKLOAD, num_requests=1000, rate_scale=13.0)


def single(env_id: str, steps: int, workload: dict = WORKLOAD, **kwargs) -> float:
    env = gym.make(env_id, workload=workload, **kwargs)
    try:
        return _steps_per_s(env, steps)
    finally:
        env.close()


def _steps_per_s(env: gym.Env, steps: int) -> float:
    return steps / sum(_time_random_steps(env, steps).values())


def _time_random_steps(env: gym.Env, steps: int) -> dict[str, float]:
    """Seconds spent in ``steps`` random masked actions (the mask and the draw included) after a first
    ``reset(seed=0)``: in the ordinary steps, in the steps that end an episode (a counterfactual window's
    truncation runs its drain), and in the resets that follow them."""
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    spent = {"steps": 0.0, "drains": 0.0, "resets": 0.0}
    for _ in range(steps):
        started = time.perf_counter()
        mask = env.unwrapped.action_masks()
        _, _, terminated, truncated, _ = env.step(int(rng.choice(np.flatnonzero(mask))))
        ended = terminated or truncated
        spent["drains" if ended else "steps"] += time.perf_counter() - started
        if ended:
            started = time.perf_counter()
            env.reset()
            spent["resets"] += time.perf_counter() - started
    return spent


def vector(env_id: str, steps: int, n: int = 8) -> float:
    vec = gym.make_vec(f"servegym:{env_id}", num_envs=n, vectorization_mode="sync", workload=WORKLOAD)
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(steps // n):
        vec.step(rng.integers(0, 1, size=n))  # action 0 is always valid or falls back
    return (steps // n) * n / (time.perf_counter() - started)


def windows(steps: int, router=None, branches: int = 16) -> dict[str, float]:
    """Agent steps/s on the training recipe's counterfactual windows: as every reset simulating its own
    warm-up, reference and drain (``per_reset``), and branched from warm snapshots (``branched``, and
    ``branched_decided`` with ``drain_until="decided"``)."""
    rates = {}
    for name, extra in (
        ("per_reset", {}),
        ("branched", {"branches": branches}),
        ("branched_decided", {"branches": branches, "drain_until": "decided"}),
    ):
        rates[name] = single("servegym/Route-v0", steps, WINDOW_WORKLOAD, router=router, **WINDOWS, **extra)
    return rates


def window_split(steps: int, router=None, branches: int = 16) -> dict[str, float]:
    """Seconds spent in the agent's ordinary steps, in the truncating steps (each runs the drain) and in
    resets (a fork from the snapshot, or a new snapshot: warm-up and reference), on branched windows with
    ``drain_until="decided"``: what bounds the agent steps/s of :func:`windows` (the same steps, timed in parts)."""
    env = gym.make(
        "servegym/Route-v0",
        workload=WINDOW_WORKLOAD,
        router=router,
        branches=branches,
        drain_until="decided",
        **WINDOWS,
    )
    try:
        return _time_random_steps(env, steps)
    finally:
        env.close()


def _router(path: str | None, arguments: list[str]):
    if path is None:
        return None
    module, _, name = path.replace(":", ".").rpartition(".")
    kwargs = {}
    for argument in arguments:
        key, _, value = argument.partition("=")
        kwargs[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return getattr(importlib.import_module(module), name)(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--windows-only", action="store_true", help="only the counterfactual windows, before/after")
    parser.add_argument("--router", default=None, help="inline/reference router class (dotted path)")
    parser.add_argument("--router-arg", action="append", default=[], help="KEY=VALUE for the router")
    parser.add_argument("--branches", type=int, default=16, help="episodes per warm snapshot")
    parser.add_argument("--split", action="store_true", help="where a branched window's time goes")
    args = parser.parse_args()
    if args.split:
        spent = window_split(args.steps // 2, _router(args.router, args.router_arg), args.branches)
        total = sum(spent.values())
        print(
            f"servegym/Route-v0 branched windows ({args.branches} per snapshot, drain until decided), "
            f"{args.steps // 2:,} agent steps in {total:.2f} s ({args.steps // 2 / total:,.0f} steps/s): "
            + ", ".join(f"{name} {seconds:.2f} s ({seconds / total:.0%})" for name, seconds in spent.items())
        )
        return
    if args.windows_only:
        rates = windows(args.steps // 4, _router(args.router, args.router_arg), args.branches)
        print(
            "servegym/Route-v0 counterfactual windows (400 warm-up + 64 agent decisions, drain), agent steps/s: "
            f"{rates['per_reset']:,.0f} per reset; {rates['branched']:,.0f} branched ({args.branches} episodes per "
            f"warm snapshot); {rates['branched_decided']:,.0f} branched, drain until decided"
        )
        return
    for env_id in envs.ENV_IDS:
        steps = args.steps // 20 if env_id.endswith("Pools-v0") else args.steps
        print(
            f"{env_id}: {single(env_id, steps):,.0f} steps/s single, "
            f"{vector(env_id, steps):,.0f} steps/s in 8 synchronous copies (one core)"
        )
    rate = single("servegym/Route-v0", args.steps // 4, WINDOW_WORKLOAD, **WINDOWS)
    print(f"servegym/Route-v0 counterfactual windows (the training recipe's episodes): {rate:,.0f} agent steps/s")


if __name__ == "__main__":
    main()
