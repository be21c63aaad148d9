"""The serving calibration recovers coefficients from runs the simulator itself measured under them."""

import numpy as np
import pytest
from servegym.envs.sim.serving_calibration import fit_serving, profile_with, residuals, terms_for
from servegym.envs.sim.serving_runs import read_runs, replay
from servegym.perfmodel.profile import load_profile, register_profile
from servingkit import plain_run, self_measured

TRUTH = {"step_overhead_ms": 0.4, "request_overhead_ms": 12.0, "attn_mem_eff": 0.8, "gemm_pad_tokens": 40.0}


def test_the_terms_a_run_identifies(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    labels = [t.label for t in terms_for([run])]
    # no TP > 1: no all-reduce latency
    assert labels == ["step_overhead_ms", "request_overhead_ms", "H100-SXM.attn_mem_eff", "H100-SXM.gemm_pad_tokens"]


def test_a_fit_recovers_the_coefficients_that_produced_the_measurement(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    terms = terms_for([run])
    truth = profile_with(load_profile("vidur"), terms, [TRUTH[t.name] for t in terms], "test-truth")
    register_profile(truth)
    measured = self_measured(replay(run, profile="test-truth"), run)
    before = residuals(replay(measured).table)
    fit = fit_serving([measured], max_stage_s=None, max_evaluations=40, name="test-fitted")
    recovered = dict(zip([t.name for t in fit.terms], fit.values, strict=True))
    register_profile(fit.profile)
    after = residuals(replay(measured, profile="test-fitted").table)
    assert np.abs(after).max() < 0.03 < np.abs(before).max()  # the default misses by more than 3%, the fit does not
    assert recovered["request_overhead_ms"] == pytest.approx(12.0, abs=2.0)
    assert fit.profile.provenance["serving_fit"]["runs"] == [run.name]
