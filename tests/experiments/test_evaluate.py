"""The evaluate entry point end to end: informed policies beat random and round-robin on an overloaded
heterogeneous cluster, and the bisection finds a better router's larger sustainable load."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from servegym.experiments.evaluate import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_informed_policies_beat_random_and_round_robin_when_overloaded(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                "policies=[vllm_random,vllm_rr,vllm_lor,vllm_sal,vllm_prism,lens_prism]",
                "workloads=[azure_conv]",
                "workload_overrides={azure_conv:{num_requests:2500,rate_scale:18,random_window:true}}",
                "loads=[1.0]",
                "seeds=[0,1]",
                "progress=false",
                "jobs=2",
            ],
        )
    table = run(cfg, tmp_path)["table"].set_index("policy")
    blind = max(table.loc["vllm_random", "slo_attainment"], table.loc["vllm_rr", "slo_attainment"])
    for informed in ("vllm_lor", "vllm_sal", "vllm_prism", "lens_prism"):
        assert table.loc[informed, "slo_attainment"] > blind + 0.1, informed
        assert table.loc[informed, "slo_attainment_diff"] > 0.1, informed  # paired against round-robin
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {row["policy"] for row in saved} == set(table.index)
    assert (tmp_path / "latency_cdf_azure_conv.png").exists() and (tmp_path / "runs.csv").exists()


def test_max_sustainable_rate_grows_with_a_better_router(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                "policies=[vllm_rr,vllm_lor]",
                "workloads=[poisson]",
                "cluster.groups.0.count=1",
                "cluster.groups.1.count=1",
                "seeds=[0]",
                "progress=false",
                "max_rate.enabled=true",
                "loads=[1.0]",
                "max_rate.iterations=3",
                "jobs=2",
                "workload_overrides={poisson:{num_requests:null,duration_s:20,arrivals:{rate:5.0,cv:3.0}}}",
            ],
        )
    rates = run(cfg, tmp_path)["max_rate"]["poisson"]
    assert rates["vllm_lor"]["load"] > rates["vllm_rr"]["load"] > 0
    assert rates["vllm_lor"]["rate_rps"] > 5.0
    assert (
        json.loads((tmp_path / "max_rate.json").read_text())["poisson"]["vllm_rr"]["load"] == rates["vllm_rr"]["load"]
    )
