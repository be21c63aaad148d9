import json

import numpy as np
import pytest
from servegym.perfmodel import microbench
from servegym.perfmodel.calibrate import calibrate
from servegym.perfmodel.catalog import ModelSpec, register_catalog
from servegym.perfmodel.profile import default_profile
from servegym.perfmodel.steplog import parse_line
from servegym.perfmodel.structural import StructuralModel

TINY = ModelSpec(
    name="Tiny-GQA",
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
    vocab_size=2048,
)


def test_grid_is_seeded_and_covers_three_step_kinds():
    grid = microbench.grid(seed=3, points=30, max_tokens=512, max_context=1024)
    assert grid == microbench.grid(seed=3, points=30, max_tokens=512, max_context=1024)
    assert any(c.prefill and not c.decodes for c in grid)
    assert any(c.decodes and not c.prefill for c in grid)
    assert any(c.decodes and c.prefill for c in grid)
    assert all(c.prefill <= 512 and c.prefill_context <= 1024 for c in grid)


@pytest.mark.slow
def test_cpu_microbenchmark_writes_a_log_that_calibrates(tmp_path):
    """Real kernel timings on this CPU become a valid step log and a profile that fits it better than priors.

    Live timings depend on what else runs on the machine, so only properties that survive noise are
    asserted here; held-out accuracy on real measurements is pinned on the shipped log below.
    """
    import yaml

    entry = microbench.measure_host()
    tiny = {
        k: getattr(TINY, k)
        for k in (
            "name",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
        )
    }
    (tmp_path / "host.yaml").write_text(yaml.safe_dump({"gpus": [entry], "models": [tiny]}))
    register_catalog(tmp_path / "host.yaml")
    gpu = entry["name"]
    compositions = microbench.grid(seed=0, points=24, max_tokens=512, max_context=1024)
    lines = list(microbench.run(TINY, gpu, "cpu", compositions, repeats=3, progress=False))
    records = [parse_line(json.dumps(line), f"line {i}", need_latency=True) for i, line in enumerate(lines)]
    assert len(records) == 24 and all(r.latency_ms > 0 and r.model == "Tiny-GQA" for r in records)
    profile = calibrate(records)

    def mape(prof):
        return np.mean(
            [
                abs(StructuralModel(gpu, TINY, profile=prof, cuda_graphs=False).predict(r.batch) / r.latency_ms - 1)
                for r in records
            ]
        )

    assert mape(profile) < mape(default_profile())


def test_shipped_cpu_log_predicts_held_out_steps():
    """Calibrated on the even steps of the shipped measured log, the model predicts the odd ones."""
    from servegym.perfmodel.report import CPU_STEP_LOG
    from servegym.perfmodel.steplog import read_steps

    register_catalog(CPU_STEP_LOG.with_suffix(".catalog.yaml"))
    records = list(read_steps(CPU_STEP_LOG, need_latency=True))
    profile = calibrate(records[0::2])
    errors = [
        abs(StructuralModel(r.gpu, r.model, profile=profile, cuda_graphs=False).predict(r.batch) / r.latency_ms - 1)
        for r in records[1::2]
    ]
    assert np.mean(errors) < 0.15
