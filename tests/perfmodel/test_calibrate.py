import json
import re

import numpy as np
import pytest
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.calibrate import calibrate
from servegym.perfmodel.cli import main
from servegym.perfmodel.profile import Profile, default_profile
from servegym.perfmodel.steplog import StepRecord
from servegym.perfmodel.structural import StructuralModel


def _truth():
    """A GPU that behaves unlike the shipped profile: slower GEMMs, faster attention, more CPU overhead."""
    c = default_profile().coefficients("H100-SXM")
    return c.with_values(
        {
            "gemm_flops_eff": 0.55,
            "gemm_mem_eff": 0.7,
            "attn_flops_eff": 0.65,
            "attn_mem_eff": 0.8,
            "step_overhead_ms": 2.5,
            "seq_overhead_ms": 0.012,
            "comm_link_eff": 0.5,
        }
    )


def _steps(model, tps, count, seed, truth=None):
    rng = np.random.default_rng(seed)
    truth = truth or _truth()
    records = []
    for index in range(count):
        tp = tps[index % len(tps)]
        decodes = int(rng.integers(0, 128))
        seqs = [[1, int(rng.integers(16, 4000))] for _ in range(decodes)]
        if decodes == 0 or rng.random() < 0.5:
            seqs.append([int(2 ** rng.uniform(4, 12)), int(rng.choice([0, 512, 2048]))])
        batch = StepBatch.from_seqs(seqs)
        latency = StructuralModel("H100-SXM", model, tp=tp, coefficients=truth, cuda_graphs=False).predict(batch)
        latency *= rng.lognormal(0.0, 0.02)
        raw = {"gpu": "H100-SXM", "model": model, "tp": tp, "seqs": seqs, "latency_ms": latency}
        records.append(StepRecord("H100-SXM", model, tp, "bf16", batch, latency, raw))
    return records


def _mape(profile, records):
    errors = [
        abs(
            StructuralModel(r.gpu, r.model, r.tp, profile=profile, cuda_graphs=False).predict(r.batch) / r.latency_ms
            - 1
        )
        for r in records
    ]
    return float(np.mean(errors))


def test_calibration_transfers_to_unseen_models_and_tp_degrees():
    profile = calibrate(_steps("Llama-3-8B", [1, 2], 300, seed=0))
    unseen = _steps("Llama-2-70B", [4, 8], 100, seed=1) + _steps("Qwen2.5-32B", [4], 50, seed=2)
    assert _mape(default_profile(), unseen) > 0.15
    assert _mape(profile, unseen) < 0.05
    assert profile.provenance["fit"]["H100-SXM"]["tp"] == [1, 2]


def test_terms_that_do_not_shrink_with_tp_transfer_to_held_out_degrees(tmp_path, capsys):
    """A slow host (launch-bound small shards), slow all-reduces and costly kernels: what a fit on TP 1, 2 and 4
    must separate from the terms that shrink with TP to predict TP 8, where they dominate."""
    truth = _truth().with_values({"host_launch_ms": 0.012, "comm_latency_ms": 0.05, "gemm_launch_ms": 0.012})
    records = _steps("Llama-3-8B", [1, 2, 4, 8], 480, seed=5, truth=truth)
    measured = tmp_path / "measured.jsonl"
    measured.write_text("".join(json.dumps(r.raw) + "\n" for r in records))
    assert main(["calibrate", str(measured), "--out", str(tmp_path / "p.json"), "--hold-out-tp", "8"]) == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if "TP 8:" in text)
    calibrated, base = (float(x) for x in re.findall(r"([\d.]+)% /", line))
    assert base > 15.0 and calibrated < 5.0, line
    eight = [r for r in records if r.tp == 8]
    host_bound = StructuralModel("H100-SXM", "Llama-3-8B", tp=8, coefficients=truth, cuda_graphs=False)
    assert np.mean([host_bound.terms(r.batch)["host_wait"] > 0.1 for r in eight]) > 0.3  # the regime is exercised
    assert main(["calibrate", str(measured), "--out", str(tmp_path / "q.json"), "--hold-out-tp", "1,2,4,8"]) == 2
    assert "leaves nothing to fit" in capsys.readouterr().err


def test_gpus_absent_from_the_log_keep_their_profile():
    profile = calibrate(_steps("Llama-3-8B", [1], 60, seed=3))
    assert profile.gpus["A100-80GB"] == default_profile().gpus["A100-80GB"]


def test_cli_calibrate_then_predict_with_the_profile(tmp_path, capsys):
    measured = tmp_path / "measured.jsonl"
    measured.write_text("".join(json.dumps(r.raw) + "\n" for r in _steps("Llama-3-8B", [1, 2], 120, seed=4)))
    out = tmp_path / "profile.json"
    assert main(["calibrate", str(measured), "--out", str(out)]) == 0
    assert "in-sample MAPE" in capsys.readouterr().out
    assert Profile.load(out).provenance["fit"]["H100-SXM"]["tp"] == [1, 2]
    query = tmp_path / "query.jsonl"
    query.write_text(json.dumps({"gpu": "H100-SXM", "model": "Llama-2-70B", "tp": 4, "seqs": [[512, 0], [1, 900]]}))
    assert main(["predict", str(query), "--profile", str(out)]) == 0
    predicted = json.loads(capsys.readouterr().out)["latency_ms"]
    truth = StructuralModel("H100-SXM", "Llama-2-70B", tp=4, coefficients=_truth()).predict_seqs([(512, 0), (1, 900)])
    assert predicted == pytest.approx(truth, rel=0.05)


def test_calibrate_needs_latencies(tmp_path, capsys):
    measured = tmp_path / "measured.jsonl"
    measured.write_text(json.dumps({"gpu": "H100-SXM", "model": "Llama-3-8B", "seqs": [[1, 5]]}) + "\n")
    assert main(["calibrate", str(measured), "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {measured}:1: missing field(s) latency_ms"
