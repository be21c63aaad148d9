"""Export of a trained run to ONNX: parity with stable-baselines3, loading as a router, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from servegym.agents.exported import ExportedRouter, ExportError, OnnxPolicy, export_run, parity
from servegym.agents.harness import Task, run_task, saved_policy_spec
from servegym.agents.learned import ContractMismatch
from servegym.experiments.evaluate import run as evaluate
from servegym.experiments.export import recorded_observations

ROOT = Path(__file__).resolve().parents[2]

WORKLOAD = {
    "kind": "synthetic",
    "num_requests": 150,
    "arrivals": {"rate": 40.0},
    "lengths": {"kind": "lognormal", "prompt": 600, "output": 80},
}
CLUSTER = {"groups": [{"count": 2, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A100-80GB"}}]}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    run, _ = trained_run
    return run, export_run(run, tmp_path_factory.mktemp("export"))


def test_the_manifest_describes_inputs_features_and_provenance(exported):
    run, out = exported
    manifest = json.loads((out / "policy.json").read_text())
    size = manifest["inputs"]["observation"]["shape"][1]
    assert len(manifest["feature_names"]) == size
    assert manifest["feature_names"][0] == "engine0." + manifest["features"]["engine_features"][0]["name"]
    assert manifest["env_id"] == "servegym/Route-v0" and manifest["env_version"] == "0"
    assert manifest["git_revision"] == json.loads((run / "manifest.json").read_text())["git_revision"]
    assert manifest["source_run"] == str(run.resolve())
    assert "engine" in manifest["action"]
    for feature in manifest["features"]["engine_features"]:
        assert {"name", "unit", "scale", "low", "high"} <= set(feature)


def test_onnx_equals_the_sb3_policy_on_recorded_observations(exported):
    run, out = exported
    observations, masks = recorded_observations(run, 300, seed=7)
    assert len(observations) == 300
    report = parity(run, out, observations, masks)
    assert report["action_agreement"] == 1.0
    assert report["max_logit_difference"] < 1e-4


def test_the_batch_dimension_is_dynamic(exported):
    run, out = exported
    observations, masks = recorded_observations(run, 16, seed=3)
    policy = OnnxPolicy(out)
    batched_actions, batched_logits = policy(observations[:7], masks[:7])
    for i in range(7):
        action, logits = policy(observations[i : i + 1], masks[i : i + 1])
        assert action[0] == batched_actions[i]
        np.testing.assert_allclose(logits[0], batched_logits[i], atol=1e-5)
        assert masks[i, action[0]]  # never a masked engine


def test_exported_and_original_route_identically_in_the_harness(exported):
    run, out = exported
    rows = [
        run_task(Task(name, "w", 5, 1.0), saved_policy_spec(p), WORKLOAD, CLUSTER)
        for name, p in (("sb3", run), ("onnx", out))
    ]
    assert rows[0]["completed"] == rows[1]["completed"] == 150
    for key in ("slo_attainment", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "tpot_p99_s"):
        assert rows[0][key] == rows[1][key], key


def test_a_manifest_on_another_feature_contract_is_refused(exported, tmp_path):
    _, out = exported
    shutil.copytree(out, tmp_path / "x")
    manifest = json.loads((tmp_path / "x" / "policy.json").read_text())
    manifest["features"]["engine_features"][4]["scale"] *= 2
    (tmp_path / "x" / "policy.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractMismatch, match="engine_features differs"):
        ExportedRouter(tmp_path / "x")


def test_a_graph_that_does_not_match_its_manifest_is_refused(exported, tmp_path):
    _, out = exported
    shutil.copytree(out, tmp_path / "x")
    (tmp_path / "x" / "policy.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="checksum"):
        ExportedRouter(tmp_path / "x")
    with pytest.raises(ExportError, match=r"no model\.zip"):
        export_run(tmp_path / "missing")


def test_the_export_command_checks_parity(trained_run, tmp_path):
    run, _ = trained_run
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments/export.py"), f"run={run}", f"out={tmp_path}", "check.decisions=128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "actions agree 100.0%" in result.stdout
    assert (tmp_path / "policy.onnx").exists()


def test_evaluate_compares_saved_runs_and_exports_with_the_heuristics(exported, tmp_path):
    from hydra import compose, initialize_config_dir

    run, out = exported
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                "policies=[vllm_rr,vllm_jsq]",
                f"+saved.trained={run}",
                f"+saved.onnx={out}",
                "seeds=[0,1]",
                "jobs=1",
                "progress=false",
                "+workload_overrides={azure_conv: {num_requests: 300, random_window: true}}",
            ],
        )
    table = evaluate(cfg, tmp_path)["table"].set_index("policy")
    assert set(table.index) == {"vllm_rr", "vllm_jsq", "trained", "onnx"}
    assert table.loc["trained", "slo_attainment"] == table.loc["onnx", "slo_attainment"]
    duel = (tmp_path / "head_to_head_trained.csv").read_text()
    assert "vllm_jsq" in duel and "onnx" in duel


def test_evaluate_names_a_bad_saved_path_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments/evaluate.py"), f"+saved.x={tmp_path}/missing", "seeds=[0]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "neither an exported policy" in result.stderr and "Traceback" not in result.stderr
