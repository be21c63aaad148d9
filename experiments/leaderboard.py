"""Every scenario's baselines (and any saved, exported or plug-in policies) on its test windows: the
leaderboard (``docs/leaderboard.md``, ``docs/results/leaderboard/``).

    python experiments/leaderboard.py                                   # every scenario (conf/scenario)
    python experiments/leaderboard.py scenarios=[hetero-conv,short] seeds=3
    python experiments/leaderboard.py +saved.mine=outputs/train/RUN/best
    python experiments/leaderboard.py +custom.mine=examples/my_router.py:ShortestPromptQueue out=/tmp/board

Per scenario and decision kind: SLO attainment, goodput, TTFT/TPOT P99 (95% CIs), the score against the
scenario's reference heuristic, the maximum sustainable load at 90% attainment and the oracle-headroom hook
(``servegym.agents.leaderboard``). A rerun writes identical files.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from servegym.agents import leaderboard
from servegym.agents.configs import ROOT
from servegym.agents.harness import policy_specs
from servegym.agents.user_errors import exit_on_user_error


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def run(cfg: DictConfig) -> dict:
    """The leaderboard of ``cfg``; returns the written result (what the JSON holds)."""
    names = leaderboard.scenario_list(
        OmegaConf.to_container(cfg.scenarios) if OmegaConf.is_list(cfg.scenarios) else cfg.scenarios
    )
    extra = policy_specs(
        list(cfg.policies), _plain(cfg.get("saved")), _plain(cfg.get("custom")), dirs=list(cfg.policy_dirs)
    )
    settings = leaderboard.Settings(
        jobs=int(cfg.jobs),
        seeds=int(cfg.seeds) if cfg.seeds is not None else None,
        num_requests=int(cfg.num_requests) if cfg.num_requests is not None else None,
        max_rate=bool(cfg.max_rate.enabled),
        target=float(cfg.max_rate.target),
        iterations=int(cfg.max_rate.iterations),
        max_rate_seeds=int(cfg.max_rate.seeds),
        search_s=float(cfg.max_rate.window_s) if cfg.max_rate.window_s is not None else None,
        progress=bool(cfg.progress),
        baselines=tuple(cfg.baselines) if cfg.get("baselines") is not None else None,
        extra=extra,
        headroom_seeds=int(cfg.headroom.seeds) if cfg.headroom.enabled else 0,
        headroom_every=int(cfg.headroom.every),
    )
    result = leaderboard.run(names, settings)
    written = leaderboard.write(result, Path(cfg.out) if cfg.out else ROOT / "docs")
    print(f"leaderboard: {written['markdown']} ({written['json']})")
    return result


@hydra.main(config_path="../conf", config_name="leaderboard", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
