import numpy as np
import pytest
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.online import OnlineRefit
from servegym.perfmodel.structural import StructuralModel


def _workload(rng, count):
    """~90% decode-only steps with a few mixed ones, as an engine under load produces."""
    for _ in range(count):
        decodes = int(rng.integers(1, 200))
        batch = StepBatch.decode(decodes, decodes * int(rng.integers(100, 3000)))
        if rng.random() < 0.1:
            batch = batch + StepBatch.prefill(int(rng.integers(64, 2048)))
        yield batch


@pytest.mark.parametrize(("threshold", "tolerance"), [(0.15, 0.15), (0.0, 0.03)])
def test_refit_tracks_a_drift_that_the_offline_model_misses(threshold, tolerance):
    """Triggered refits bring the error under the trigger threshold; continuous ones close to the noise."""
    offline = StructuralModel("H100-SXM", "Llama-3-8B")
    c = offline.coefficients  # the GPU slows by a third (a co-tenant, power capping) and the CPU overhead triples
    slower = {
        name: getattr(c, name) * 0.65 for name in ("gemm_flops_eff", "gemm_mem_eff", "attn_flops_eff", "attn_mem_eff")
    }
    slower.update({f"elem_mem_eff.{kind}": eff * 0.65 for kind, eff in c.elem_mem_eff.items()})
    truth = StructuralModel("H100-SXM", "Llama-3-8B", coefficients=c.with_values({**slower, "step_overhead_ms": 3.0}))
    online = OnlineRefit(offline, threshold=threshold)
    rng = np.random.default_rng(0)
    for batch in _workload(rng, 600):
        online.observe(batch, truth.predict(batch) * rng.lognormal(0.0, 0.03))
    assert online.refits >= 1
    test = list(_workload(np.random.default_rng(1), 300))
    offline_error = np.mean([abs(offline.predict(b) / truth.predict(b) - 1) for b in test])
    online_error = np.mean([abs(online.predict(b) / truth.predict(b) - 1) for b in test])
    assert offline_error > 0.2
    assert online_error < tolerance


def test_no_refit_while_the_model_is_accurate():
    perf = StructuralModel("A100-80GB", "Llama-3-8B")
    online = OnlineRefit(perf)
    rng = np.random.default_rng(2)
    for batch in _workload(rng, 400):
        online.observe(batch, perf.predict(batch) * rng.lognormal(0.0, 0.03))
    assert online.refits == 0
    assert online.recent_mape < 0.05


def test_observe_rejects_nonsense():
    online = OnlineRefit(StructuralModel("A100-80GB", "Llama-3-8B"))
    with pytest.raises(ValueError, match="positive latency"):
        online.observe(StepBatch.decode(1, 10), -1.0)
