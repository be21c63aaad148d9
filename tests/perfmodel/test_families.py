import numpy as np
import pytest
from servegym.perfmodel.batch import StepBatch, StepBatchArray
from servegym.perfmodel.families import ArrowModel, RooflineModel, SaturationModel
from servegym.perfmodel.structural import StructuralModel


def _batches(seed=0, count=300):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        decodes = int(rng.integers(0, 64))
        batch = StepBatch.decode(decodes, decodes * int(rng.integers(10, 2000))) if decodes else StepBatch()
        if decodes == 0 or rng.random() < 0.4:
            batch = batch + StepBatch.prefill(int(rng.integers(16, 4096)), int(rng.choice([0, 1024])))
        batches.append(batch)
    return StepBatchArray.from_batches(batches)


def test_roofline_is_a_lower_bound_of_the_calibrated_model():
    batches = _batches()
    roofline = RooflineModel("H100-SXM", "Llama-3-8B").predict_many(batches)
    calibrated = StructuralModel("H100-SXM", "Llama-3-8B").predict_many(batches)
    assert np.all(roofline < calibrated)


def test_arrow_recovers_its_own_coefficients():
    batches = _batches()
    truth = ArrowModel(np.array([2.0, 0.03, 1e-5, 4e-4]))
    fitted = ArrowModel.fit(batches, truth.predict_many(batches))
    np.testing.assert_allclose(fitted.params, truth.params, rtol=1e-6)


def test_saturation_fits_its_own_curve():
    batches = _batches()
    truth = SaturationModel(np.array([2e-3, 0.3, 0.004, 0.02, 1e-4, 1.5]))
    latency = truth.predict_many(batches)
    fitted = SaturationModel.fit(batches, latency)
    assert np.mean(np.abs(fitted.predict_many(batches) / latency - 1)) < 0.01


@pytest.mark.parametrize("family", [ArrowModel, SaturationModel])
def test_fitted_families_approach_the_structural_model_on_one_configuration(family):
    """Fitted per configuration, each family interpolates the structural model's own predictions decently."""
    structural = StructuralModel("A100-80GB", "Llama-3-8B")
    train, test = _batches(1), _batches(2)
    fitted = family.fit(train, structural.predict_many(train))
    error = np.mean(np.abs(fitted.predict_many(test) / structural.predict_many(test) - 1))
    assert error < 0.3
