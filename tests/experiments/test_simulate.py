"""The simulate entry point end to end (hydra compose); a bad config is named in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from servegym.experiments.simulate import run

ROOT = Path(__file__).resolve().parents[2]

SUMMARY_KEYS = {
    "num_requests",
    "completed",
    "rejected",
    "slo_attainment",
    "goodput_rps",
    "throughput_tok_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "preemptions",
    "sim_s",
    "wall_s",
}


def _cli(tmp_path, *overrides, timeout, module=False):
    """Run simulate.py (or as a module) in a subprocess, its run directory in ``tmp_path``."""
    entry = ["-m", "servegym.experiments.simulate"] if module else [str(ROOT / "experiments" / "simulate.py")]
    return subprocess.run(
        [sys.executable, *entry, *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="simulate", overrides=["progress=false", *overrides])


def test_default_scenario_composes_and_runs_on_a_window(tmp_path):
    cfg = _compose("workload.num_requests=400")
    summary = run(cfg, tmp_path)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["num_requests"] == 400 and summary["completed"] + summary["rejected"] == 400
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["completed"] == summary["completed"]
    records = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(records) == 400 and set(records["instance"]) <= set(range(8))
    assert (tmp_path / "latency_cdf.png").stat().st_size > 10_000


def test_policies_and_workloads_swap_by_config(tmp_path):
    rr = run(_compose("policy=vllm_rr", "workload=poisson", "workload.num_requests=300"), tmp_path / "rr")
    sarathi = run(_compose("policy=sarathi_lor", "workload=poisson", "workload.num_requests=300"), tmp_path / "s")
    assert rr["scenario"]["policy"] == "vllm_rr" and sarathi["scenario"]["policy"] == "sarathi_lor"
    assert rr["completed"] == sarathi["completed"] == 300


def test_trace_workload_from_a_user_path(tmp_path):
    sample = ROOT / "tests/envs/sim/data/burstgpt_sample.csv"
    summary = run(_compose("workload=trace", f"workload.path={sample}", "cluster=h100x8"), tmp_path)
    assert summary["num_requests"] == 4  # two failed rows dropped and counted by the reader


def test_command_line_reports_a_bad_config_in_one_line(tmp_path):
    result = _cli(
        tmp_path,
        "progress=false",
        "cluster=llama70b_tp4",
        "cluster.groups.0.engine.tp=1",
        "cluster.groups.0.engine.gpu=A100-40GB",
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: group h100_tp4: Llama-2-70B does not fit 1x A100-40GB")
    )


def test_readme_main_command_on_a_small_window(tmp_path):
    """`make simulate` is `python experiments/simulate.py`; here on 300 requests of the default scenario."""
    result = _cli(tmp_path, "workload.num_requests=300", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "SLO attainment" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["num_requests"] == 300
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_a_policy_whose_pools_are_its_router_runs(tmp_path):
    """conf/policy/arrow.yaml says ``pools: router``: simulate loads policies through
    ``servegym.agents.harness.load_policy`` (it used to instantiate the string and fail)."""
    summary = run(_compose("cluster=pd_h100", "policy=arrow", "workload.num_requests=300"), tmp_path)
    assert summary["scenario"]["policy"] == "arrow"
    assert summary["completed"] + summary["rejected"] == summary["num_requests"] == 300


def test_the_entry_point_also_runs_as_a_module(tmp_path):
    result = _cli(tmp_path, "workload.num_requests=200", "progress=false", timeout=180, module=True)
    assert result.returncode == 0, result.stderr
    assert "SLO attainment" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["num_requests"] == 200


def test_a_groups_profile_is_used_and_recorded(tmp_path):
    from servegym.perfmodel.profile import load_profile

    profile = tmp_path / "copy_of_default.json"
    load_profile("default").save(profile)
    cfg = _compose("workload.num_requests=200", f"cluster.groups.0.engine.profile={profile}")
    summary = run(cfg, tmp_path / "out")
    assert summary["scenario"]["profiles"] == sorted(["default", str(profile)])
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert str(profile) in saved["scenario"]["profiles"]


def test_an_unknown_profile_is_one_line_and_exit_2(tmp_path):
    result = _cli(
        tmp_path,
        "workload.num_requests=50",
        "cluster.groups.0.engine.profile=no-such-profile",
        "progress=false",
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: group h100: unknown profile 'no-such-profile'")
