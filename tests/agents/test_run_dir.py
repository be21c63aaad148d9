"""The training-run directory: what save_run writes is what the readers read; what a path is."""

import json

import pytest
from servegym.agents import run_dir
from servegym.agents.harness import saved_policy_spec
from servegym.envs.features import FeatureSpec


def test_a_saved_run_reads_back(tmp_path):
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    vec = VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")]), clip_obs=7.0)
    vec.obs_rms.mean[:] = [1.0, 2.0, 3.0, 4.0]
    model = PPO("MlpPolicy", vec, n_steps=64, device="cpu")
    run_dir.save_run(tmp_path, model, vec, "servegym/Route-v0", "PPO", 8)
    assert run_dir.is_run(tmp_path) and run_dir.missing_policy_file(tmp_path) is None
    assert (tmp_path / run_dir.VECNORMALIZE).exists()
    manifest = run_dir.read_manifest(tmp_path)
    assert manifest["env_version"] == "0" and manifest["algorithm"] == "PPO"
    assert manifest["features"] == json.loads(json.dumps(FeatureSpec(8).manifest()))
    norm = run_dir.read_normalization(tmp_path)
    assert norm["mean"] == [1.0, 2.0, 3.0, 4.0] and norm["clip_obs"] == 7.0 and len(norm["var"]) == 4
    assert PPO.load(run_dir.model_path(tmp_path), device="cpu").n_steps == 64


def test_best_inside_a_run_reads_the_runs_config(tmp_path):
    (tmp_path / run_dir.CONFIG).write_text("seed: 3\n")
    (tmp_path / "best").mkdir()
    assert run_dir.read_config(tmp_path / "best").seed == 3
    assert run_dir.read_config(tmp_path / "elsewhere" / "best") is None


def test_a_path_is_an_export_a_run_or_named_as_neither(tmp_path):
    export, run = tmp_path / "export", tmp_path / "run"
    export.mkdir()
    (export / "policy.json").write_text('{"env_id": "servegym/Route-v0"}')
    run.mkdir()
    (run / "manifest.json").write_text('{"env_id": "servegym/Route-v0"}')
    assert saved_policy_spec(export)["router"] == {
        "_target_": "servegym.agents.exported.ExportedRouter",
        "path": str(export),
    }
    assert saved_policy_spec(export / "policy.json")["router"]["_target_"] == "servegym.agents.exported.ExportedRouter"
    assert saved_policy_spec(run)["router"] == {"_target_": "servegym.agents.learned.LearnedRouter", "run": str(run)}
    assert run_dir.missing_policy_file(run) == "model.zip"
    (run / "manifest.json").write_text('{"env_id": "servegym/Batch-v0"}')  # the manifest's kind picks the slot
    spec = saved_policy_spec(run)
    assert (
        spec["batch"]["_target_"] == "servegym.agents.learned.LearnedBatcher" and "Least" in spec["router"]["_target_"]
    )
    (run / "manifest.json").write_text('{"env_id": "servegym/Pools-v0"}')
    assert saved_policy_spec(run)["pools"] == {"_target_": "servegym.agents.learned.LearnedPools", "run": str(run)}
    with pytest.raises(FileNotFoundError, match=r"neither an exported policy \(policy.json\) nor a training run"):
        saved_policy_spec(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        run_dir.read_manifest(export)
