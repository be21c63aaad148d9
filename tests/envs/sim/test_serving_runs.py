"""Measured serving runs: the three readers, the workload a stage becomes, and the replay's fidelity table."""

import dataclasses
import json

import numpy as np
import pytest
from servegym.envs.sim.errors import ServingRunError
from servegym.envs.sim.serving_runs import read_runs, replay
from servegym.envs.sim.workload import RateSchedule, shared_prefix_hashes
from servegym.perfmodel.profile import Coefficients, Profile, register_profile
from servingkit import (
    BLIS_EXPERIMENT,
    blis_folder,
    plain_document,
    plain_run,
    request_rows,
    request_run,
    self_measured,
    write_csv,
)


# -- readers -----------------------------------------------------------------------------------------------
def test_blis_summaries_become_runs_with_their_stages(tmp_path):
    (run,) = read_runs(blis_folder(tmp_path / "blis"))
    assert (run.name, run.gpu, run.model, run.tp) == (BLIS_EXPERIMENT, "H100-SXM", "Llama-2-7B", 1)
    assert (run.engine.max_num_seqs, run.engine.max_num_batched_tokens, run.engine.max_model_len) == (64, 1024, 4096)
    assert [s.index for s in run.stages] == [0, 1]  # the summary row is not a stage
    first = run.stages[0]
    assert (first.rate, first.duration_s, first.arrivals) == (4.0, 10.0, "even")
    assert (first.prompt_tokens, first.output_tokens) == (260, 33)  # measured prompt mean, nominal output
    assert first.measured.tpot_mean_ms == pytest.approx((345.0 - 25.0) / 32)  # (e2e - ttft) / (output - 1)
    assert first.measured.tpot_p90_ms is None and first.measured.requests == 40
    assert (first.prefix.groups, first.prefix.users_per_group, first.prefix.system_prompt_tokens) == (3, 2, 100)
    # one experiment folder reads just that run; a Poisson load is Poisson
    assert read_runs(tmp_path / "blis" / "runs" / BLIS_EXPERIMENT)[0].name == BLIS_EXPERIMENT
    assert read_runs(blis_folder(tmp_path / "poisson", load_type="poisson"))[0].stages[1].arrivals == "poisson"


def test_malformed_blis_input_names_the_file_and_field(tmp_path):
    with pytest.raises(ServingRunError, match=r"summary_per_stage.csv:2: field 'ttft_mean_ms' .*'fast'"):
        read_runs(blis_folder(tmp_path / "a", ttft_mean="fast"))
    with pytest.raises(ServingRunError, match=r"profile.yaml: field 'load.type' must be constant or poisson"):
        read_runs(blis_folder(tmp_path / "b", load_type="ramp"))
    (blis_folder(tmp_path / "c") / "runs" / BLIS_EXPERIMENT / "profile.yaml").unlink()
    with pytest.raises(ServingRunError, match=r"profile.yaml: missing"):
        read_runs(tmp_path / "c")


def test_per_request_records_become_a_run_of_exact_arrivals(tmp_path):
    (run,) = read_runs(request_run(tmp_path))
    assert (run.gpu, run.model, run.engine.num_gpu_blocks, run.engine.max_num_seqs) == (
        "RTX-4090",
        "Llama-3.1-8B",
        2000,
        64,
    )
    (stage,) = run.stages
    rows = request_rows()
    assert stage.arrivals == "exact" and stage.measured.requests == len(rows)
    assert stage.measured.ttft_mean_ms == pytest.approx(np.mean([r["ttft_ms"] for r in rows]))
    assert stage.measured.e2e_p90_ms == pytest.approx(np.percentile([r["e2e_ms"] for r in rows], 90))
    requests, _ = run.requests()
    assert [r.arrival_s for r in requests] == [r["arrival_s"] for r in rows]
    assert [r.prompt_tokens for r in requests] == [r["input_tokens"] for r in rows]
    assert replay(run).kv_blocks == 2000  # vLLM's own block count, not the estimate


