"""Counterfactual windows branched from warm snapshots (``branches=K``): the same episodes as simulating
each from reset, workers cleaned up, usable in SB3's vector environments."""

import os

import numpy as np
import pytest
from envkit import synthetic
from servegym.envs.route_env import RouteEnv

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="branching needs os.fork")

CLUSTER = {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A100-80GB"}}]}
BUSY = synthetic(160, 50.0, {"kind": "lognormal", "prompt": 1500, "output": 150}, ttft_s=0.3, tpot_s=0.05)
WINDOW = {"reward": "relative", "warmup": 30, "horizon": 10, "drain": True, "max_instances": 4}
OPTIONS = {"workload_seed": 3, "sim_seed": 4, "load_factor": 1.1}


def _episode(env: RouteEnv, seed: int, options: dict | None = OPTIONS) -> list:
    rng = np.random.default_rng(seed)
    observation, info = env.reset(options=options)
    out, done = [observation], False
    while not done:
        observation, reward, terminated, truncated, info = env.step(int(rng.choice(np.flatnonzero(env.action_masks()))))
        out.append((observation, reward, terminated, truncated, info["sim_time"], info["slo_met"]))
        done = terminated or truncated
    return out


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1:], b[1:], strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        assert x[1:] == y[1:]


def test_branched_episodes_are_the_episodes_from_reset():
    plain = RouteEnv(cluster=CLUSTER, workload=BUSY, **WINDOW)
    branched = RouteEnv(cluster=CLUSTER, workload=BUSY, branches=3, **WINDOW)
    _same(_episode(branched, 0), _episode(plain, 0))
    pid = branched._worker.pid
    _same(_episode(branched, 1, options=None), _episode(plain, 1))  # the second branch of the snapshot
    assert branched.snapshot_stats["built"] == 1 and branched.snapshot_stats["episodes"] == 2
    with pytest.raises(ProcessLookupError):  # the first episode's worker was reaped at reset
        os.kill(pid, 0)
    assert branched.summary()["num_requests"] == plain.summary()["num_requests"]
    pid = branched._worker.pid
    branched.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_decided_drain_pays_the_agents_requests_the_same_and_stops_sooner():
    finished = _episode(RouteEnv(cluster=CLUSTER, workload=BUSY, **WINDOW), 2)
    decided = _episode(RouteEnv(cluster=CLUSTER, workload=BUSY, drain_until="decided", **WINDOW), 2)
    _same(finished[:-1], decided[:-1])
    assert decided[-1][4] <= finished[-1][4]


def test_hard_snapshots_and_sb3_vector_envs():
    from stable_baselines3.common.vec_env import DummyVecEnv

    def make():
        return RouteEnv(cluster=CLUSTER, workload=BUSY, branches=2, hard_snapshots=0.5, **WINDOW)

    vec = DummyVecEnv([make, make])
    vec.seed(0)
    vec.reset()
    weights = []
    for _ in range(12):
        masks = np.stack(vec.env_method("action_masks"))
        _, _, dones, infos = vec.step(masks.argmax(axis=1))
        weights += [info["snapshot_weight"] for info, done in zip(infos, dones, strict=True) if done]
    assert weights and set(weights) <= {1.0, 2.0}
    stats = vec.envs[0].unwrapped.snapshot_stats
    assert stats["built"] == stats["kept_hard"] + stats["kept_easy"] + stats["dropped"] >= 1
    pids = [env.unwrapped._worker.pid for env in vec.envs]
    vec.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
