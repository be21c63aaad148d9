"""The comparison harness: identical arrivals per seed, intervals, bisection, every conf/policy loading
(the evaluate entry point's end-to-end claims are in tests/experiments/test_evaluate.py)."""

from pathlib import Path

import numpy as np
import pytest
from servegym.agents.configs import named_configs
from servegym.agents.harness import (
    Task,
    confidence_interval,
    max_sustainable_load,
    run_task,
    summarise,
)

ROOT = Path(__file__).resolve().parents[2]

SMALL_CLUSTER = {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM"}}, {"count": 1, "engine": {"gpu": "A100-80GB"}}]}


def test_confidence_interval_is_student_t():
    mean, half = confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert np.isnan(confidence_interval([5.0])[1])


def test_bisection_finds_the_largest_load_meeting_the_target():
    attainment = lambda load: 1.0 - max(0.0, load - 1.3)  # noqa: E731 — meets 0.9 up to 1.4
    assert max_sustainable_load(attainment, target=0.9, iterations=20) == pytest.approx(1.4, abs=1e-4)
    assert max_sustainable_load(lambda load: 0.5, target=0.9) == 0.0


def test_every_policy_in_conf_loads_and_runs_a_few_requests():
    policies = named_configs("policy", sorted(p.stem for p in (ROOT / "conf/policy").glob("*.yaml")))
    workload = {
        "kind": "synthetic",
        "num_requests": 30,
        "arrivals": {"rate": 20.0},
        "lengths": {"kind": "fixed", "prompt": 300, "output": 20},
    }
    pd_cluster = {
        "groups": [{"count": 2, "engine": {"role": "prefill"}}, {"count": 2, "engine": {"role": "decode"}}],
        "monitor_interval_s": 0.2,
    }
    for name, spec in policies.items():
        cluster = pd_cluster if spec.get("pools") else SMALL_CLUSTER
        row = run_task(Task(name, "w", 0, 1.0), spec, workload, cluster)
        assert row["completed"] == 30, name


def test_same_seed_same_arrivals_for_every_policy():
    workload = {
        "kind": "synthetic",
        "num_requests": 200,
        "arrivals": {"rate": 30.0, "cv": 3.0},
        "lengths": {"kind": "empirical", "source": "azure_conv"},
    }
    specs = named_configs("policy", ["vllm_rr", "vllm_lor"])
    rows = [run_task(Task(p, "w", 4, 1.0), specs[p], workload, SMALL_CLUSTER) for p in specs]
    assert rows[0]["offered_rps"] == rows[1]["offered_rps"]
    table = summarise(
        [*rows, run_task(Task("vllm_rr", "w", 5, 1.0), specs["vllm_rr"], workload, SMALL_CLUSTER)], reference="vllm_rr"
    )
    assert table.set_index("policy").loc["vllm_rr", "slo_attainment_diff"] == 0.0
