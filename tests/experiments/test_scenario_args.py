"""``scenario=NAME`` in train.py (the default scenario's numbers unchanged), simulate.py and evaluate.py."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from servegym.envs.scenarios import ScenarioError

ROOT = Path(__file__).resolve().parents[2]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_train_with_the_default_scenario_keeps_the_default_numbers():
    from servegym.experiments.train import apply_scenario

    plain, scenario = _compose("train", []), _compose("train", ["scenario=hetero-conv"])
    apply_scenario(scenario)
    for key in (
        "cluster",
        "workload",
        "train_window",
        "validation",
        "final_eval",
        "env.compare.rate_scale",
        "env.compare.validation_rate_scales",
        "env.compare.baselines",
    ):
        assert OmegaConf.select(scenario, key) == OmegaConf.select(plain, key), key
    assert scenario.env.compare.reference == "vllm_prism"
    pools = _compose("train", ["scenario=hetero-conv", "env=pools"])
    with pytest.raises(ScenarioError, match="scenario hetero-conv poses route, not servegym/Pools-v0"):
        apply_scenario(pools)


def test_simulate_and_evaluate_take_a_scenario(tmp_path):
    from servegym.experiments import evaluate, simulate

    summary = simulate.run(_compose("simulate", ["scenario=short", "until_s=2.0", "progress=false"]), tmp_path / "sim")
    assert summary["scenario"]["scenario"] == "short" and summary["scenario"]["workload"] == "short_lognormal"
    assert summary["offered"]["rate_rps"] == pytest.approx(120, rel=0.1)  # one test window at its test load
    overrides = ["scenario=short", "policies=[vllm_lor,vllm_prism]", "workload_overrides={short:{num_requests:200}}"]
    cfg = _compose("evaluate", [*overrides, "jobs=1", "progress=false"])
    table = evaluate.run(cfg, tmp_path / "eval")["table"]
    assert set(table["policy"]) == {"vllm_lor", "vllm_prism"} and set(table["seeds"]) == {3}
    assert table["load"].tolist() == [1.0, 1.0] and "slo_attainment_vs_ref" in table  # against PRISM
    more = _compose("evaluate", [*overrides, "jobs=1", "progress=false", "scenario_seeds=[7,8,9,10]"])
    assert set(evaluate.run(more, tmp_path / "more")["table"]["seeds"]) == {4}  # other windows than the scenario's


def test_the_across_traces_recipe_trains_on_windows_of_both_traces():
    """``recipe=across_traces``: every training window is a 1,000-request random window of the conversation
    or the code trace, both drawn; validation windows are the mixture at its stated rates and above."""
    import gymnasium as gym
    from servegym.agents.run_dir import env_kwargs
    from servegym.experiments.train import windows_at

    cfg = _compose("train", ["recipe=across_traces"])
    kwargs = env_kwargs(cfg)
    assert kwargs["load_range"] == (0.6, 1.15)
    assert [(p["path"], p["num_requests"], p["random_window"]) for p in kwargs["workload"]["parts"]] == [
        ("azure_conv", 1000, True),
        ("azure_code", 1000, True),
    ]
    env = gym.make(cfg.env.id, **kwargs)
    mixture = env.unwrapped.workload
    assert {mixture.part_index(seed) for seed in range(8)} == {0, 1}
    env.close()
    workload, load, name = windows_at(cfg, 2000, 20.0)
    assert load == pytest.approx(20.0 / 17.0) and name == "conv_and_code x1.17647"
    assert all(p["num_requests"] == 2000 and p["random_window"] for p in workload["parts"])
