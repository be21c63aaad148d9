"""The vectorised predictions of the features and the router tap equal the scalar performance model."""

import pytest
from servegym.envs.features import EngineModels
from servegym.envs.sim.router_tap import next_step_tokens, predicted_step_ms
from servegym.envs.sim.view import EngineInfo, EngineSnapshot
from servegym.perfmodel.batch import StepBatch

INFOS = [
    EngineInfo(0, "H100-SXM", "Llama-3-8B", 1, 8192, 256, 400_000),
    EngineInfo(1, "A100-80GB", "Llama-3-8B", 1, 2048, 256, 300_000),
    EngineInfo(2, "H100-SXM", "Llama-3-8B", 1, 512, 256, 400_000),
    EngineInfo(3, "H100-SXM", "Llama-3-8B", 1, 8192, 256, 400_000, cuda_graphs=False),
]
# (pending prefill, decodes, decode KV): idle, decode-only, prefill-only, a queue of several chunks
STATES = [(0, 0, 0), (0, 17, 17 * 900), (3000, 0, 0), (9000, 40, 40 * 1500)]


def snapshot(pending, decodes, kv):
    return EngineSnapshot(0.0, decodes, 0, 0.1, 25_000, 16, pending, decodes, kv)


@pytest.mark.parametrize("prompt", [1, 300, 5000])
def test_routed_latency_many_equals_the_per_engine_prediction(prompt):
    models = EngineModels()
    for state in STATES:
        snaps = [snapshot(*state) for _ in INFOS]
        ttft, tpot = models.routed_latency_many(INFOS, snaps, prompt)
        for i, (info, snap) in enumerate(zip(INFOS, snaps, strict=True)):
            expected = models.routed_latency_ms(info, snap, prompt)
            assert (ttft[i], tpot[i]) == pytest.approx(expected, rel=1e-12), (state, info.max_num_batched_tokens)


def test_predicted_step_is_the_model_on_the_decodes_plus_a_budget_chunk():
    models = EngineModels()
    tokens = [next_step_tokens(info, d, p) for info, (p, d, _) in zip(INFOS, STATES, strict=True)]
    assert tokens == [0, 17, 512, 40 + 8152]  # engine i in state i: idle, decoding, budget-bound twice
    for info, (_, decodes, kv), step_tokens in zip(INFOS, STATES, tokens, strict=True):
        batch = StepBatch.decode(decodes, kv - decodes) if decodes else StepBatch()
        if step_tokens > decodes:
            batch = batch + StepBatch.prefill(step_tokens - decodes)
        assert predicted_step_ms(models(info), decodes, kv, step_tokens) == pytest.approx(
            models(info).predict(batch), rel=1e-12
        )
