"""The leaderboard on one cheap scenario with tiny windows: every baseline and a user's router from outside
the package (examples/my_router.py) in the table, the score against the reference, the headroom left
empty, and a rerun writing identical files; bad input in one line."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from servegym.agents.harness import policy_specs
from servegym.agents.user_errors import USER_ERRORS
from servegym.envs.plugins import PluginError
from servegym.envs.scenarios import ScenarioError
from servegym.experiments.leaderboard import run

ROOT = Path(__file__).resolve().parents[2]
MINE = f"{ROOT}/examples/my_router.py:PendingTokens"


def _board(out: Path) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="leaderboard",
            overrides=[
                "scenarios=[long-context]",
                f"+custom.mine={MINE}",
                "baselines=[vllm_rr]",
                "seeds=2",
                "num_requests=60",
                "max_rate.iterations=1",
                "max_rate.seeds=1",
                "max_rate.window_s=2.0",
                "jobs=1",
                "progress=false",
                f"out={out}",
            ],
        )
    return run(cfg)


def test_the_leaderboard_runs_baselines_and_a_users_router_and_reruns_identically(tmp_path):
    result = _board(tmp_path / "a")
    board = result["scenarios"]["long-context"]["kinds"]["route"]
    assert set(board["policies"]) == {"vllm_rr", "vllm_prism", "mine"}  # and the reference
    assert board["policies"]["mine"]["source"] == "submitted"
    assert board["policies"]["vllm_prism"]["score"] == 1.0  # the reference
    assert all(p["headroom"] is None and p["max_load"] is not None for p in board["policies"].values())
    text = (tmp_path / "a/leaderboard.md").read_text()
    assert "`mine` (submitted)" in text and "## long-context (v0)" in text
    assert (tmp_path / "a/results/leaderboard/long-context-route.png").exists()
    _board(tmp_path / "b")
    for name in ("leaderboard.md", "results/leaderboard/leaderboard.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    json.loads((tmp_path / "b/results/leaderboard/leaderboard.json").read_text())


def test_the_hand_written_text_around_the_generated_tables_is_kept(tmp_path):
    from servegym.agents.leaderboard import BEGIN, END, write_markdown

    path = tmp_path / "leaderboard.md"
    path.write_text(f"# Mine\n\nintro\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    write_markdown(path, "new table\n")
    assert path.read_text() == f"# Mine\n\nintro\n\n{BEGIN}\n\nnew table\n\n{END}\n\nafter\n"


def test_bad_policy_import_paths_and_scenarios_are_user_errors():
    assert PluginError in USER_ERRORS and ScenarioError in USER_ERRORS
    with pytest.raises(PluginError, match=r"policy import path 'nowhere.mod:Router' does not import: ModuleNotFound"):
        policy_specs([], custom={"x": "nowhere.mod:Router"})
    with pytest.raises(PluginError, match=r"does not import: no file"):
        policy_specs([], custom={"x": "missing/file.py:Router"})
    with pytest.raises(PluginError, match=r"has no 'Nope'"):
        policy_specs([], custom={"x": f"{ROOT}/examples/my_router.py:Nope"})
    assert policy_specs([], custom={"x": MINE})["x"]["kind"] == "route"


def test_the_oracle_headroom_is_the_true_future_lookaheads_gain_over_the_reference():
    from servegym.agents import leaderboard
    from servegym.envs import scenarios

    scenario = scenarios.load("short")
    settings = leaderboard.Settings(headroom_seeds=1, headroom_every=32, progress=False)
    gain = leaderboard.oracle_headroom(scenario, "route", settings, scenario.loads["test"])
    assert isinstance(gain, float) and gain >= 0.0  # the lookahead keeps the reference's action unless better
    assert leaderboard.oracle_headroom(scenario, "batch", settings, 1.0) is None  # routing only
    assert leaderboard.oracle_headroom(scenario, "route", leaderboard.Settings(), 1.0) is None  # off by default
