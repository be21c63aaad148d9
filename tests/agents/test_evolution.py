"""Evolution strategies on the bilinear residual (agents/evolution.py): the search climbs a known fitness,
ranks ignore outliers and ties, and a candidate router decides exactly as the residual policy with the same
weights does, so what the search scores is what training saves."""

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from servegym.agents.configs import named_configs
from servegym.agents.evolution import BonusRouter, Evolution, candidate_spec, centered_ranks, window_fitness
from servegym.agents.residual_policy import ResidualSlotPolicy
from servegym.agents.routing.predictive import Prism
from servegym.envs.features import ENGINE_FEATURES
from servegym.envs.route_env import RouteEnv

KWARGS = {"policy_kwargs": {"features_extractor_kwargs": {"residual": "bilinear", "slo_tpot_s": 0.1}}}


def test_centered_ranks_ignore_scale_and_share_ties():
    assert centered_ranks(np.array([1.0, 1e9, -5.0])).tolist() == [0.0, 0.5, -0.5]
    assert centered_ranks(np.array([2.0, 2.0, 1.0, 3.0])).tolist() == [0.0, 0.0, -0.5, 0.5]


def test_the_search_climbs_a_known_fitness():
    target = np.arange(6.0).reshape(2, 3) / 5
    search = Evolution((2, 3), pairs=8, sigma=0.2, learning_rate=0.1, seed=0)
    found = search.run(lambda candidates, _: np.array([-np.sum((c - target) ** 2) for c in candidates]), 60)
    assert np.sum((found - target) ** 2) < 0.05 * np.sum(target**2)
    assert search.history[-1]["current"] > search.history[0]["current"]
    again = Evolution((2, 3), pairs=8, sigma=0.2, learning_rate=0.1, seed=0)
    assert np.array_equal(again.run(lambda cs, _: np.array([-np.sum((c - target) ** 2) for c in cs]), 60), found)


def test_weights_outside_the_active_mask_are_neither_perturbed_nor_moved():
    active = np.array([[True, False, True], [False, False, True]])
    seen = []

    def fitness(candidates, _):
        seen.extend(candidates)
        return np.array([-np.sum((c - 1.0) ** 2) for c in candidates])

    start = np.full((2, 3), 0.5)
    found = Evolution((2, 3), pairs=4, sigma=0.2, learning_rate=0.1, seed=0, active=active).run(fitness, 40, start)
    assert all(np.array_equal(c[~active], start[~active]) for c in seen)
    assert np.array_equal(found[~active], start[~active]) and np.all(np.abs(found[active] - 1.0) < 0.1)
    # an inactive row more (a feature added to the contract that the bonus does not read) draws no random
    # numbers: the same search of the others (to BLAS's summation order, ~1e-16)
    grown = Evolution((3, 3), pairs=4, sigma=0.2, learning_rate=0.1, seed=0, active=np.vstack([active, [False] * 3]))
    assert np.allclose(grown.run(fitness, 40, np.full((3, 3), 0.5))[:2], found, rtol=0.0, atol=1e-12)


def test_a_candidate_router_decides_as_the_policy_with_its_weights():
    env = RouteEnv(reward="relative", horizon=80, load_range=(1.3, 1.5))
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **KWARGS)
    extractor = model.policy.features_extractor
    obs, info = env.reset(seed=3)
    seen, done = [obs], False
    while not done:  # PRISM-routed states set the bonus's input gains, as train.py does
        obs, _, terminated, truncated, info = env.step(int(model.predict(obs, True, info["action_mask"])[0]))
        seen.append(obs)
        done = terminated or truncated
    extractor.set_bonus_gains(np.stack(seen))
    weights = torch.Generator().manual_seed(1)
    with torch.no_grad():
        extractor.bilinear.normal_(0.0, 1.0, generator=weights)
    router = BonusRouter(
        extractor.bilinear.detach().numpy().tolist(),
        engine_gain=extractor.engine_gain.tolist(),
        request_gain=extractor.request_gain.tolist(),
        request_offset=extractor.request_offset.tolist(),
    )
    prism = Prism(slo_tpot_s=0.1)
    obs, info = env.reset(seed=2)
    done, agree, moved = False, [], 0
    while not done:
        decision = env.decision
        policy = int(model.predict(obs, deterministic=True, action_masks=info["action_mask"])[0])
        # the router's own feature context follows the same placements as the environment's
        agree.append(router.route(decision.request, decision.view) == policy)
        moved += int(prism.route(decision.request, decision.view) != policy)
        obs, _, terminated, truncated, info = env.step(policy)
        done = terminated or truncated
    assert all(agree) and len(agree) == 80
    assert moved > 10, "the weights hardly moved the policy from PRISM: agreement would prove little"


def _fitness_setting(rate: float) -> tuple[list, dict, dict, int]:
    """``window_fitness``'s leading arguments: one setting of 150 requests of the conversation trace's
    lengths at ``rate`` req/s, on the default cluster, PRISM's TPOT target, 8 engine slots."""
    workload = {
        "kind": "synthetic",
        "num_requests": 150,
        "arrivals": {"rate": rate},
        "lengths": {"kind": "empirical", "source": "azure_conv"},
    }
    cluster = named_configs("cluster", ["hetero_h100_a100"])["hetero_h100_a100"]
    return [(workload, 1.0)], cluster, {"slo_tpot_s": 0.1}, 8


def test_window_fitness_scores_candidates_on_shared_windows():
    fitness = window_fitness(*_fitness_setting(40.0), windows=2, seed=7)
    zero = np.zeros((len(ENGINE_FEATURES), 7))
    values = fitness([zero, zero], 0)
    assert values[0] == values[1] and 0.0 < values[0] <= 1.0  # the same windows for every candidate
    assert candidate_spec(zero, {"slo_tpot_s": 0.1}, 8)["router"]["bilinear"] == zero.tolist()


def test_the_shortfall_penalty_charges_a_loss_against_prism_and_leaves_prism_alone():
    """``shortfall_weight`` λ: fitness − λ × max(0, PRISM − candidate) per setting; PRISM pays nothing."""
    zero, herd = np.zeros((len(ENGINE_FEATURES), 7)), np.zeros((len(ENGINE_FEATURES), 7))
    herd[6, 6] = 100.0  # `outstanding` x 1: every request to the engine with the most outstanding
    args = _fitness_setting(60.0)
    plain_zero, plain_herd = window_fitness(*args, windows=2, seed=7)([zero, herd], 0)
    penalised_zero, penalised_herd = window_fitness(*args, windows=2, seed=7, shortfall_weight=2.0)([zero, herd], 0)
    assert plain_herd < plain_zero, "herding onto the busiest engine should lose to PRISM"
    assert penalised_zero == plain_zero
    assert penalised_herd == pytest.approx(plain_herd - 2.0 * (plain_zero - plain_herd))
    # without PRISM among the candidates it runs as an extra one, with the same figure
    (alone,) = window_fitness(*args, windows=2, seed=7, shortfall_weight=2.0)([herd], 0)
    assert alone == penalised_herd
    with pytest.raises(ValueError, match="shortfall_weight"):
        window_fitness(*args, windows=2, seed=7, shortfall_weight=-1.0)
