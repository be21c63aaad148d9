"""Batching and pool policies through the one training path: train.py env=batch / env=pools end to end on
tiny budgets, their runs and exports as simulator policies of their own kind (identical to the environment
that trained them), refused in one line as another kind, exported with parity, resumed."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from hydra import compose, initialize_config_dir
from servegym.agents.exported import export_run, parity
from servegym.agents.harness import Task, load_policy, run_task, saved_policy_spec
from servegym.agents.learned import KindMismatch, LearnedBatcher, LearnedPools, LearnedRouter, SavedModel
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from, workload_from
from servegym.experiments.export import recorded_observations
from servegym.experiments.export import run as export_command
from servegym.experiments.train import run as train

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "total_timesteps=128",
    "n_envs=1",
    "agent.kwargs.n_steps=64",
    "agent.kwargs.batch_size=32",
    "eval_every=0",
    "checkpoint_every=64",
    "progress=false",
    "train_window.num_requests=150",
    "env.windows=1",
    "final_eval.seeds=[1000]",
    "final_eval.num_requests=150",
    "final_eval.jobs=1",
]
KINDS = {
    # Batch-v0 on a synthetic workload, logged to tensorboard
    "batch": ["env=batch", "env.warmup_s=1.0", "env.horizon_s=0.1", "workload=poisson", "logger=tensorboard"],
    "pools": ["env=pools", "env.warmup_s=1.0", "env.horizon_s=4.0", "logger=none"],
}
SMALL = {
    "kind": "synthetic",
    "num_requests": 120,
    "arrivals": {"rate": 40.0},
    "lengths": {"kind": "lognormal", "prompt": 800, "output": 100},
    "slo": [{"name": "chat", "ttft_s": 1.0, "tpot_s": 0.05}],
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module", params=list(KINDS))
def kind_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = _compose(*KINDS[request.param])
    return request.param, cfg, out, train(cfg, out)


def test_a_run_of_each_kind_compares_with_its_own_baselines(kind_run):
    kind, cfg, out, attainment = kind_run
    assert 0.0 <= attainment <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["env_id"] == {"batch": "servegym/Batch-v0", "pools": "servegym/Pools-v0"}[kind]
    assert manifest["algorithm"] == {"batch": "PPO", "pools": "MaskablePPO"}[kind]
    policies = set(pd.read_csv(out / "comparison.csv")["policy"])
    assert policies == {*cfg.env.compare.baselines, "learned"}
    assert {"lens_lor", "larry_lor"} <= policies if kind == "batch" else {"arrow_pools_lor", "planner_lor"} <= policies


def test_sb3_metrics_and_episode_returns_reach_tensorboard(kind_run):
    kind, _, out, _ = kind_run
    if kind != "batch":
        pytest.skip("the batch run is the one logged to tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").glob("events.*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/entropy_loss", "train/value_loss", "train/explained_variance", "rollout/ep_rew_mean"} <= tags
    assert "final/learned_slo_attainment" in tags


def test_a_policy_of_another_kind_is_refused_in_one_line(kind_run):
    kind, _, out, _ = kind_run
    with pytest.raises(KindMismatch, match=r"cannot be used as a router policy") as caught:
        LearnedRouter(out)
    assert "\n" not in str(caught.value)
    with pytest.raises(KindMismatch, match=r"as the bundle's " + kind):
        saved_policy_spec(out, expect="router")
    other = LearnedPools if kind == "batch" else LearnedBatcher
    with pytest.raises(KindMismatch):
        other(out)


def _env_episode(cfg, out, kind):
    """The saved policy acting in the environment it trained in, on a fixed small workload: the summary."""
    saved = SavedModel(out)
    cluster = dict(cfg.cluster)
    env = gym.make(cfg.env.id, cluster=cluster, workload=SMALL, max_instances=8).unwrapped
    observation, _ = env.reset(seed=0, options={"workload_seed": 3, "sim_seed": 3})
    while True:
        action = int(saved.act(observation, env.action_masks()).item())
        observation, _, terminated, _, info = env.step(action)
        if terminated:
            return info["summary"], cluster


def test_the_saved_policy_in_the_simulator_decides_as_in_its_environment(kind_run):
    kind, cfg, out, _ = kind_run
    summary, cluster = _env_episode(cfg, out, kind)
    bundle = load_policy(saved_policy_spec(out))
    assert type(getattr(bundle, kind)).__name__ == {"batch": "LearnedBatcher", "pools": "LearnedPools"}[kind]
    sim = Cluster(cluster_from(cluster), bundle.router, batch_policy=bundle.batch, seed=3, pool_policy=bundle.pools)
    inline = sim.run(workload_from(SMALL).generate(3)).summary()
    for key in ("completed", "slo_attainment", "ttft_p99_s", "tpot_p99_s", "e2e_p50_s"):
        assert inline[key] == pytest.approx(summary[key], rel=1e-9), key


def test_the_export_of_each_kind_matches_the_run(kind_run, tmp_path):
    _, cfg, out, _ = kind_run
    export = export_run(out, tmp_path / "export")
    observations, masks = recorded_observations(out, 64, seed=1)
    report = parity(out, export, observations, masks)
    assert report["action_agreement"] == 1.0 and report["max_logit_difference"] < 1e-4
    manifest = json.loads((export / "policy.json").read_text())
    assert manifest["env_id"] == cfg.env.id and manifest["outputs"]["action"]["meaning"] == manifest["action"]
    rows = [
        run_task(Task(name, "w", 2, 1.0), saved_policy_spec(path), SMALL, dict(cfg.cluster))
        for name, path in (("run", out), ("export", export))
    ]
    assert rows[0]["slo_attainment"] == rows[1]["slo_attainment"] and rows[0]["ttft_p99_s"] == rows[1]["ttft_p99_s"]


def test_a_failed_export_leaves_nothing_behind(kind_run, tmp_path):
    _, _, out, _ = kind_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.zip", "normalization.json", "manifest.json"):  # no config.yaml: the check cannot run
        (run / name).write_bytes((out / name).read_bytes())
    cfg = compose_export(run)
    with pytest.raises(Exception, match=r"config\.yaml"):
        export_command(cfg)
    assert not (run / "export").exists()


def compose_export(run: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("export", overrides=[f"run={run}", "check.decisions=16"])


def test_a_run_resumes_from_its_checkpoint(kind_run, tmp_path):
    kind, _, out, _ = kind_run
    if kind != "pools":
        pytest.skip("one kind is enough")
    (checkpoint,) = sorted((out / "checkpoints").glob("model_64_steps.zip"))
    cfg = _compose(*KINDS[kind], f"resume={checkpoint}", "total_timesteps=64")
    train(cfg, tmp_path)
    before = SavedModel(out).model.policy.state_dict()
    resumed = SavedModel(tmp_path)
    assert resumed.model.num_timesteps == 128  # 64 from the checkpoint, 64 more
    assert any(not np.array_equal(before[k].numpy(), v.numpy()) for k, v in resumed.model.policy.state_dict().items())


def test_a_continuous_budget_policy_exports_and_batches_as_its_run(tmp_path):
    """Batch-v0 with continuous budgets (PPO's Gaussian): the graph gives SB3's deterministic action, and
    the export batches in the simulator exactly as the run it came from."""
    cfg = _compose(*KINDS["batch"][:-1], "logger=none", "+env.continuous=true", "env.compare.baselines=[vllm_lor]")
    out = tmp_path / "run"
    train(cfg, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["continuous"] is True
    export = export_run(out, tmp_path / "export")
    observations, masks = recorded_observations(out, 64, seed=1)
    report = parity(out, export, observations, masks)
    assert report["action_agreement"] == 1.0 and report["max_logit_difference"] < 1e-4
    exported = json.loads((export / "policy.json").read_text())
    assert exported["continuous"] is True and exported["outputs"]["action"]["dtype"] == "float32"
    rows = [
        run_task(Task(name, "w", 2, 1.0), saved_policy_spec(path), SMALL, dict(cfg.cluster))
        for name, path in (("run", out), ("export", export))
    ]
    assert rows[0]["slo_attainment"] == rows[1]["slo_attainment"] and rows[0]["ttft_p99_s"] == rows[1]["ttft_p99_s"]
