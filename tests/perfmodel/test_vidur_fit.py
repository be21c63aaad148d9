import json

import pytest
from servegym.perfmodel.catalog import DATA_DIR
from servegym.perfmodel.profile import default_profile, load_profile
from servegym.perfmodel.vidur_fit import fit_vidur_profile, load_ops


def test_shipped_vidur_profile_is_reproduced_by_the_fit():
    refit = fit_vidur_profile().to_dict()
    shipped = json.loads((DATA_DIR / "profiles" / "vidur.json").read_text())
    for gpu, coefficients in shipped["gpus"].items():
        for name, value in coefficients.items():
            if isinstance(value, dict):
                assert refit["gpus"][gpu][name] == pytest.approx(value, rel=1e-6)
            else:
                assert refit["gpus"][gpu][name] == pytest.approx(value, rel=1e-6), (gpu, name)


def test_the_default_profile_is_the_vidur_fit_calibrated_on_serving():
    default, vidur = default_profile(), load_profile("vidur")
    assert set(default.gpus) == set(vidur.gpus)
    fit = default.provenance["serving_fit"]
    assert fit["base"] == "vidur" and fit["runs"] and "max_abs_error" in fit
    for name in ("gemm_flops_eff", "gemm_mem_eff", "gemm_smoothness"):  # operator-level terms stay Vidur's
        assert default.gpus["A100-80GB"].value(name) == vidur.gpus["A100-80GB"].value(name)
    assert default.gpus["H100-SXM"].request_overhead_ms > 0 == vidur.gpus["H100-SXM"].request_overhead_ms


def test_measured_gpus_and_families():
    profile = default_profile()
    assert set(profile.gpus) == {"A100-80GB", "A40", "H100-SXM"}
    assert profile.source_of("H200") == "family hopper (H100-SXM)"
    assert profile.source_of("L40S") == "family ampere (A100-80GB, A40)"
    assert profile.coefficients("H200") == profile.gpus["H100-SXM"]


def test_bundled_measurements_cover_three_gpus_and_eight_models():
    ops = load_ops()
    assert set(ops["gpu"]) == {"A100-80GB", "A40", "H100-SXM"}
    assert ops["model"].nunique() == 8
    assert set(ops["tp"]) == {1, 2, 4, 8}
