"""Train a router, batcher or pool policy with stable-baselines3, then compare it with its kind's baselines.

    python experiments/train.py              # clone PRISM, then MaskablePPO for 20k steps; wandb offline
    python experiments/train.py env=batch    # Batch-v0 token budgets (PPO) vs vLLM, Sarathi, LENS, LARRY
    python experiments/train.py env=pools    # Pools-v0 flips on pd_h100 (MaskablePPO) vs static, Arrow, planner
    python experiments/train.py agent=ppo imitation.expert=null total_timesteps=50000 logger=tensorboard
    python experiments/train.py resume=outputs/train/RUN total_timesteps=10000   # continue a run's policy
    python experiments/train.py scenario=long-context   # a scenario's cluster, workload, seeds, loads (conf/scenario)
    python experiments/train.py -m seed=0,1,2 agent=ppo,maskable_ppo   # a sweep (joblib, 2 jobs)
    python experiments/train.py -m hydra/launcher=slurm ...   |   -m hydra/sweeper=optuna_search

The recipe (docs/training.md): for routing, behaviour cloning of an expert router (``imitation``), then RL
on counterfactual windows of ``servegym/Route-v0`` across loads, keeping the best validated policy. The
environment group (``conf/env/{route,batch,pools}.yaml``) holds the environment's arguments and, under
``compare``, what the policy is validated and compared with; batching and pools go through the same path.

The run directory holds the policy files and config of ``agents/run_dir.py`` (``model.zip``,
``vecnormalize.pkl``, ``normalization.json``, ``manifest.json``, ``config.yaml``), checkpoints,
``evaluations.csv`` (periodic, against the reference heuristic), ``best/`` (the policy with the best
periodic evaluation, the clone included: PPO can lose what it had), ``comparison.csv`` and
``head_to_head.csv`` (the final tables, for ``best/`` when periodic evaluation ran, else for the last
policy). The function returns the learned policy's mean SLO attainment (the objective of an Optuna search).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import servegym.envs as envs  # noqa: F401  (registers the ids in this process)
from omegaconf import DictConfig, OmegaConf, open_dict
from servegym.agents.configs import ConfigError, is_trace, named_configs
from servegym.agents.harness import Task, head_to_head, run_tasks, saved_policy_spec, summarise
from servegym.agents.learned import algorithm_class
from servegym.agents.reporting import print_head_to_head, print_tables
from servegym.agents.run_dir import env_kwargs, save_config, save_run, windowed
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs.sim.config import cluster_from


def apply_scenario(cfg: DictConfig) -> None:
    """``scenario=NAME``: the scenario's cluster, workload (at its training load; ``env.load_range``
    multiplies it), windows, validation and test seeds, loads, reference and baselines for the kind of
    ``env`` (conf/scenario; servegym.envs.scenarios). Without one, nothing changes."""
    from servegym.envs import scenarios

    scenario = scenarios.from_config(cfg)
    if scenario is None:
        return
    kind = next((k for k, stem in scenarios.KINDS.items() if cfg.env.id == f"servegym/{stem}-v0"), None)
    if kind not in scenario.decisions:
        raise scenarios.ScenarioError(f"scenario {scenario.name} poses {', '.join(scenario.kinds)}, not {cfg.env.id}")
    loads, decision = scenario.loads, scenario.decisions[kind]
    if scenario.is_trace:  # compare() sets a trace's rate_scale itself
        base = float(scenario.workload.get("rate_scale", 1.0))
        final, validation = base * loads["test"], [base * v for v in loads["validation"]]
    elif loads["train"] != loads["test"]:  # compare() scales other workloads relative to the training rate
        raise scenarios.ScenarioError(f"scenario {scenario.name}: a non-trace workload trains at its test load")
    else:
        final, validation = loads["test"], list(loads["validation"])
    with open_dict(cfg):
        cfg.cluster = scenario.cluster
        cfg.workload = scenarios.scaled(scenario.workload, loads["train"])
        cfg.train_window.num_requests = scenario.windows["train"]
        cfg.validation.seeds = list(scenario.seeds["validation"])
        cfg.final_eval.seeds = list(scenario.seeds["test"])
        cfg.final_eval.num_requests = scenario.windows["test"]
        cfg.env.compare.rate_scale = final
        cfg.env.compare.validation_rate_scales = validation or [final]
        cfg.env.compare.reference = decision.reference
        cfg.env.compare.baselines = list(decision.baselines)


def save_policy(model, vec_normalize, cfg: DictConfig, out_dir: Path) -> None:
    """The run-directory files of the current policy (``servegym.agents.run_dir.save_run``), with the
    environment's own statement of what an action means."""
    profiles = cluster_from(OmegaConf.to_container(cfg.cluster, resolve=True)).profiles
    action = vec_normalize.env_method("action_manifest", indices=[0])[0]
    save_run(
        out_dir, model, vec_normalize, cfg.env.id, cfg.agent.algorithm, int(cfg.env.max_instances), profiles, action
    )