def test_malformed_per_request_input_names_the_line_and_field(tmp_path):
    rows = request_rows()
    rows[3]["output_tokens"] = -2
    with pytest.raises(ServingRunError, match=r"per_request_normalized.csv:5: field 'output_tokens'"):
        read_runs(request_run(tmp_path / "a", rows=rows))
    with pytest.raises(ServingRunError, match=r"meta.json: field 'engine_kwargs.max_num_seqs': expected a number"):
        read_runs(request_run(tmp_path / "b", meta_extra={"engine_kwargs": {"max_num_seqs": "many"}}))
    unknown = request_run(tmp_path / "c", meta_extra={"hardware": {"device_name": "NVIDIA Imaginary X1"}})
    assert "not in the catalog" in read_runs(unknown)[0].unsupported()
    dp = {"engine_kwargs": {"data_parallel_size": 2, "enable_expert_parallel": True}}
    run = read_runs(request_run(tmp_path / "d", meta_extra=dp))[0]
    assert "one replica" in run.unsupported()
    with pytest.raises(ServingRunError, match="cannot replay: data-parallel x2"):
        replay(run)


def test_the_plain_format_reads_stages_and_an_optional_request_csv(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    assert [(s.rate, s.arrivals, s.measured.tpot_mean_ms) for s in run.stages] == [
        (4, "even", 9.0),
        (8, "poisson", 10.0),
    ]
    assert run.stages[1].prefix.groups == 3 and run.stages[0].measured.tpot_p90_ms is None
    rows = [{**row, "stage": i // 15} for i, row in enumerate(request_rows())]
    write_csv(tmp_path / "requests.csv", rows)
    stages = [{"duration_s": 10, "measured": {"tpot_p90_ms": 12.5}}, {}]
    recorded = read_runs(plain_run(tmp_path / "recorded.json", stages=stages, requests_csv="requests.csv"))[0]
    assert [s.arrivals for s in recorded.stages] == ["exact", "exact"]
    assert [s.measured.requests for s in recorded.stages] == [15, 15]
    assert recorded.stages[0].measured.tpot_p90_ms == pytest.approx(
        np.percentile([r["tpot_ms"] for r in rows[:15]], 90)
    )
    assert recorded.stages[0].duration_s == 10 and recorded.stages[1].prefix.system_prompt_tokens == 100


STAGE = {"rate": 4, "duration_s": 10, "prompt_tokens": 9, "output_tokens": 9}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, r"field 'format' must be 'servegym.serving_run/1'"),
        ({"gpu": 7}, r"field 'gpu' must be a non-empty string"),
        ({"engine": {"max_num_seqs": 0}}, r"engine.max_num_seqs: must be positive"),
        ({"engine": {"max_num_sequences": 8}}, r"engine: unknown field\(s\) \['max_num_sequences'\]"),
        ({"prefix": {"groups": 2, "users_per_group": 2, "system_prompt_tokens": 9, "questions_repeat": "yes"}},
         r"prefix.questions_repeat: expected true or false"),
        ({"stages": [dict(STAGE, measured={"ttft_mean_ms": "soon"})]}, r"measured.ttft_mean_ms: expected a"),
        ({"stages": [STAGE]}, r"stages\[0\].measured: missing"),
        ({"stages": [dict(STAGE, arrivals="bursty")]}, r"stages\[0\].arrivals: must be even or poisson"),
        ({"requests_csv": "absent.csv"}, r"field 'requests_csv': no such file"),
    ],
)  # fmt: skip
def test_a_malformed_plain_run_is_named_by_file_and_field(tmp_path, change, message):
    with pytest.raises(ServingRunError, match=message):
        read_runs(plain_run(tmp_path / "bad.json", **change))


def test_a_folder_is_searched_for_runs_of_every_format(tmp_path):
    blis_folder(tmp_path / "data" / "blis")
    request_run(tmp_path / "data" / "records")
    plain_run(tmp_path / "data" / "mine.json")
    (tmp_path / "data" / "unrelated.json").write_text(json.dumps({"hello": 1}))
    names = sorted(r.name for r in read_runs(tmp_path / "data"))
    assert names == sorted([BLIS_EXPERIMENT, "RTX4090/Llama-3.1-8B", "tiny-h100"])
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    with pytest.raises(ServingRunError, match="empty: no measured run found"):
        read_runs(tmp_path / "empty")
    with pytest.raises(ServingRunError, match="no such file or folder"):
        read_runs(tmp_path / "missing")


