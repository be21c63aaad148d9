"""A tiny training run shared by the training, evaluation and export tests."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from servegym.experiments.train import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "total_timesteps=512",
                "n_envs=1",
                "agent.kwargs.n_steps=256",
                "agent.kwargs.batch_size=64",
                "checkpoint_every=256",
                "eval_every=256",
                "logger=wandb",
                "logger.mode=disabled",
                "progress=false",
                "train_window.num_requests=200",
                "env.warmup=50",
                "env.horizon=32",
                "imitation.episodes=2",
                "validation.seeds=[990]",
                "validation.num_requests=200",
                "validation.jobs=1",
                "final_eval.seeds=[1000]",
                "final_eval.num_requests=200",
                "env.compare.baselines=[vllm_rr]",
                "final_eval.jobs=1",
            ],
        )
    attainment = run(cfg, out)
    return out, attainment
