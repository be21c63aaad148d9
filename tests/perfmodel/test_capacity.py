import pytest
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.capacity import kv_capacity, predict_tpot, predict_ttft, token_budget
from servegym.perfmodel.catalog import CatalogError
from servegym.perfmodel.structural import StructuralModel


@pytest.fixture(scope="module")
def perf():
    return StructuralModel("H100-SXM", "Llama-3-8B")


def test_kv_capacity_is_memory_left_after_weights(perf):
    capacity = kv_capacity(perf, gpu_memory_utilization=0.9)
    left = 80e9 * 0.9 - perf.model.weight_bytes()
    assert capacity.num_tokens * 131072 < left
    assert capacity.num_tokens * 131072 > left - 4 * 1024**3  # activations and runtime take a few GiB at most
    assert capacity.num_tokens % 16 == 0


def test_tensor_parallelism_multiplies_kv_capacity():
    one = kv_capacity(StructuralModel("H100-SXM", "Llama-2-70B", tp=2)).num_tokens
    two = kv_capacity(StructuralModel("H100-SXM", "Llama-2-70B", tp=4)).num_tokens
    assert two > 2 * one  # weights shrink per GPU and KV heads split


def test_a_model_that_does_not_fit_is_a_clear_error():
    with pytest.raises(CatalogError, match="Llama-2-70B does not fit 1x A100-40GB"):
        kv_capacity(StructuralModel("A100-40GB", "Llama-2-70B"))


@pytest.mark.parametrize("target_ms", [12.0, 20.0, 40.0, 80.0])
def test_token_budget_meets_the_target_and_is_the_largest(perf, target_ms):
    running = StepBatch.decode(32, 32 * 1500)
    budget = token_budget(perf, target_ms, base=running)
    assert budget > 0
    assert perf.predict(running + StepBatch.prefill(budget)) <= target_ms
    assert perf.predict(running + StepBatch.prefill(budget + 1)) > target_ms


def test_token_budget_is_zero_when_the_running_batch_is_already_too_slow(perf):
    assert token_budget(perf, 1.0, base=StepBatch.decode(256, 256 * 4000)) == 0


def test_lone_request_ttft_is_its_prefill_step(perf):
    assert predict_ttft(perf, 1000) == pytest.approx(perf.predict(StepBatch.prefill(1000)))
    chunked = predict_ttft(perf, 5000, max_num_batched_tokens=2048)
    steps = [StepBatch.prefill(2048, 0), StepBatch.prefill(2048, 2048), StepBatch.prefill(904, 4096)]
    assert chunked == pytest.approx(sum(perf.predict(s) for s in steps))


def test_ttft_grows_with_the_queue_and_the_running_batch(perf):
    alone = predict_ttft(perf, 1000)
    queued = predict_ttft(perf, 1000, queued_prefill_tokens=20000)
    busy = predict_ttft(perf, 1000, queued_prefill_tokens=20000, running=StepBatch.decode(128, 128 * 2000))
    assert alone < queued < busy


def test_tpot_is_the_decode_step_with_prefill_interference(perf):
    running = StepBatch.decode(16, 16 * 1000)
    assert predict_tpot(perf, running) == perf.predict(running)
    assert predict_tpot(perf, running, prefill_tokens_per_step=512) > perf.predict(running)
