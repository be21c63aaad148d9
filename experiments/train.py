"""Train a router with stable-baselines3 on the default scenario, then compare it with the baselines.

    python experiments/train.py              # clone PRISM, then MaskablePPO for 20k steps; wandb offline
    python experiments/train.py agent=ppo imitation.expert=null total_timesteps=50000 logger=tensorboard
    python experiments/train.py -m seed=0,1,2 agent=ppo,maskable_ppo   # a sweep (joblib, 2 jobs)
    python experiments/train.py -m hydra/launcher=slurm ...   |   -m hydra/sweeper=optuna_search

The recipe (docs/training.md): behaviour cloning of an expert router (``imitation``), then RL on
counterfactual windows of ``servegym/Route-v0`` across loads, keeping the best validated policy.

The run directory holds the policy files and config of ``agents/run_dir.py`` (``model.zip``,
``vecnormalize.pkl``, ``normalization.json``, ``manifest.json``, ``config.yaml``), checkpoints,
``evaluations.csv`` (periodic, against the reference heuristic), ``best/`` (the policy with the best
periodic evaluation, the clone included: PPO can lose what it had), ``comparison.csv`` and
``head_to_head.csv`` (the final tables, for ``best/`` when periodic evaluation ran, else for the last
policy). The function returns the learned router's mean SLO attainment (the objective of an Optuna search).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import envs  # noqa: F401  (registers the ids in this process)
from agents.configs import named_configs
from agents.harness import Task, head_to_head, run_tasks, saved_policy_spec, summarise
from agents.learned import algorithm_class
from agents.reporting import print_head_to_head, print_tables
from agents.run_dir import save_config, save_run
from agents.user_errors import exit_on_user_error
from envs.sim.config import cluster_from


def env_kwargs(cfg: DictConfig) -> dict[str, Any]:
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    workload.update(OmegaConf.to_container(cfg.train_window, resolve=True))
    return {
        "cluster": OmegaConf.to_container(cfg.cluster, resolve=True),
        "workload": workload,
        "reward": cfg.env.reward,
        "horizon": cfg.env.horizon,
        "max_instances": cfg.env.max_instances,
        "load_range": list(cfg.env.load_range) if cfg.env.get("load_range") else None,
        "warmup": int(cfg.env.get("warmup", 0)),
        "drain": bool(cfg.env.get("drain", False)),
        "render_mode": None,
    }


def save_policy(model, vec_normalize, cfg: DictConfig, out_dir: Path) -> None:
    """The run-directory files of the current policy (``agents.run_dir.save_run``)."""
    profiles = cluster_from(OmegaConf.to_container(cfg.cluster, resolve=True)).profiles
    save_run(out_dir, model, vec_normalize, cfg.env.id, cfg.agent.algorithm, int(cfg.env.max_instances), profiles)


def compare(
    cfg: DictConfig,
    run_dir: Path,
    seeds: list[int],
    num_requests: int,
    policies: list[str],
    jobs: int,
    rate_scale: float | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """The learned router and the named baselines on the same held-out windows: the summary table (paired
    against the first baseline) and the per-run rows."""
    specs = named_configs("policy", policies)
    specs["learned"] = saved_policy_spec(run_dir)
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    workload.update({"num_requests": num_requests, "random_window": True})
    if rate_scale is not None:
        workload["rate_scale"] = rate_scale
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    name = f"{workload.get('name', 'workload')} x{workload.get('rate_scale', 1.0):g}"
    tasks = [Task(p, name, s, 1.0) for p in specs for s in seeds]
    rows = run_tasks(tasks, specs, {name: workload}, cluster, jobs=jobs, progress=False)
    return summarise(rows, reference=policies[0] if policies else None), rows


def warm_start(model, vec_normalize, cfg: DictConfig, logger) -> dict[str, float]:
    """Behaviour-clone the configured expert router into the policy (agents/imitation.py)."""
    from agents.imitation import collect_demonstrations, pretrain

    imitation = cfg.imitation
    expert = named_configs("policy", [imitation.expert])[imitation.expert]["router"]
    demos = collect_demonstrations(
        f"envs:{cfg.env.id}", env_kwargs(cfg), expert, int(imitation.episodes), int(cfg.seed) + 1_000_000
    )
    figures = pretrain(
        model,
        vec_normalize,
        demos,
        epochs=int(imitation.epochs),
        batch_size=int(imitation.batch_size),
        learning_rate=float(imitation.learning_rate),
        seed=int(cfg.seed),
        temperature=float(imitation.temperature),
    )
    print(
        f"imitation of {imitation.expert}: {len(demos)} decisions, agreement {figures['train_agreement']:.1%} "
        f"(held-out {figures['holdout_agreement']:.1%})"
    )
    if imitation.freeze_normalizer:
        vec_normalize.training = False  # keep the input scale the clone was fitted on
    if logger is not None:
        logger.log({f"imitation/{k}": v for k, v in figures.items()}, step=0)
    return figures


def make_logger(cfg: DictConfig, out_dir: Path):
    if cfg.logger.kind != "wandb":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    return wandb.init(
        project=cfg.logger.project,
        mode=mode,
        dir=str(out_dir),
        reinit="finish_previous",
        config=OmegaConf.to_container(cfg, resolve=True),
        name=out_dir.name,
    )


def run(cfg: DictConfig, out_dir: Path) -> float:
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    save_config(out_dir, cfg)
    logger = make_logger(cfg, out_dir)
    vec = make_vec_env(
        f"envs:{cfg.env.id}",
        n_envs=int(cfg.n_envs),
        seed=int(cfg.seed),
        vec_env_cls=DummyVecEnv,
        env_kwargs=env_kwargs(cfg),
    )
    vec = VecNormalize(vec, norm_obs=True, norm_reward=True, clip_obs=10.0)
    algorithm = algorithm_class(cfg.agent.algorithm)
    extra = {"tensorboard_log": str(out_dir / "tensorboard")} if cfg.logger.kind == "tensorboard" else {}
    policy = cfg.agent.policy
    if "." in policy:  # a policy class by import path, e.g. agents.slot_policy.SlotPolicy
        module, _, name = policy.rpartition(".")
        policy = getattr(__import__(module, fromlist=[name]), name)
    model = algorithm(
        policy,
        vec,
        seed=int(cfg.seed),
        verbose=0,
        device="cpu",
        **OmegaConf.to_container(cfg.agent.kwargs, resolve=True),
        **extra,
    )
    if cfg.imitation.expert:
        warm_start(model, vec, cfg, logger)
    evaluations: list[dict[str, Any]] = []

    class PeriodicEvaluation(BaseCallback):
        """Save the current policy and compare it with the reference heuristic on fixed validation windows
        (the policy before training too, so an imitation warm start is among the candidates for best/)."""

        def _on_training_start(self) -> None:
            if int(cfg.eval_every):
                self._evaluate()

        def _on_step(self) -> bool:
            every = int(cfg.eval_every)
            if every and self.num_timesteps % every < int(cfg.n_envs):
                self._evaluate()
            return True

        def _evaluate(self) -> None:
            probe = out_dir / "probe"
            probe.mkdir(exist_ok=True)
            save_policy(self.model, self.model.get_env(), cfg, probe)
            validation = cfg.validation
            row: dict[str, Any] = {"timesteps": self.num_timesteps}
            for scale in validation.rate_scales:
                first = not evaluations  # the reference's figures do not change: measure them once
                table, _ = compare(
                    cfg,
                    probe,
                    list(validation.seeds),
                    int(validation.num_requests),
                    [cfg.reference] if first else [],
                    int(validation.jobs),
                    scale,
                )
                table = table.set_index("policy")
                row[f"learned_x{scale:g}"] = table.loc["learned", "slo_attainment"]
                reference = f"{cfg.reference}_x{scale:g}"
                row[reference] = table.loc[cfg.reference, "slo_attainment"] if first else evaluations[0][reference]
            row["learned"] = float(np.mean([row[f"learned_x{s:g}"] for s in validation.rate_scales]))
            evaluations.append(row)
            print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "timesteps"))
            if row["learned"] > max((e["learned"] for e in evaluations[:-1]), default=-1.0):
                shutil.copytree(probe, out_dir / "best", dirs_exist_ok=True)  # PPO can collapse later
            if logger is not None:
                logger.log({f"eval/{k}": v for k, v in row.items()}, step=self.num_timesteps)

    callbacks = [PeriodicEvaluation()]
    if int(cfg.checkpoint_every):
        callbacks.append(
            CheckpointCallback(
                max(1, int(cfg.checkpoint_every) // int(cfg.n_envs)),
                str(out_dir / "checkpoints"),
                name_prefix="model",
                save_vecnormalize=True,
            )
        )
    model.learn(
        total_timesteps=int(cfg.total_timesteps), callback=CallbackList(callbacks), progress_bar=bool(cfg.progress)
    )
    save_policy(model, vec, cfg, out_dir)
    if evaluations:
        import pandas as pd

        pd.DataFrame(evaluations).to_csv(out_dir / "evaluations.csv", index=False)
    final = cfg.final_eval
    chosen = out_dir / "best" if (out_dir / "best").exists() else out_dir  # the best periodic policy, if any
    table, rows = compare(
        cfg,
        chosen,
        list(final.seeds),
        int(final.num_requests),
        list(final.policies),
        int(final.jobs),
        float(final.rate_scale),
    )
    table.to_csv(out_dir / "comparison.csv", index=False)
    duel = head_to_head(rows, "learned")
    duel.to_csv(out_dir / "head_to_head.csv", index=False)
    print_tables(table, next(iter(final.policies)) if final.policies else None)
    print_head_to_head(duel)
    learned = float(table.set_index("policy").loc["learned", "slo_attainment"])
    if logger is not None:
        logger.log(
            {
                "final/learned_slo_attainment": learned,
                **{f"final/{p}": float(v) for p, v in zip(table["policy"], table["slo_attainment"], strict=True)},
            }
        )
        logger.finish()
    print(f"run: {out_dir}")
    return learned


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
