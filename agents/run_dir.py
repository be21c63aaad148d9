"""The training-run directory: its file names, the function that writes one and the readers of it.

A run (written by ``experiments/train.py``; its ``best/`` and ``probe/`` hold the same policy files
without the config) contains:

- ``model.zip``: the stable-baselines3 policy (partly a pickle: load runs only from paths you trust);
- ``vecnormalize.pkl``: SB3's observation/reward normaliser (a pickle, for resuming training);
- ``normalization.json``: the observation normaliser's statistics as plain JSON (mean, var, clip_obs, epsilon);
- ``manifest.json``: the observation contract, algorithm, env id and version, action meaning, git revision;
- ``config.yaml`` and ``git_revision.txt``: the resolved hydra config and the code's commit.

An *export* of a run (``policy.onnx`` + ``policy.json``) is another format, owned by ``servegym.agents.exported``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from servegym.agents.configs import git_revision, is_trace
from servegym.envs.features import FeatureSpec
from servegym.envs.route_env import ACTION_MEANING as ROUTE_ACTION
from servegym.envs.sim.config import MULTI_PART

MODEL = "model.zip"
VECNORMALIZE = "vecnormalize.pkl"
NORMALIZATION = "normalization.json"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
GIT_REVISION = "git_revision.txt"
POLICY_FILES = (MODEL, NORMALIZATION, MANIFEST)  # what routing with or exporting the policy reads


def save_config(out_dir: Path, cfg: DictConfig) -> None:
    """The run's resolved config and the code's git revision (written once, when a run starts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out_dir / GIT_REVISION).write_text(git_revision() + "\n")


def save_run(
    out_dir: Path,
    model: Any,
    vec_normalize: Any,
    env_id: str,
    algorithm: str,
    max_instances: int,
    profiles: list[str] | None = None,
    action: dict[str, Any] | None = None,
) -> None:
    """Everything a later evaluation or export needs: the model, the normaliser (also as plain JSON, no
    pickle) and the manifest of the observation contract the policy was trained on, with the
    performance-model profiles its training cluster used. ``action`` is the environment's
    ``action_manifest()`` (what an action means, and for Batch-v0 its budgets); default: routing's."""
    model.save(out_dir / MODEL)
    vec_normalize.save(str(out_dir / VECNORMALIZE))
    if vec_normalize.norm_obs:
        rms = vec_normalize.obs_rms
        stats = {"mean": rms.mean.tolist(), "var": rms.var.tolist(), "clip_obs": vec_normalize.clip_obs}
        stats.update(epsilon=vec_normalize.epsilon, norm_obs=True)
    else:  # the policy reads the contract's scaled features as they are (the residual router): the identity
        size = int(vec_normalize.observation_space.shape[0])
        stats = {"mean": [0.0] * size, "var": [1.0] * size, "clip_obs": 1e6, "epsilon": 0.0, "norm_obs": False}
    (out_dir / NORMALIZATION).write_text(json.dumps(stats))
    manifest = {
        "env_id": env_id,
        "env_version": env_id.rsplit("-v", 1)[-1],
        "algorithm": algorithm,
        **(action or {"action": ROUTE_ACTION}),
        "features": FeatureSpec(int(max_instances)).manifest(),
        "profiles": list(profiles or ["default"]),
        "git_revision": git_revision(),
        "source_run": str(out_dir),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a training run directory (it has a manifest)."""
    return (Path(path) / MANIFEST).exists()


def missing_policy_file(run: str | Path) -> str | None:
    """The first of the policy's files (model, normaliser statistics, manifest) that ``run`` lacks, or None."""
    return next((name for name in POLICY_FILES if not (Path(run) / name).exists()), None)


def model_path(run: str | Path) -> Path:
    """The stable-baselines3 model file (load it with the manifest's algorithm class)."""
    return Path(run) / MODEL


def read_manifest(run: str | Path) -> dict[str, Any]:
    """The run's manifest; FileNotFoundError when ``run`` is not a training run directory."""
    path = Path(run) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{run}: no {MANIFEST} (is this a training run directory?)")
    return json.loads(path.read_text())


def read_normalization(run: str | Path) -> dict[str, Any]:
    """The observation normaliser's statistics: ``mean`` and ``var`` (lists), ``clip_obs``, ``epsilon``."""
    return json.loads((Path(run) / NORMALIZATION).read_text())


def read_config(run: str | Path) -> DictConfig | None:
    """The config the run was trained with: its own ``config.yaml`` or, for ``best/`` inside a run, the
    run's; None when neither exists."""
    run = Path(run)
    for path in (run / CONFIG, run.parent / CONFIG):
        if path.exists():
            return OmegaConf.load(path)
    return None


NOT_ENV_ARGUMENTS = ("id", "expert", "compare", "heuristics")  # the env group's keys train.py reads itself


def windowed(workload: dict[str, Any], window: dict[str, Any]) -> dict[str, Any]:
    """``workload`` with a window's settings, on every part of a concatenation or a mixture; ``random_window``
    only where it means something (traces: synthetic arrivals already differ per seed)."""
    if workload.get("kind") in MULTI_PART:
        return {**workload, "parts": [windowed(part, window) for part in workload["parts"]]}
    workload = {**workload, **window}
    if not is_trace(workload):
        workload.pop("random_window", None)
    return workload


def env_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The arguments of the environment a run's config trains on (train.py; export.py rebuilds it): the
    env group's keys (but ``id``, ``expert``, ``compare``), the cluster and the training window."""
    env = OmegaConf.to_container(cfg.env, resolve=True)
    kwargs = {k: v for k, v in env.items() if k not in NOT_ENV_ARGUMENTS}
    if kwargs.get("load_range") is not None:
        kwargs["load_range"] = tuple(kwargs["load_range"])
    if env.get("heuristics"):  # a conf/policy name: warm-up, drain, the decisions the agent leaves, the reference
        from servegym.agents.configs import named_configs
        from servegym.agents.harness import load_policy

        bundle = load_policy(named_configs("policy", [env["heuristics"]])[env["heuristics"]])
        kwargs.update(router=bundle.router, batch=bundle.batch, pools=bundle.pools)
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    window = OmegaConf.to_container(cfg.train_window, resolve=True)
    return {
        **kwargs,
        "cluster": OmegaConf.to_container(cfg.cluster, resolve=True),
        "workload": windowed(workload, window),
        "render_mode": None,
    }
