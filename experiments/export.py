"""Export a trained routing policy to ONNX (normaliser and mask inside the graph) plus a JSON manifest,
then check the graph against the stable-baselines3 policy on observations recorded from the run's own
environment.

    python experiments/export.py run=outputs/train/2026-11-23_14-00-00          # -> RUN/export/
    python experiments/export.py run=outputs/train/2026-11-23_14-00-00/best out=router_policy

The export loads the run's ``model.zip`` (a pickle: export only runs you trust); the exported files load
without pickle (``agents.exported.ExportedRouter``). Exits non-zero if the parity check fails.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from agents.exported import GRAPH, MANIFEST, ExportError, export_run, parity
from agents.run_dir import CONFIG, read_config
from agents.user_errors import exit_on_user_error


def recorded_observations(run: Path, decisions: int, seed: int):
    """Observations and masks of the run's environment (its config), least-outstanding routing acting."""
    from agents.imitation import collect_demonstrations

    cfg = read_config(run)
    if cfg is None:
        raise ExportError(f"{run}: no {CONFIG} to rebuild the environment the policy was trained on")
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    workload.update(OmegaConf.to_container(cfg.train_window, resolve=True))
    workload["num_requests"] = decisions  # one episode of exactly this many decisions (colocated clusters)
    env_kwargs = {
        "cluster": OmegaConf.to_container(cfg.cluster, resolve=True),
        "workload": workload,
        "max_instances": int(cfg.env.max_instances),
        "horizon": decisions,
        "render_mode": None,
    }
    demos = collect_demonstrations(
        f"envs:{cfg.env.id}", env_kwargs, {"_target_": "envs.sim.policies.LeastOutstandingRequests"}, 1, seed
    )
    return demos.observations, demos.masks


def run(cfg: DictConfig) -> dict[str, float]:
    source = Path(cfg.run)
    out = export_run(source, cfg.out)
    print(f"exported: {out / GRAPH} and {out / MANIFEST}")
    if not int(cfg.check.decisions):
        return {}
    observations, masks = recorded_observations(source, int(cfg.check.decisions), int(cfg.check.seed))
    report = parity(source, out, observations, masks)
    print(
        f"parity on {int(report['decisions'])} recorded decisions: actions agree {report['action_agreement']:.1%}, "
        f"largest log-probability difference {report['max_logit_difference']:.2e}"
    )
    if report["max_logit_difference"] > float(cfg.check.tolerance):
        raise SystemExit(f"parity check failed: difference above {cfg.check.tolerance}")
    return report


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
