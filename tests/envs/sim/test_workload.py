"""Workloads: seeded, rates as configured, lengths and SLO classes as asked, traces rescaled."""

import numpy as np
import pytest
from servegym.envs.sim.workload import (
    LengthSampler,
    RateSchedule,
    SloMix,
    SyntheticWorkload,
    TraceWorkload,
    WorkloadError,
    offered_load,
)


def _times(requests):
    return np.array([r.arrival_s for r in requests])


def test_same_workload_seed_same_arrivals_other_seed_other_arrivals():
    workload = SyntheticWorkload(arrivals=RateSchedule(((1.0, 5.0),), cv=2.0), num_requests=200)
    assert np.array_equal(_times(workload.generate(1)), _times(workload.generate(1)))
    assert not np.array_equal(_times(workload.generate(1)), _times(workload.generate(2)))


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(cv):
    times = _times(SyntheticWorkload(arrivals=RateSchedule(((1.0, 10.0),), cv=cv), num_requests=20000).generate(0))
    gaps = np.diff(times)
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_piecewise_and_diurnal_rates_follow_the_schedule():
    steps = _times(SyntheticWorkload(arrivals=RateSchedule(((60.0, 2.0), (60.0, 20.0))), duration_s=1200).generate(0))
    low = np.sum((steps % 120) < 60)
    assert low / len(steps) == pytest.approx(2 / 22, abs=0.02)
    diurnal = RateSchedule(((1.0, 10.0),), diurnal_amplitude=0.8, diurnal_period_s=100.0)
    times = _times(SyntheticWorkload(arrivals=diurnal, duration_s=2000).generate(0))
    peak = np.sum((times % 100) < 50)  # sin > 0 on the first half period
    assert peak / len(times) == pytest.approx(0.5 + 0.8 / np.pi, abs=0.03)


def test_length_samplers():
    rng = np.random.default_rng(0)
    prompts, outputs = LengthSampler("lognormal", prompt=1000, output=100, prompt_sigma=0.5, output_sigma=0.5).sample(
        20000, rng
    )
    assert np.median(prompts) == pytest.approx(1000, rel=0.03) and outputs.min() >= 1
    prompts, outputs = LengthSampler("empirical", source="arxiv").sample(20000, rng)
    assert prompts.mean() == pytest.approx(2588, rel=0.05) and outputs.mean() == pytest.approx(291, rel=0.05)


def test_slo_mix_draws_classes_by_weight():
    mix = SloMix.from_config(
        [{"name": "chat", "ttft_s": 1, "tpot_s": 0.05, "weight": 3}, {"name": "batch", "e2e_s": 60, "weight": 1}]
    )
    requests = SyntheticWorkload(slo=mix, num_requests=4000).generate(0)
    share = np.mean([r.slo.name == "chat" for r in requests])
    assert share == pytest.approx(0.75, abs=0.03)


def test_trace_replay_rescaled_and_windowed():
    base = TraceWorkload(path="azure_conv").generate(0)
    double = TraceWorkload(path="azure_conv", rate_scale=2.0).generate(0)
    assert _times(double)[-1] == pytest.approx(_times(base)[-1] / 2)
    target = TraceWorkload(path="azure_conv", target_rate=20.0, duration_s=300).generate(0)
    assert offered_load(target)["rate_rps"] == pytest.approx(20.0, rel=0.15)
    assert _times(target)[-1] < 300
    assert [r.prompt_tokens for r in base[:3]] == [374, 396, 879]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: RateSchedule(((1.0, 0.0),)), "every rate piece is zero"),
        (lambda: RateSchedule(((1.0, 1.0),), cv=-1), "cv must be positive, or 0"),
        (lambda: LengthSampler("weird"), "lengths.kind"),
        (lambda: SyntheticWorkload(), "give num_requests or duration_s"),
        (lambda: TraceWorkload(rate_scale=0), "rate_scale must be positive"),
    ],
)
def test_impossible_workloads_are_named(factory, message):
    with pytest.raises(WorkloadError, match=message):
        factory()


