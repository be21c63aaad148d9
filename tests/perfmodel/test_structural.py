import numpy as np
import pytest
from servegym.perfmodel.batch import BatchError, StepBatch, StepBatchArray
from servegym.perfmodel.catalog import CatalogError
from servegym.perfmodel.structural import StructuralModel


@pytest.fixture(scope="module")
def h100_8b():
    return StructuralModel("H100-SXM", "Llama-3-8B")


def test_decode_cost_grows_with_context(h100_8b):
    short = h100_8b.predict(StepBatch.decode(64, 64 * 128))
    long = h100_8b.predict(StepBatch.decode(64, 64 * 8192))
    assert long > short * 1.3
    assert (
        h100_8b.terms(StepBatch.decode(64, 64 * 8192))["attention"]
        > 4 * h100_8b.terms(StepBatch.decode(64, 64 * 128))["attention"]
    )


def test_prefill_attention_is_quadratic_in_chunk_length(h100_8b):
    a1 = h100_8b.terms(StepBatch.prefill(4096))["attention"] - h100_8b.terms(StepBatch.prefill(1))["attention"]
    a2 = h100_8b.terms(StepBatch.prefill(8192))["attention"] - h100_8b.terms(StepBatch.prefill(1))["attention"]
    assert a2 / a1 == pytest.approx(4.0, rel=0.05)


def test_tensor_parallelism_divides_weight_traffic():
    batch = StepBatch.decode(1, 100)
    tp1 = StructuralModel("H100-SXM", "Llama-2-70B", tp=1).terms(batch)
    tp2 = StructuralModel("H100-SXM", "Llama-2-70B", tp=2).terms(batch)
    assert tp2["linear"] / tp1["linear"] == pytest.approx(0.5, rel=0.1)
    assert tp1["communication"] == 0.0 < tp2["communication"]


def test_weight_reading_bounds_a_small_decode_from_below(h100_8b):
    weights = h100_8b.model.weight_bytes() / h100_8b.gpu.bandwidth * 1e3
    assert weights < h100_8b.predict(StepBatch.decode(1, 10)) < 2.5 * weights


def test_moe_decode_reads_only_the_routed_experts():
    mixtral = StructuralModel("H100-SXM", "Mixtral-8x7B", tp=2)
    one, many = mixtral.terms(StepBatch.decode(1, 100)), mixtral.terms(StepBatch.decode(256, 256 * 100))
    assert many["linear"] > 2.5 * one["linear"]  # 256 tokens touch all 8 experts, one token touches 2


def test_faster_gpu_and_smaller_dtype_are_faster():
    batch = StepBatch.from_seqs([(1024, 0)] + [(1, 2000)] * 32)
    a100 = StructuralModel("A100-80GB", "Llama-3-8B").predict(batch)
    h100 = StructuralModel("H100-SXM", "Llama-3-8B").predict(batch)
    fp8 = StructuralModel("H100-SXM", "Llama-3-8B", dtype="fp8").predict(batch)
    assert fp8 < h100 < a100


def test_latency_is_monotone_in_tokens(h100_8b):
    tokens = np.arange(1, 8193)
    batches = StepBatchArray(
        tokens, np.ones_like(tokens), np.zeros_like(tokens), tokens * (tokens + 1) / 2, tokens, np.zeros_like(tokens)
    )
    assert np.all(np.diff(h100_8b.predict_many(batches)) >= 0)


def test_scalar_and_vector_paths_agree(h100_8b):
    batches = [StepBatch.from_seqs(s) for s in ([(1, 5)], [(512, 0), (1, 900)], [(8000, 3000)], [(1, 1)] * 300)]
    vector = h100_8b.predict_many(StepBatchArray.from_batches(batches))
    np.testing.assert_allclose(vector, [h100_8b.predict(b) for b in batches], rtol=1e-12)
    assert h100_8b.predict(StepBatch()) == 0.0


def test_batch_aggregates_add_up():
    batch = StepBatch.from_seqs([(512, 100), (1, 900), (1, 99)])
    assert batch == StepBatch.prefill(512, 100) + StepBatch.decode(2, 999)
    assert (batch.num_tokens, batch.num_seqs, batch.num_decodes, batch.prefill_tokens) == (514, 3, 2, 512)


@pytest.mark.parametrize(
    ("seqs", "message"),
    [
        ([(-1, 3)], "new_tokens must be non-negative"),
        ([(0, 3)], "at least 1"),
        ([(2.5, 3)], "must be an integer"),
        ([(1,)], "expected \\[new_tokens, context_tokens\\]"),
    ],
)
def test_malformed_sequences_are_rejected(seqs, message):
    with pytest.raises(BatchError, match=message):
        StepBatch.from_seqs(seqs)


def test_tp_must_divide_heads():
    with pytest.raises(CatalogError, match="tp=3 does not divide"):
        StructuralModel("H100-SXM", "Llama-3-8B", tp=3)


def test_eager_steps_wait_on_host_launches_and_cuda_graphs_remove_the_wait():
    # Llama-3-8B over 8 GPUs decoding one sequence with a slow host (20 us a launch): each shard's kernels
    # are shorter than their launches
    slow_host = StructuralModel("H100-SXM", "Llama-3-8B").coefficients.with_values({"host_launch_ms": 0.02})
    eager = StructuralModel("H100-SXM", "Llama-3-8B", tp=8, coefficients=slow_host, cuda_graphs=False)
    graphed = StructuralModel("H100-SXM", "Llama-3-8B", tp=8, coefficients=slow_host, cuda_graphs=True)
    small, mixed = StepBatch.decode(1, 100), StepBatch.decode(1, 100) + StepBatch.prefill(512)
    t = eager.terms(small)
    gpu = t["linear"] + t["attention"] + t["communication"]
    kernels = 32 * (2 + 1 + 1 + 2 + 4 + 1 + 2) + 2  # norms, RoPE, act, adds, GEMMs, attention, all-reduces
    host = kernels * eager.coefficients.host_launch_ms
    assert host > gpu  # launch-bound: the step takes about the host's time, not the sum of both
    assert max(gpu, host) < gpu + t["host_wait"] < gpu + host
    assert eager.predict(small) > graphed.predict(small)
    assert graphed.terms(small)["host_wait"] < 1e-6  # one graph launch
    assert graphed.predict(mixed) == eager.predict(mixed)  # a step with a prefill chunk launches eagerly
    # a GPU-bound step hardly waits: a big model on one GPU
    big = StructuralModel("H100-SXM", "Llama-2-70B", cuda_graphs=False).terms(StepBatch.decode(32, 32 * 1024))
    assert big["host_wait"] < 1e-3 * big["linear"]
    many = graphed.predict_many(StepBatchArray.from_batches([small, mixed]))
    assert list(many) == pytest.approx([graphed.predict(small), graphed.predict(mixed)], rel=1e-12)