# -- the workload of a stage -------------------------------------------------------------------------------
def test_evenly_spaced_arrivals_are_evenly_spaced_stage_after_stage(tmp_path):
    document = plain_document()
    document["stages"][1]["arrivals"] = "even"
    run = read_runs(plain_run(tmp_path / "even.json", **document))[0]
    requests, stage_of = run.requests()
    times = np.array([r.arrival_s for r in requests])
    assert np.bincount(stage_of).tolist() == [40, 80]  # rate x duration, exactly
    assert np.allclose(np.diff(times[stage_of == 0]), 0.25) and np.allclose(np.diff(times[stage_of == 1]), 0.125)
    assert times[stage_of == 0].max() < 10 <= times[stage_of == 1].min()
    schedule = RateSchedule(((2.0, 5.0), (1.0, 10.0)), cv=0)
    assert np.allclose(np.diff(schedule.arrivals(0, np.random.default_rng(0), horizon_s=2.0)), 0.2)
    poisson = dataclasses.replace(run.stages[0], arrivals="poisson")
    gaps = np.diff([r.arrival_s for r in dataclasses.replace(run, stages=(poisson,)).requests()[0]])
    assert gaps.std() > 0.05  # Poisson is not evenly spaced


def test_users_of_a_group_share_the_system_prompt_blocks_and_nothing_else(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    requests, _ = run.requests()
    shared_blocks = 100 // 16
    prefixes = {r.hash_ids[:shared_blocks] for r in requests}
    assert len(prefixes) == 3  # one per group
    assert all(len(r.hash_ids) == -(-260 // 16) for r in requests)
    rests = [h for r in requests for h in r.hash_ids[shared_blocks:]]
    assert len(rests) == len(set(rests))  # questions are each request's own
    assert shared_prefix_hashes(1, 0, 100, 100, 16)[:6] == shared_prefix_hashes(1, 9, 300, 100, 16)[:6]
    assert shared_prefix_hashes(0, 0, 100, 100, 16)[0] != shared_prefix_hashes(1, 0, 100, 100, 16)[0]


def test_users_who_repeat_their_questions_repeat_their_whole_prompt(tmp_path):
    document = plain_document(prefix={"groups": 3, "users_per_group": 2, "system_prompt_tokens": 100,
                                      "questions_repeat": True})  # fmt: skip
    requests, _ = read_runs(plain_run(tmp_path / "run.json", **document))[0].requests()
    assert len({r.hash_ids for r in requests}) == 6  # one prompt per user, every turn
    assert [r.hash_ids for r in requests[:6]] == [r.hash_ids for r in requests[6:12]]  # users take turns in order
    (blis,) = read_runs(blis_folder(tmp_path / "blis"))
    assert blis.stages[0].prefix.questions_repeat  # inference-perf cycles a fixed list of prompts


# -- replay ------------------------------------------------------------------------------------------------
def test_a_run_measured_by_the_simulator_itself_is_reproduced(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    first = replay(run)
    assert (first.table["sim_finished"] == first.table["sim_requests"]).all() and first.table["sim_requests"][0] == 40
    again = replay(self_measured(first, run))
    errors = again.table[[c for c in again.table.columns if c.endswith("_err")]].to_numpy()
    assert np.abs(errors).max() < 1e-12  # deterministic: in-sample the errors vanish
    assert not again.table["flag"].any()


def test_a_slower_profile_simulates_larger_latencies(tmp_path):
    run = read_runs(plain_run(tmp_path / "run.json"))[0]
    slow = Coefficients(gemm_flops_eff=0.2, gemm_mem_eff=0.3, attn_mem_eff=0.3, step_overhead_ms=3.0)
    register_profile(Profile("test-slow-h100", gpus={"H100-SXM": slow}))
    fast, slower = replay(run).table, replay(run, profile="test-slow-h100").table
    for metric in ("ttft", "tpot", "e2e"):
        assert (slower[f"{metric}_mean_sim_ms"] > 1.3 * fast[f"{metric}_mean_sim_ms"]).all()


def test_a_saturating_simulation_is_flagged_where_the_measurement_was_not(tmp_path):
    document = plain_document()
    document["stages"] = [dict(document["stages"][0], rate=60, duration_s=20, prompt_tokens=900, output_tokens=200)]
    run = read_runs(plain_run(tmp_path / "run.json", **document))[0]
    row = replay(run, max_stage_s=15).table.iloc[0]
    assert row["sim_saturated"] and not row["measured_saturated"]
    assert row["flag"].startswith("SATURATES") and row["sim_requests"] == 900  # 15 s of 60 req/s replayed
