"""Export a trained policy (router, batcher or pool policy: any discrete-action run) to ONNX (normaliser and
mask inside the graph) plus a JSON manifest,
then check the graph against the stable-baselines3 policy on observations recorded from the run's own
environment.

    python experiments/export.py run=outputs/train/2026-11-23_14-00-00          # -> RUN/export/
    python experiments/export.py run=outputs/train/2026-11-23_14-00-00/best out=router_policy

The export loads the run's ``model.zip`` (a pickle: export only runs you trust); the exported files load
without pickle (``servegym.agents.exported.ExportedRouter``, ``ExportedBatcher``, ``ExportedPools``). Exits non-zero
if the parity check fails; a failed export or check removes the files it wrote.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from servegym.agents.exported import GRAPH, MANIFEST, ExportError, export_run, parity
from servegym.agents.run_dir import CONFIG, env_kwargs, read_config
from servegym.agents.user_errors import exit_on_user_error


def recorded_observations(run: Path, decisions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw observations and masks of ``decisions`` decisions of the run's own environment (its config, any
    decision kind), taken by seeded random allowed actions so that the states vary."""
    import gymnasium as gym
    import servegym.envs as envs  # noqa: F401  (registers the ids)

    cfg = read_config(run)
    if cfg is None:
        raise ExportError(f"{run}: no {CONFIG} to rebuild the environment the policy was trained on")
    kwargs = env_kwargs(cfg)
    kwargs.update({"horizon": None, "horizon_s": None, "drain": False, "reward": "goodput", "windows": None})
    env = gym.make(cfg.env.id, **kwargs).unwrapped
    rng = np.random.default_rng(seed)
    observations, masks = [], []
    observation, _ = env.reset(seed=seed)
    while len(observations) < decisions:
        mask = env.action_masks()
        observations.append(observation)
        masks.append(mask)
        action = (
            env.action_space.sample() if not hasattr(env.action_space, "n") else int(rng.choice(np.flatnonzero(mask)))
        )
        observation, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            observation, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    return np.asarray(observations, np.float32), np.asarray(masks, bool)


def run(cfg: DictConfig) -> dict[str, float]:
    """Export, then check parity; a failed export or parity check leaves no exported files behind."""
    source = Path(cfg.run)
    out = Path(cfg.out) if cfg.out is not None else source / "export"
    existed = out.exists()
    try:
        export_run(source, out)
        print(f"exported: {out / GRAPH} and {out / MANIFEST}")
        if not int(cfg.check.decisions):
            return {}
        observations, masks = recorded_observations(source, int(cfg.check.decisions), int(cfg.check.seed))
        report = parity(source, out, observations, masks)
        print(
            f"parity on {int(report['decisions'])} recorded decisions: actions agree "
            f"{report['action_agreement']:.1%}, largest log-probability difference {report['max_logit_difference']:.2e}"
        )
        if report["max_logit_difference"] > float(cfg.check.tolerance):
            raise SystemExit(f"parity check failed: difference above {cfg.check.tolerance}")
    except BaseException:
        for name in (GRAPH, MANIFEST):
            (out / name).unlink(missing_ok=True)
        if not existed and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    return report


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
