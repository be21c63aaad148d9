"""Profiles by name, path or registration, and the one shared cache of structural models."""

import pytest
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.catalog import CatalogError
from servegym.perfmodel.profile import Profile, load_profile, register_profile, shipped_profiles
from servegym.perfmodel.structural import structural_model

PREFILL = StepBatch.prefill(4096)


def _slow(name: str) -> Profile:
    """The default profile with every H100 GEMM efficiency halved (a visibly different calibration)."""
    base = load_profile("default")
    h100 = base.coefficients("H100-SXM")
    slow = h100.with_values({"gemm_flops_eff": h100.gemm_flops_eff / 2, "gemm_mem_eff": h100.gemm_mem_eff / 2})
    return Profile(name=name, gpus={**base.gpus, "H100-SXM": slow}, provenance={"made_by": "a test"})


def test_the_default_is_shipped_and_found_by_name():
    assert "default" in shipped_profiles()
    assert load_profile(None) is load_profile("default")
    assert load_profile("default").gpus  # the Vidur fit, not the priors


def test_a_profile_file_is_found_by_path(tmp_path):
    path = tmp_path / "slow.json"
    _slow("slow-file").save(path)
    loaded = load_profile(str(path))
    assert loaded.name == "slow-file" and loaded.provenance == {"made_by": "a test"}
    fast = structural_model("H100-SXM", "Llama-3-8B")
    slow = structural_model("H100-SXM", "Llama-3-8B", profile=str(path))
    assert slow is structural_model("H100-SXM", "Llama-3-8B", profile=str(path))  # shared, built once
    assert slow.predict(PREFILL) > 1.5 * fast.predict(PREFILL)


def test_an_unknown_profile_is_named_with_what_is_known():
    with pytest.raises(CatalogError, match=r"unknown profile 'nope'.*default"):
        load_profile("nope")
    with pytest.raises(CatalogError, match=r"unknown profile '/no/such\.json'"):
        structural_model("H100-SXM", "Llama-3-8B", profile="/no/such.json")


def test_a_registered_profile_replaces_the_cached_models_of_its_name():
    register_profile(_slow("candidate"))
    first = structural_model("H100-SXM", "Llama-3-8B", profile="candidate")
    register_profile(load_profile("default").__class__(name="candidate", gpus=load_profile("default").gpus))
    second = structural_model("H100-SXM", "Llama-3-8B", profile="candidate")
    assert second is not first
    assert second.predict(PREFILL) == pytest.approx(structural_model("H100-SXM", "Llama-3-8B").predict(PREFILL))
