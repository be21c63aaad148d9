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
from servegym.envs.features import ENGINE_FEATURES
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
    observations, masks = np.stack([o for *_, o, _ in steps]), np.stack([m for *_, m in steps])
    extractor = model.policy.features_extractor
    extractor.set_bonus_gains(observations)
    with torch.no_grad():  # random bonuses in PRISM's units
        extractor.bilinear.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    moved = [
        int(model.predict(o, deterministic=True, action_masks=m)[0]) for o, m in zip(observations, masks, strict=True)
    ]
    assert moved != [want for want, *_ in steps]
    vec = VecNormalize(DummyVecEnv([lambda: env]), norm_obs=False)
    save_run(tmp_path, model, vec, "servegym/Route-v0", "MaskablePPO", 8)
    onnx = OnnxPolicy(export_run(tmp_path, tmp_path / "export"))
    assert onnx(observations, masks)[0].tolist() == moved  # the gains are in the graph
    loaded = MaskablePPO.load(tmp_path / "model.zip", device="cpu").policy.features_extractor
    assert torch.equal(loaded.engine_gain, extractor.engine_gain) and torch.equal(loaded.bilinear, extractor.bilinear)


def test_the_bilinear_bonus_reads_normalised_clipped_inputs():
    env = RouteEnv(reward="relative", horizon=60, load_range=(1.3, 1.5))
    kwargs = {
        "policy_kwargs": {
            "features_extractor_kwargs": {
                "residual": "bilinear",
                "bonus_clip": 2.0,
                "bonus_features": ["prefill_capacity", "outstanding", "present"],
            }
        }
    }
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **kwargs)
    steps = _episodes(model, env, seeds=[5])
    observations = np.stack([o for *_, o, _ in steps])
    extractor = model.policy.features_extractor
    active = extractor.set_bonus_gains(observations)
    names = [f.name for f in ENGINE_FEATURES]
    # the present flag never differs between engines, the unnamed features are not read
    assert {names[j] for j in np.flatnonzero(active.any(axis=1))} == {"prefill_capacity", "outstanding"}
    engines, request = extractor.bonus_inputs(torch.as_tensor(observations))
    present = observations[0, : 8 * len(names)].reshape(8, -1)[:, 0] > 0.5  # this cluster's engines, not padding
    capacity = engines[:, torch.as_tensor(present), names.index("prefill_capacity")]
    assert torch.allclose(capacity.std(dim=1, unbiased=False), torch.ones(len(observations), dtype=torch.float64))
    assert engines.abs().max() <= 2.0 and request.abs().max() <= 2.0
    with torch.no_grad():  # a huge queue on one engine moves its bonus no further than the clip allows
        extractor.bilinear.fill_(1.0)
        flooded = torch.as_tensor(observations[:1]).clone()
        flooded[0, names.index("outstanding")] = 1e4
        bonus = extractor.residual(flooded) / extractor.sharpness.exp()
    assert bonus.abs().max() <= 2.0 * 2.0 * active.sum() + 1e-6
    with pytest.raises(ValueError, match="unknown engine features"):
        MaskablePPO(
            ResidualSlotPolicy,
            env,
            device="cpu",
            policy_kwargs={"features_extractor_kwargs": {"residual": "bilinear", "bonus_features": ["gpu_colour"]}},
        )
