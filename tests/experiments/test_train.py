"""The training entry point end to end on a tiny budget, and loading its run as a router."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from servegym.agents.harness import Task, run_task, saved_policy_spec
from servegym.agents.learned import ContractMismatch, LearnedRouter, SavedModel
from servegym.agents.rollout_distill import Labels
from servegym.envs.features import ENGINE_FEATURES

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_leaves_everything_evaluation_and_export_need(trained_run):
    out, attainment = trained_run
    assert 0.0 <= attainment <= 1.0
    for name in (
        "model.zip",
        "vecnormalize.pkl",
        "normalization.json",
        "manifest.json",
        "config.yaml",
        "comparison.csv",
        "evaluations.csv",
        "git_revision.txt",
    ):
        assert (out / name).exists(), name
    assert list((out / "checkpoints").glob("model_*_steps.zip"))
    assert (out / "best" / "model.zip").exists()  # the policy of the best periodic evaluation
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["algorithm"] == "MaskablePPO" and manifest["env_id"] == "servegym/Route-v0"
    assert manifest["profiles"] == ["default"]  # the performance-model profiles the training cluster used


def test_the_saved_run_routes_in_the_harness(trained_run):
    out, _ = trained_run
    workload = {
        "kind": "synthetic",
        "num_requests": 80,
        "arrivals": {"rate": 20.0},
        "lengths": {"kind": "fixed", "prompt": 400, "output": 30},
    }
    cluster = {"groups": [{"count": 2, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A100-80GB"}}]}
    row = run_task(Task("learned", "w", 0, 1.0), saved_policy_spec(out), workload, cluster)
    assert row["completed"] == 80


def test_a_policy_trained_on_another_contract_is_refused(trained_run, tmp_path):
    out, _ = trained_run
    for name in ("model.zip", "normalization.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["features"]["engine_features"][3]["scale"] = 128.0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractMismatch, match="another observation contract"):
        LearnedRouter(tmp_path)


TINY = [
    "imitation.expert=null",
    "total_timesteps=128",
    "n_envs=1",
    "agent.kwargs.n_steps=128",
    "agent.kwargs.batch_size=64",
    "eval_every=0",
    "checkpoint_every=0",
    "progress=false",
    "train_window.num_requests=100",
    "env.warmup=20",
    "env.horizon=32",
    "final_eval.seeds=[1000]",
    "final_eval.num_requests=100",
    "env.compare.baselines=[vllm_rr]",
    "final_eval.jobs=1",
]


def _train(*overrides: str, timeout: int = 300, multirun: bool = False) -> subprocess.CompletedProcess:
    """``experiments/train.py`` on the tiny budget with these overrides, wandb disabled."""
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments/train.py"), *(["-m"] if multirun else []), *TINY, *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def _multirun(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return _train(*overrides, timeout=timeout, multirun=True)


def test_readme_main_command_on_a_small_budget(tmp_path):
    """`make run` is `python experiments/train.py`: the residual router (PRISM at the start), one round of
    rollout distillation, RL, the comparison and the head-to-head table."""
    result = _train(
        "distill.iterations=1",
        "distill.episodes=1",
        "distill.label_every=16",
        "distill.decisions=4",
        "eval_every=128",
        "validation.seeds=[990]",
        "validation.num_requests=100",
        "validation.jobs=1",
        "env.compare.baselines=[vllm_rr,vllm_jsq]",
        "final_eval.seeds=[1000,1001]",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distill1: 2 states labelled" in result.stdout and "learned head to head" in result.stdout
    evaluations = pd.read_csv(tmp_path / "evaluations.csv")
    assert evaluations["stage"].tolist()[:2] == ["start", "distill1"]
    assert evaluations["selected"].iloc[0]  # the start is always in best/ first; later ones by min_gain
    assert len(Labels.load(tmp_path / "distill_labels.npz")) == 2  # the aggregate, for later runs' distill.labels
    duel = (tmp_path / "head_to_head.csv").read_text().splitlines()
    assert len(duel) == 3 and duel[1].split(",")[3] == "vllm_rr"  # the learned router against each baseline


def test_a_two_job_multirun_with_the_joblib_launcher(tmp_path):
    # final_eval.jobs=2: the comparison inside a joblib worker falls back to one process (a spawn pool there
    # failed with "cannot find context for 'loky'")
    result = _multirun("seed=0,1", "agent=ppo,maskable_ppo", "final_eval.jobs=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1", "2", "3"):
        assert (tmp_path / job / "model.zip").exists() and (tmp_path / job / "comparison.csv").exists()
    algorithms = {json.loads((tmp_path / j / "manifest.json").read_text())["algorithm"] for j in ("0", "1", "2", "3")}
    assert algorithms == {"PPO", "MaskablePPO"}
    # the sweep ends with one table of its jobs: overrides, best validation, final attainment, paired differences
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["job"]) == [0, 1, 2, 3] and (summary["status"] == "finished").all()
    assert summary["overrides"].str.contains("agent=maskable_ppo").sum() == 2
    finals = [float(pd.read_csv(tmp_path / j / "comparison.csv").set_index("policy").loc["learned", "slo_attainment"])
              for j in ("0", "1", "2", "3")]  # fmt: skip
    assert list(summary["slo_attainment"]) == finals and "sweep summary" in result.stdout
    # job 0 (seed 0, PPO) trained alone in this process's torch thread settings: the same weights
    alone = tmp_path / "alone"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments/train.py"), *TINY, "seed=0", "agent=ppo", f"hydra.run.dir={alone}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    swept, single = SavedModel(tmp_path / "0").model.policy.state_dict(), SavedModel(alone).model.policy.state_dict()
    assert all(np.array_equal(swept[k].numpy(), single[k].numpy()) for k in swept)


def test_validations_inside_a_sweep_worker_leave_training_alone(tmp_path):
    """In a sweep worker the validations run in the training process (no spawn pool there); what they draw
    from the global generators must not reach PPO: the residual router with validations trains the same
    weights as a one-job sweep and alone."""
    validated = [
        "agent=maskable_ppo_residual",
        "total_timesteps=256",
        "eval_every=128",
        "validation.seeds=[990]",
        "validation.num_requests=100",
        "validation.jobs=2",
    ]
    result = _multirun(*validated, f"hydra.sweep.dir={tmp_path}", timeout=900)  # ~40 s alone; slow when shared
    assert result.returncode == 0, result.stderr[-2000:]
    alone = tmp_path / "alone"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments/train.py"), *TINY, *validated, f"hydra.run.dir={alone}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(pd.read_csv(alone / "evaluations.csv")) == 3  # start, 128, 256: validations between updates
    swept, single = SavedModel(tmp_path / "0").model.policy.state_dict(), SavedModel(alone).model.policy.state_dict()
    assert all(np.array_equal(swept[k].numpy(), single[k].numpy()) for k in swept)


def test_an_optuna_search_maximises_the_returned_attainment(tmp_path):
    result = _multirun(
        "hydra/sweeper=optuna_search",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_params" in best and "agent.kwargs.learning_rate" in best


def test_cluster_launcher_configs_compose():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.cpus_per_task == 4


def test_the_default_agent_is_the_residual_router_validated_before_rl(trained_run):
    out, _ = trained_run
    router = LearnedRouter(out)
    assert type(router.model.policy).__name__ == "ResidualSlotPolicy"
    assert type(router.model.policy.action_net).__name__ == "TakeSlots"
    assert json.loads((out / "normalization.json").read_text())["norm_obs"] is False
    evaluations = (out / "evaluations.csv").read_text().splitlines()
    assert evaluations[1].startswith("start,0,")  # the untrained policy (PRISM) is a candidate for best/


def test_the_evolution_recipe_end_to_end(tmp_path):
    """`recipe=evolve_static`: the bonus's input gains from PRISM-routed episodes, two ES generations on
    whole windows, validation, the saved policy holding the searched weights and gains, and the comparison."""
    result = _train(
        "recipe=evolve_static",
        "scenario=multi-slo",
        "total_timesteps=0",
        "bonus_gain_episodes=1",
        "evolve.generations=2",
        "evolve.pairs=2",
        "evolve.num_requests=150",
        "evolve.jobs=1",
        "evolve.shortfall_weight=2.0",  # the per-load penalty: multi-slo's fitness windows are at two loads
        "eval_every=1",
        "validation.seeds=[990]",
        "validation.num_requests=150",
        "validation.jobs=1",
        "final_eval.seeds=[1000]",
        "final_eval.num_requests=150",
        "env.compare.baselines=[vllm_prism]",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # multi-slo's cluster: only prefill_capacity differs between H100 and A100 (kv_capacity is equal), times
    # the request features that vary in the episode (decode_phase never does) and the constant
    active = re.search(r"bilinear residual: input gains from 1 training episodes, (\d+) weights active", result.stdout)
    assert active and 2 <= int(active.group(1)) <= 6
    assert "evolve 2/2: current" in result.stdout and "evolve: largest weights prefill_capacity×" in result.stdout
    assert pd.read_csv(tmp_path / "evaluations.csv")["stage"].tolist() == ["start", "evolve"]
    extractor = SavedModel(tmp_path).model.policy.features_extractor
    names = [f.name for f in ENGINE_FEATURES]
    moved = np.flatnonzero(np.abs(extractor.bilinear.detach().numpy()).sum(axis=1))
    assert [names[j] for j in moved] == ["prefill_capacity"]  # the search moved the static descriptor only
    assert extractor.engine_gain[names.index("prefill_capacity")] > 0 and extractor.engine_gain.count_nonzero() == 1
    assert "learned head to head" in result.stdout


def test_wandb_keeps_figures_logged_at_an_earlier_stage_step(tmp_path):
    """Evolve logs by generation (1..12), then validation at 0 timesteps: wandb drops a record whose step went
    back, so the logger holds the step at the last one and every figure arrives."""
    from omegaconf import OmegaConf
    from servegym.experiments.train import log_figures, make_logger

    class Run:
        def __init__(self) -> None:
            self.logged: list[tuple[dict, int]] = []

        def log(self, scalars: dict, step: int) -> None:
            assert not self.logged or step >= self.logged[-1][1], "wandb would drop this record"
            self.logged.append((scalars, step))

    run = Run()
    logger = make_logger(OmegaConf.create({"logger": {"kind": "wandb"}}), tmp_path, run)
    log_figures(logger, {"evolve/current": 0.9}, 12)
    log_figures(logger, {"eval/learned": 0.95}, 0)
    log_figures(logger, {"rollout/ep_rew_mean": 1.0}, 2048)
    assert [(list(s), step) for s, step in run.logged] == [
        (["evolve/current"], 12),
        (["eval/learned"], 12),
        (["rollout/ep_rew_mean"], 2048),
    ]
