"""Speed benchmark of the environments: steps per second for each id (random masked actions), single and
in an 8-way vector environment.

    python -m servegym.envs.bench

Figures are printed, never asserted: they belong to the machine they ran on.
"""

from __future__ import annotations

import argparse
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


def single(env_id: str, steps: int, workload: dict = WORKLOAD, **kwargs) -> float:
    env = gym.make(env_id, workload=workload, **kwargs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    started, done = time.perf_counter(), 0
    while done < steps:
        mask = env.unwrapped.action_masks()
        _, _, terminated, truncated, _ = env.step(int(rng.choice(np.flatnonzero(mask))))
        done += 1
        if terminated or truncated:
            env.reset()
    return done / (time.perf_counter() - started)


def vector(env_id: str, steps: int, n: int = 8) -> float:
    vec = gym.make_vec(f"servegym:{env_id}", num_envs=n, vectorization_mode="sync", workload=WORKLOAD)
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(steps // n):
        vec.step(rng.integers(0, 1, size=n))  # action 0 is always valid or falls back
    return (steps // n) * n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    for env_id in envs.ENV_IDS:
        steps = args.steps // 20 if env_id.endswith("Pools-v0") else args.steps
        print(
            f"{env_id}: {single(env_id, steps):,.0f} steps/s single, "
            f"{vector(env_id, steps):,.0f} steps/s in 8 synchronous copies (one core)"
        )
    workload = dict(WORKLOAD, num_requests=1000, rate_scale=13.0)
    rate = single("servegym/Route-v0", args.steps // 4, workload, **WINDOWS)
    print(f"servegym/Route-v0 counterfactual windows (the training recipe's episodes): {rate:,.0f} agent steps/s")


if __name__ == "__main__":
    main()
