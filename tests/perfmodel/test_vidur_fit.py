import json

import pytest

from perfmodel.catalog import DATA_DIR
from perfmodel.profile import default_profile
from perfmodel.vidur_fit import fit_vidur_profile, load_ops


def test_shipped_profile_is_reproduced_by_the_fit():
    refit = fit_vidur_profile().to_dict()
    shipped = json.loads((DATA_DIR / "profiles" / "default.json").read_text())
    for gpu, coefficients in shipped["gpus"].items():
        for name, value in coefficients.items():
            if isinstance(value, dict):
                assert refit["gpus"][gpu][name] == pytest.approx(value, rel=1e-6)
            else:
                assert refit["gpus"][gpu][name] == pytest.approx(value, rel=1e-6), (gpu, name)


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