def test_scaling_a_workload_scales_its_rate_everywhere():
    from servegym.envs.sim.config import workload_from
    from servegym.envs.sim.workload import scale_load

    trace = workload_from({"kind": "trace", "path": "azure_conv", "rate_scale": 2.0, "num_requests": 50})
    assert scale_load(trace, 1.5).rate_scale == 3.0
    targeted = workload_from({"kind": "trace", "path": "azure_conv", "target_rate": 4.0, "num_requests": 50})
    assert scale_load(targeted, 0.5).target_rate == 2.0
    synthetic = workload_from({"kind": "synthetic", "num_requests": 50, "arrivals": {"pieces": [[1, 2], [1, 6]]}})
    assert scale_load(synthetic, 2).arrivals.pieces == ((1, 4), (1, 12))
    mixed = workload_from(
        {"kind": "concat", "parts": [{"kind": "synthetic", "num_requests": 5, "arrivals": {"rate": 4}}]}
    )
    assert scale_load(mixed, 0.5).parts[0].arrivals.pieces == ((1.0, 2.0),)
    faster = scale_load(trace, 2.0).generate(0)
    base = trace.generate(0)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s / 2 for r in base])
    with pytest.raises(WorkloadError, match="positive and finite"):
        scale_load(trace, 0.0)


MIXTURE = {
    "kind": "mixture",
    "name": "conv_and_code",
    "parts": [
        {"kind": "trace", "path": "azure_conv", "rate_scale": 13.0, "num_requests": 40, "random_window": True},
        {"kind": "trace", "path": "azure_code", "rate_scale": 6.5, "num_requests": 40, "random_window": True},
    ],
}


def test_a_mixture_plays_one_part_per_seed_exactly_as_that_part_alone():
    from servegym.envs.sim.config import workload_from

    mixture = workload_from(MIXTURE)
    picks = [mixture.part_index(seed) for seed in range(60)]
    assert set(picks) == {0, 1}  # both traces get windows
    for seed in range(6):
        alone = mixture.parts[picks[seed]].generate(seed)
        drawn = mixture.generate(seed)
        assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in drawn] == [
            (r.arrival_s, r.prompt_tokens, r.output_tokens) for r in alone
        ]
    assert [mixture.part_index(seed) for seed in range(60)] == picks  # deterministic


def test_mixture_weights_set_how_often_each_part_plays_and_bad_weights_are_named():
    from servegym.envs.sim.config import workload_from
    from servegym.envs.sim.workload import scale_load

    mostly_code = workload_from({**MIXTURE, "weights": [1, 3]})
    share = np.mean([mostly_code.part_index(seed) for seed in range(2000)])
    assert share == pytest.approx(0.75, abs=0.03)
    assert {workload_from({**MIXTURE, "weights": [0, 1]}).part_index(s) for s in range(50)} == {1}
    assert [p.rate_scale for p in scale_load(mostly_code, 2.0).parts] == [26.0, 13.0]
    with pytest.raises(WorkloadError, match=r"weights \(2\) must match its parts \(3\)"):
        workload_from({**MIXTURE, "parts": MIXTURE["parts"] + MIXTURE["parts"][:1], "weights": [1, 1]})
    with pytest.raises(WorkloadError, match="non-negative with a positive sum"):
        workload_from({**MIXTURE, "weights": [0, 0]})
    with pytest.raises(WorkloadError, match="needs parts: a list"):
        workload_from({"kind": "mixture", "parts": {"kind": "trace"}})


def test_training_windows_cut_every_part_of_a_mixture():
    from servegym.agents.run_dir import windowed
    from servegym.envs.sim.config import workload_from

    mixture = windowed(
        {**MIXTURE, "parts": [dict(p, num_requests=None) for p in MIXTURE["parts"]]},
        {"num_requests": 25, "random_window": True},
    )
    assert [p["num_requests"] for p in mixture["parts"]] == [25, 25]
    assert all(len(workload_from(mixture).generate(seed)) == 25 for seed in range(4))