def windows_at(cfg: DictConfig, num_requests: int, rate_scale: float | None) -> tuple[dict[str, Any], float, str]:
    """The run's workload as random windows of ``num_requests`` at a trace's replay speed ``rate_scale`` (a
    synthetic workload: its rate times ``rate_scale / env.compare.rate_scale``): (workload, load, name)."""
    workload = windowed(
        OmegaConf.to_container(cfg.workload, resolve=True), {"num_requests": num_requests, "random_window": True}
    )
    load = 1.0
    if rate_scale is not None and is_trace(workload):
        workload["rate_scale"] = rate_scale
    elif rate_scale is not None:
        load = rate_scale / float(cfg.env.compare.rate_scale)
    scale = workload["rate_scale"] if is_trace(workload) else load
    return workload, load, f"{workload.get('name', 'workload')} x{scale:g}"


def compare(
    cfg: DictConfig,
    run_dir: Path,
    seeds: list[int],
    num_requests: int,
    policies: list[str],
    jobs: int,
    rate_scale: float | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """The learned policy and the named baselines on the same held-out windows: the summary table (paired
    against the first baseline) and the per-run rows. ``rate_scale`` is a trace's replay speed; a
    synthetic workload's rate is multiplied by ``rate_scale / env.compare.rate_scale`` instead (its own
    rate at the final comparison's scale), so validation loads keep their ratio for every workload."""
    specs = named_configs("policy", policies)
    specs["learned"] = saved_policy_spec(run_dir)
    workload, load, name = windows_at(cfg, num_requests, rate_scale)
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    tasks = [Task(p, name, s, load) for p in specs for s in seeds]
    rows = run_tasks(tasks, specs, {name: workload}, cluster, jobs=jobs, progress=False)
    return summarise(rows, reference=policies[0] if policies else None), rows


def warm_start(model, vec_normalize, cfg: DictConfig, logger) -> dict[str, float]:
    """Behaviour-clone the configured expert router into the policy (agents/imitation.py)."""
    from servegym.agents.imitation import collect_demonstrations, pretrain

    imitation = cfg.imitation
    if not cfg.env.id.endswith("Route-v0"):
        raise ConfigError(
            f"imitation clones routers; {cfg.env.id} is not a routing environment (imitation.expert=null)"
        )
    expert = named_configs("policy", [imitation.expert])[imitation.expert]["router"]
    demos = collect_demonstrations(
        f"servegym:{cfg.env.id}", env_kwargs(cfg), expert, int(imitation.episodes), int(cfg.seed) + 1_000_000
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
    log_figures(logger, {f"imitation/{k}": v for k, v in figures.items()}, step=0)
    return figures


def load_labels(cfg: DictConfig, model):
    """``distill.labels``, checked against the environment's observation and action widths (None if unset)."""
    from servegym.agents.rollout_distill import Labels

    path = cfg.distill.get("labels")
    if not path:
        return None
    try:
        labels = Labels.load(Path(path))
    except ValueError as error:
        raise ConfigError(f"distill.labels: {error}") from None
    size, slots = model.observation_space.shape[0], model.action_space.n
    if labels.observations.shape[1] != size or labels.masks.shape[1] != slots:
        raise ConfigError(
            f"distill.labels: {path} holds {labels.observations.shape[1]}-wide observations over "
            f"{labels.masks.shape[1]} engines; this environment has {size} and {slots}"
        )
    return labels


def distill(model, cfg: DictConfig, out_dir: Path, labels, logger, validate) -> None:
    """Rollout distillation (agents/rollout_distill.py): per iteration, roll in with the current policy, label
    every ``label_every``-th decision with each engine's branched outcome under the base heuristic, add the
    labels to the earlier ones and refit the actor; validate after each refit. ``labels`` (:func:`load_labels`:
    an earlier run's ``distill_labels.npz``) start the aggregate, fitted once before the first iteration; the
    aggregate is saved to this run's ``distill_labels.npz`` after each refit."""
    import gymnasium as gym
    from servegym.agents.rollout_distill import collect, fit, gain

    settings = cfg.distill
    if not cfg.env.id.endswith("Route-v0"):
        raise ConfigError(f"distill labels routing decisions; {cfg.env.id} is not a routing environment")

    def refit(stage: str, fresh, held_out: float | None, iteration: int) -> None:
        figures = fit(
            model.policy,
            labels,
            epochs=int(settings.epochs),
            learning_rate=float(settings.learning_rate),
            kl_coef=float(settings.kl_coef),
            seed=int(cfg.seed) + iteration + 1,
            loss=str(settings.loss),
            target_temperature=float(settings.target_temperature),
        )
        labels.save(out_dir / "distill_labels.npz")
        if fresh is None:
            figures["informative"] = float(labels.informative().mean())
            print(f"{stage}: fit on {len(labels)} loaded states ({figures['informative']:.0%} informative): ", end="")
        else:
            figures.update(held_out_gain=held_out, informative=float(fresh.informative().mean()))
            print(
                f"{stage}: {len(fresh)} states labelled ({figures['informative']:.0%} informative), "
                f"gain on fresh states before refit {held_out:+.3f} req/state, fit on {len(labels)}: ",
                end="",
            )
        print(f"{figures['gain_before']:+.3f} -> {figures['gain_after']:+.3f}")
        log_figures(logger, {f"distill/{k}": v for k, v in figures.items()}, iteration + 1)
        if validate is not None:
            validate(stage)

    if labels is not None:
        refit("distill0", None, None, -1)
    env = gym.make(cfg.env.id, **env_kwargs(cfg)).unwrapped
    act = greedy(model)
    for iteration in range(int(settings.iterations)):
        seed = int(cfg.seed) * 1_000 + 2_000_000 + iteration * int(settings.episodes)  # never a validation seed
        fresh = collect(
            env, act, int(settings.episodes), seed, int(settings.label_every), settings.decisions, settings.jobs
        )
        held_out = gain(model.policy, fresh)  # the current policy on states it has not been fitted on
        labels = fresh if labels is None else labels + fresh
        refit(f"distill{iteration + 1}", fresh, held_out, iteration)
    env.close()


def greedy(model):
    """The model's deterministic choice as an ``act(observation, mask) -> action`` function."""

    def act(observation: np.ndarray, mask: np.ndarray) -> int:
        return int(model.predict(observation, deterministic=True, action_masks=mask)[0])

    return act


def routed_observations(model, cfg: DictConfig, episodes: int) -> np.ndarray:
    """The observations of the policy's own decisions on ``episodes`` training episodes (seeds apart from
    every other stage's)."""
    import gymnasium as gym
    from servegym.agents.rollout_distill import roll_in

    env = gym.make(cfg.env.id, **env_kwargs(cfg)).unwrapped
    seed = int(cfg.seed) * 1_000 + 4_000_000
    seen = [obs.copy() for _, obs, _, _ in roll_in(env, greedy(model), episodes, seed)]
    env.close()
    return np.stack(seen)


def largest_weights(bilinear: np.ndarray, count: int) -> list[tuple[str, float]]:
    """The ``count`` largest bilinear weights by magnitude, named ``engine feature × request feature``."""
    from servegym.envs.features import ENGINE_FEATURES, REQUEST_FEATURES

    columns = [f.name for f in REQUEST_FEATURES] + ["1"]
    order = np.argsort(-np.abs(bilinear), axis=None, kind="stable")[:count]
    rows, cols = np.unravel_index(order, bilinear.shape)
    return [(f"{ENGINE_FEATURES[i].name}×{columns[j]}", float(bilinear[i, j])) for i, j in zip(rows, cols, strict=True)]


def evolve(model, cfg: DictConfig, logger, validate) -> None:
    """Evolution strategies on the bilinear residual (agents/evolution.py): candidates route whole windows at
    the validation loads (other windows than validation's), the bonus follows the fitness; validate after."""
    import torch
    from servegym.agents.evolution import Evolution, window_fitness
    from servegym.agents.harness import worker_pool

    settings = cfg.evolve
    extractor = model.policy.features_extractor
    if getattr(extractor, "kind", None) != "bilinear":
        raise ConfigError(
            "evolve searches the bilinear residual: use agent=maskable_ppo_residual with "
            "agent.kwargs.policy_kwargs.features_extractor_kwargs.residual=bilinear"
        )
    base = OmegaConf.to_container(cfg.agent.kwargs.policy_kwargs.features_extractor_kwargs, resolve=True)
    scales = list(settings.rate_scales or cfg.env.compare.validation_rate_scales)
    windows = [windows_at(cfg, int(settings.num_requests), float(scale))[:2] for scale in scales]
    search = Evolution(
        tuple(extractor.bilinear.shape),
        pairs=int(settings.pairs),
        sigma=float(settings.sigma),
        learning_rate=float(settings.learning_rate),
        seed=int(cfg.seed),
    )
    base.update(
        engine_gain=extractor.engine_gain.tolist(),
        request_gain=extractor.request_gain.tolist(),
        request_offset=extractor.request_offset.tolist(),
        bonus_clip=extractor.bonus_clip,
    )
    search.active = extractor.active_weights()
    start = extractor.bilinear.detach().numpy().copy()
    gains: list[float] = []
    with worker_pool(int(settings.jobs)) as pool:
        fitness = window_fitness(
            windows,
            OmegaConf.to_container(cfg.cluster, resolve=True),
            base,
            int(cfg.env.max_instances),
            int(settings.windows),
            int(cfg.seed) * 1_000 + 3_000_000,  # never a validation or final-evaluation seed
            pool,
            float(settings.shortfall_weight),
        )

        def logged(candidates, generation):
            # PRISM (no bonus) on the generation's windows too: the current bonus's gain is then a paired figure
            # (of the fitness: with evolve.shortfall_weight, net of the penalty, which PRISM never pays)
            *values, prism = fitness([*candidates, np.zeros_like(candidates[0])], generation)
            values = np.asarray(values)
            gains.append(values[-1] - prism)
            print(
                f"evolve {generation + 1}/{int(settings.generations)}: current {values[-1]:.4f} "
                f"({gains[-1]:+.4f} over PRISM), candidates {values[:-1].mean():.4f} (best {values[:-1].max():.4f})"
            )
            return values

        theta = search.run(logged, int(settings.generations), start)
    with torch.no_grad():
        extractor.bilinear.copy_(torch.as_tensor(theta, dtype=torch.float64))
    print("evolve: largest weights " + ", ".join(f"{name} {w:+.2f}" for name, w in largest_weights(theta, 6)))
    for row, gain in zip(search.history, gains, strict=True):
        figures = {f"evolve/{k}": v for k, v in row.items() if k != "generation"}
        log_figures(logger, {**figures, "evolve/current_minus_prism": gain}, row["generation"])
    if validate is not None:
        validate("evolve")


def _is_label(key: str) -> bool:
    return key in ("stage", "timesteps", "selected")


def make_wandb(cfg: DictConfig, out_dir: Path):
    """The wandb run (offline unless configured; WANDB_MODE wins), or None for other loggers."""
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


def make_logger(cfg: DictConfig, out_dir: Path, wandb_run: Any):
    """One SB3 logger for everything a run reports — SB3's own losses, entropy, explained variance and
    episode returns (``rollout/ep_rew_mean``, from the Monitor wrapper) as well as imitation, validation
    and final figures — written to tensorboard (``logger=tensorboard``, the ``tensorboard`` extra) or wandb."""
    from stable_baselines3.common.logger import KVWriter, Logger, TensorBoardOutputFormat

    class WandbOutputFormat(KVWriter):
        """SB3's key-values as wandb scalars, at SB3's step — never below the last one logged: the stages
        count steps differently (evolve and distill by generation, then validation at 0 timesteps), and wandb
        drops a record whose step went back."""

        last_step = 0

        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            scalars = {k: float(v) for k, v in key_values.items() if isinstance(v, int | float | np.number)}
            self.last_step = max(self.last_step, int(step))
            wandb_run.log(scalars, step=self.last_step)

        def close(self) -> None:
            """The wandb run is finished by ``run`` after the last figures."""

    formats: list[Any] = []
    if cfg.logger.kind == "tensorboard":
        try:
            formats.append(TensorBoardOutputFormat(str(out_dir / "tensorboard")))
        except (ImportError, AssertionError):  # SB3 asserts that tensorboard imports
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
            ) from None
    if wandb_run is not None:
        formats.append(WandbOutputFormat())
    return Logger(folder=str(out_dir), output_formats=formats)


def log_figures(logger, figures: dict[str, float], step: int) -> None:
    for key, value in figures.items():
        logger.record(key, float(value))
    logger.dump(step)


def resume_paths(path: Path) -> tuple[Path, Path]:
    """The model and the SB3 normaliser to resume from: a run directory (or its ``best/``) or one of its
    checkpoints (``checkpoints/model_N_steps.zip``, whose normaliser lies beside it)."""
    if path.is_file() and path.suffix == ".zip":
        norm = path.with_name(path.name.replace("model_", "model_vecnormalize_", 1)).with_suffix(".pkl")
        model = path
    else:
        model, norm = path / "model.zip", path / "vecnormalize.pkl"
    for needed in (model, norm):
        if not needed.exists():
            raise FileNotFoundError(f"resume={path}: no {needed.name} (a run directory or a checkpoint .zip)")
    return model, norm


def run(cfg: DictConfig, out_dir: Path) -> float:
    import torch
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    # joblib's workers run torch with OMP_NUM_THREADS=1 and a lone run with every core: reductions then differ
    # in the last bits and the same seed trains other weights; one explicit count makes them agree
    torch.set_num_threads(int(cfg.torch_threads))
    apply_scenario(cfg)
    if cfg.imitation.expert:  # a bad name fails now, also where the agent does not clone (clone: false)
        named_configs("policy", [cfg.imitation.expert])
    if not float(cfg.evolve.shortfall_weight) >= 0:  # now, not after the bonus's gain episodes
        raise ConfigError(f"evolve.shortfall_weight must be >= 0, got {cfg.evolve.shortfall_weight!r}")
    save_config(out_dir, cfg)
    wandb_run = make_wandb(cfg, out_dir)
    logger = make_logger(cfg, out_dir, wandb_run)
    vec_classes = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}
    if cfg.vec_env not in vec_classes:
        raise ConfigError(f"vec_env must be one of {sorted(vec_classes)}, got {cfg.vec_env!r}")
    vec = make_vec_env(
        f"servegym:{cfg.env.id}",
        n_envs=int(cfg.n_envs),
        seed=int(cfg.seed),
        vec_env_cls=vec_classes[cfg.vec_env],
        env_kwargs=env_kwargs(cfg),
    )
    algorithm = algorithm_class(cfg.agent.algorithm)
    if cfg.get("resume"):
        model_file, norm_file = resume_paths(Path(cfg.resume))
        vec = VecNormalize.load(str(norm_file), vec)
        model = algorithm.load(model_file, env=vec, device="cpu")
        print(f"resumed from {model_file} at {model.num_timesteps} timesteps")
    else:
        normalize_obs = bool(cfg.agent.get("normalize_obs", True))  # false: the policy reads the contract's scale
        vec = VecNormalize(vec, norm_obs=normalize_obs, norm_reward=True, clip_obs=10.0)
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
        )
    model.set_logger(logger)
    extractor = getattr(model.policy, "features_extractor", None)
    if getattr(extractor, "kind", None) == "bilinear" and not cfg.get("resume"):
        episodes = int(cfg.bonus_gain_episodes)  # the untrained policy is PRISM: PRISM-routed states
        active = extractor.set_bonus_gains(routed_observations(model, cfg, episodes))
        print(f"bilinear residual: input gains from {episodes} training episodes, {int(active.sum())} weights active")
    labels = load_labels(cfg, model)  # before minutes of validation, so that a bad file fails at once
    if cfg.imitation.expert and not cfg.get("resume") and cfg.agent.get("clone", True):
        warm_start(model, vec, cfg, logger)  # (a residual policy starts at its base heuristic: clone: false)
    evaluations: list[dict[str, Any]] = []

    def validate(stage: str) -> None:
        """:func:`_validate` with the global random generators restored after it: inside a sweep worker the
        validations run in this process (loading the probe policy draws torch's generator), and PPO's
        action sampling must not see that, so a run trains the same weights alone or in a sweep."""
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            _validate(stage)
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])

    def _validate(stage: str) -> None:
        """Save the current policy and compare it with the reference heuristic on fixed validation windows;
        best/ keeps the best so far (the untrained or cloned policy too: training can lose what it had)."""
        probe = out_dir / "probe"
        probe.mkdir(exist_ok=True)
        save_policy(model, vec, cfg, probe)
        validation = cfg.validation
        row: dict[str, Any] = {"stage": stage, "timesteps": model.num_timesteps}
        for scale in cfg.env.compare.validation_rate_scales:
            first = not evaluations  # the reference's figures do not change: measure them once
            table, _ = compare(
                cfg,
                probe,
                list(validation.seeds),
                int(validation.num_requests),
                [cfg.env.compare.reference] if first else [],
                int(validation.jobs),
                scale,
            )
            table = table.set_index("policy")
            row[f"learned_x{scale:g}"] = table.loc["learned", "slo_attainment"]
            name = cfg.env.compare.reference
            reference = f"{name}_x{scale:g}"
            row[reference] = table.loc[name, "slo_attainment"] if first else evaluations[0][reference]
        row["learned"] = float(np.mean([row[f"learned_x{s:g}"] for s in cfg.env.compare.validation_rate_scales]))
        # a later policy replaces best/ only by beating the policy in it by more than validation.min_gain: a
        # smaller win is within the validation windows' noise, and the start (the base heuristic) is kept then
        best = max((e["learned"] for e in evaluations if e["selected"]), default=None)
        row["selected"] = best is None or row["learned"] > best + float(validation.min_gain)
        if row["selected"]:
            shutil.copytree(probe, out_dir / "best", dirs_exist_ok=True)  # PPO can collapse later
        evaluations.append(row)
        print(
            f"validation ({stage}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if not _is_label(k))
            + (" -> best/" if row["selected"] else "")
        )
        log_figures(logger, {f"eval/{k}": v for k, v in row.items() if not _is_label(k)}, model.num_timesteps)

    if int(cfg.eval_every):
        validate("start")  # the untrained, cloned or resumed policy
    if int(cfg.distill.iterations) or labels is not None:
        distill(model, cfg, out_dir, labels, logger, validate if int(cfg.eval_every) else None)
    if int(cfg.evolve.generations):
        evolve(model, cfg, logger, validate if int(cfg.eval_every) else None)

    class PeriodicEvaluation(BaseCallback):
        """Validate every ``eval_every`` timesteps of RL."""

        def _on_step(self) -> bool:
            every = int(cfg.eval_every)
            if every and self.num_timesteps % every < int(cfg.n_envs):
                validate("rl")
            return True

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
    if int(cfg.total_timesteps):
        model.learn(
            total_timesteps=int(cfg.total_timesteps),
            callback=CallbackList(callbacks),
            progress_bar=bool(cfg.progress),
            reset_num_timesteps=not cfg.get("resume"),
        )
    save_policy(model, vec, cfg, out_dir)
    if evaluations:
        import pandas as pd

        pd.DataFrame(evaluations).to_csv(out_dir / "evaluations.csv", index=False)
    final = cfg.final_eval
    baselines = list(cfg.env.compare.baselines)
    chosen = out_dir / "best" if (out_dir / "best").exists() else out_dir  # the best periodic policy, if any
    table, rows = compare(
        cfg,
        chosen,
        list(final.seeds),
        int(final.num_requests),
        baselines,
        int(final.jobs),
        float(cfg.env.compare.rate_scale),
    )
    table.to_csv(out_dir / "comparison.csv", index=False)
    duel = head_to_head(rows, "learned")
    duel.to_csv(out_dir / "head_to_head.csv", index=False)
    print_tables(table, baselines[0] if baselines else None)
    print_head_to_head(duel)
    learned = float(table.set_index("policy").loc["learned", "slo_attainment"])
    finals = {f"final/{p}": float(v) for p, v in zip(table["policy"], table["slo_attainment"], strict=True)}
    log_figures(logger, {"final/learned_slo_attainment": learned, **finals}, model.num_timesteps)
    logger.close()
    if wandb_run is not None:
        wandb_run.finish()
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
