"""Scenarios as data: every file loads and registers its ids, which pass both checkers; the default
scenario keeps the training recipe's numbers; a user's router by import path; bad names in one line."""

import warnings
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from servegym.envs import scenarios
from servegym.envs.plugins import PluginError
from servegym.envs.sim.config import workload_from
from servegym.envs.sim.workload import scale_load
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import servegym
from servegym.registration import SCENARIO_IDS

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "kind": "synthetic",
    "num_requests": 60,
    "arrivals": {"rate": 20.0, "cv": 2.0},
    "lengths": {"kind": "lognormal", "prompt": 600, "output": 120, "prompt_sigma": 0.8, "output_sigma": 0.8},
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}


def test_every_scenario_loads_and_registers_an_id_per_decision_kind():
    assert len(scenarios.names()) >= 6
    for name in scenarios.names():
        scenario = scenarios.load(name)
        for kind in scenario.kinds:
            assert SCENARIO_IDS[scenario.env_id(kind)] == (name, kind)
            assert scenario.env_id(kind) in gym.registry
    assert "servegym/Route-hetero-conv-v0" in SCENARIO_IDS


def test_the_default_scenario_keeps_the_training_recipes_numbers():
    from omegaconf import OmegaConf

    train = OmegaConf.load(ROOT / "conf/train.yaml")
    route = OmegaConf.load(ROOT / "conf/env/route.yaml")
    azure = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/workload/azure_conv.yaml"))
    scenario = scenarios.load("hetero-conv")
    assert list(scenario.seeds["test"]) == list(train.final_eval.seeds) == list(range(1000, 1020))
    assert list(scenario.seeds["validation"]) == list(train.validation.seeds) == [990, 991, 992, 993]
    assert scenario.loads["test"] == route.compare.rate_scale == 17.0
    assert scenario.loads["validation"] == list(route.compare.validation_rate_scales) == [17.0, 20.0]
    assert scenario.windows["test"] == train.final_eval.num_requests
    assert scenario.cluster == OmegaConf.to_container(OmegaConf.load(ROOT / "conf/cluster/hetero_h100_a100.yaml"))
    assert scenario.decisions["route"].reference == "vllm_prism"
    trained = scenarios.scaled(scenario.workload, scenario.loads["train"])
    assert trained == {**azure, "rate_scale": 13.0}  # the environments' azure_conv at x13


@pytest.mark.parametrize("name", ["hetero-conv", "long-context", "pd-shift"])
def test_scaled_mappings_give_the_arrivals_scale_load_gives(name):
    scenario = scenarios.load(name)
    window = scenario.window(50)
    ours = workload_from(scenarios.scaled(window, 1.7)).generate(3)
    theirs = scale_load(workload_from(window), 1.7).generate(3)
    assert [r.arrival_s for r in ours] == pytest.approx([r.arrival_s for r in theirs], rel=1e-12)


@pytest.mark.parametrize("env_id", sorted(SCENARIO_IDS))
def test_every_scenario_id_passes_both_checkers(env_id):
    env = gym.make(env_id, workload=TINY, horizon=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True, skip_render_check=True)


def test_a_users_router_by_import_path_in_an_environment():
    env = gym.make("servegym/Route-hetero-conv-v0", workload=TINY, router=f"{ROOT}/examples/my_router.py:PendingTokens")
    assert type(env.unwrapped.inline_router).__name__ == "PendingTokens"
    env.reset(seed=0)
    with pytest.raises(PluginError, match="policy import path 'no_such_module:Router' does not import"):
        gym.make("servegym/Route-v0", workload=TINY, router="no_such_module:Router")
    with pytest.raises(PluginError, match=r"not a subclass of servegym\.envs\.sim\.policies\.BatchPolicy"):
        gym.make("servegym/Route-v0", workload=TINY, batch=f"{ROOT}/examples/my_router.py:PendingTokens")


def test_an_unknown_scenario_lists_the_known_ones():
    with pytest.raises(scenarios.ScenarioError, match=r"unknown scenario 'nope'; known: bursty-conv, .*hetero-conv"):
        scenarios.load("nope")
    assert servegym  # registration ran on import


def test_command_line_overrides_of_a_scenario_are_kept_and_checked():
    """``scenario.loads.validation=[1.3]`` reaches the entry points (it was dropped when the file was reloaded
    by name), the file's own values without overrides, and a bad override is named."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        plain = compose("train", overrides=["scenario=prefix-chat"])
        changed = compose("train", overrides=["scenario=prefix-chat", "scenario.loads.validation=[1.3]"])
        swapped = compose("train", overrides=["scenario=prefix-chat", "scenario.seeds.validation=[1000]"])
    assert scenarios.from_config(plain) == scenarios.load("prefix-chat")
    assert scenarios.from_config(changed).loads["validation"] == [1.3]
    with pytest.raises(scenarios.ScenarioError, match="seeds must be disjoint"):
        scenarios.from_config(swapped)
