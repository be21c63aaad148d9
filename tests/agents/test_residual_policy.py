"""The residual router: with its residual at zero it *is* PRISM, decision for decision, in training
(stable-baselines3) and in its ONNX export; training moves it away only through the residual."""

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from servegym.agents.exported import OnnxPolicy, export_run
from servegym.agents.residual_policy import ResidualSlotPolicy
from servegym.agents.routing.predictive import Prism
from servegym.agents.run_dir import save_run
from servegym.envs.route_env import RouteEnv
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

SLO = [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}]
SESSIONS = {  # chat sessions, so PRISM's affinity term decides some placements
    "kind": "synthetic",
    "num_requests": 400,
    "arrivals": {"rate": 60.0, "cv": 2.0},
    "lengths": {"kind": "empirical", "source": "azure_conv"},
    "sessions": 12,
    "slo": SLO,
}
KWARGS = {"policy_kwargs": {"features_extractor_kwargs": {"slo_tpot_s": 0.1, "temperature": 0.05}}}


def _episodes(model, env, seeds, workload_seed=None):
    """Every decision of the given episodes: (PRISM's choice, the policy's greedy choice, obs, mask)."""
    out = []
    for seed in seeds:
        options = {"workload_seed": workload_seed} if workload_seed is not None else None
        obs, info = env.reset(seed=seed, options=options)
        prism, done = Prism(slo_tpot_s=0.1), False
        while not done:
            decision = env.decision
            want = prism.route(decision.request, decision.view)
            action, _ = model.predict(obs, deterministic=True, action_masks=info["action_mask"])
            out.append((want, int(action), obs, info["action_mask"]))
            obs, _, terminated, truncated, info = env.step(int(action))
            done = terminated or truncated
    return out


@pytest.mark.parametrize("residual", ["mlp", "bilinear"])
@pytest.mark.parametrize("workload", [None, SESSIONS], ids=["azure_conv", "sessions"])
def test_with_the_residual_at_zero_every_decision_is_prisms(workload, residual):
    # no warm-up: the inline router's placements would be in the contract's session table, not in this PRISM's
    env = RouteEnv(workload=workload, reward="relative", horizon=120, load_range=(1.0, 1.6))
    kwargs = {
        "policy_kwargs": {"features_extractor_kwargs": {"slo_tpot_s": 0.1, "temperature": 0.05, "residual": residual}}
    }
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **kwargs)
    steps = _episodes(model, env, seeds=[0, 1])
    assert len(steps) == 240
    assert [want for want, *_ in steps] == [got for _, got, *_ in steps]
    if workload is SESSIONS:
        column = np.stack([env.spec_features.named(o)["affinity"] for *_, o, _ in steps])
        assert column.sum() > 0, "the affinity term never mattered: the test would not see a broken window"


def test_the_export_holds_base_and_residual(tmp_path):
    env = RouteEnv(reward="relative", horizon=60)
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **KWARGS)
    steps = _episodes(model, env, seeds=[3])
    vec = VecNormalize(DummyVecEnv([lambda: env]), norm_obs=False)
    save_run(tmp_path, model, vec, "servegym/Route-v0", "MaskablePPO", 8)
    onnx = OnnxPolicy(export_run(tmp_path, tmp_path / "export"))
    observations, masks = np.stack([o for *_, o, _ in steps]), np.stack([m for *_, m in steps])
    assert onnx(observations, masks)[0].tolist() == [want for want, *_ in steps]
    # a residual that is no longer zero moves the policy (the export's parity with SB3: tests/experiments)
    with torch.no_grad():
        model.policy.features_extractor.scorer[-1].weight.normal_(0.0, 5.0)
    moved = [int(model.predict(obs, deterministic=True, action_masks=mask)[0]) for *_, obs, mask in steps]
    assert moved != [want for want, *_ in steps]


def test_a_bilinear_residual_moves_the_policy_and_its_export_follows(tmp_path):
    env = RouteEnv(reward="relative", horizon=60, load_range=(1.3, 1.5))
    kwargs = {"policy_kwargs": {"features_extractor_kwargs": {"residual": "bilinear", "slo_tpot_s": 0.1}}}
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **kwargs)
    steps = _episodes(model, env, seeds=[4])
    with torch.no_grad():  # a bonus in PRISM's units for engines with a high prefill capacity
        model.policy.features_extractor.bilinear.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    observations, masks = np.stack([o for *_, o, _ in steps]), np.stack([m for *_, m in steps])
    moved = [
        int(model.predict(o, deterministic=True, action_masks=m)[0]) for o, m in zip(observations, masks, strict=True)
    ]
    assert moved != [want for want, *_ in steps]
    vec = VecNormalize(DummyVecEnv([lambda: env]), norm_obs=False)
    save_run(tmp_path, model, vec, "servegym/Route-v0", "MaskablePPO", 8)
    onnx = OnnxPolicy(export_run(tmp_path, tmp_path / "export"))
    assert onnx(observations, masks)[0].tolist() == moved
