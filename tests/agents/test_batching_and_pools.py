"""LENS, LARRY, Arrow and the SLA planner: decision rules on hand-built states, and their end effects."""

from types import SimpleNamespace

import pytest
from servegym.agents.batching import Larry, Lens
from servegym.agents.pools import Arrow, SlaPlanner
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import LeastOutstandingRequests
from servegym.envs.sim.request import Request, SloClass
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel
from viewkit import info, request, snap, view


def fake_engine(n_dec=0, ctx_sum=0, waiting=0, index=0):
    """What LENS reads of an engine's view (envs.sim.policies.EngineView)."""
    return SimpleNamespace(
        index=index,
        perf=StructuralModel("H100-SXM", "Llama-3-8B"),
        num_decodes=n_dec,
        decode_context_tokens=ctx_sum,
        num_waiting=waiting,
        max_num_batched_tokens=EngineConfig().max_num_batched_tokens,
    )


def test_lens_target_grows_with_the_queue_between_its_bounds():
    lens = Lens(slo_tpot_s=0.05, t_min_s=0.015, queue_threshold=5)
    assert [lens.target_s(q) for q in (0, 5, 50)] == [0.015, 0.05, 0.05]
    assert lens.target_s(2) == pytest.approx(0.015 + 0.035 * 2 / 5)


@pytest.mark.parametrize("waiting", [0, 2, 10])
def test_lens_budget_is_the_largest_meeting_the_target(waiting):
    lens, engine = Lens(online_refit=False), fake_engine(n_dec=40, ctx_sum=40 * 1500, waiting=waiting)
    lens.attach(engine)
    budget = lens.token_budget(engine)
    target_ms = lens.target_s(waiting) * 1e3
    decodes = StepBatch.decode(40, 40 * 1500)
    assert budget > 40
    assert engine.perf.predict(decodes + StepBatch.prefill(budget - 40)) <= target_ms
    assert engine.perf.predict(decodes + StepBatch.prefill(budget - 40 + 1)) > target_ms


def test_lens_feeds_its_online_model_from_every_step():
    lens = Lens()
    cluster = Cluster(
        ClusterConfig((InstanceGroup(1, EngineConfig(noise_sigma=0.05)),)),
        LeastOutstandingRequests(),
        batch_policy=lens,
    )
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 5.0),)), lengths=LengthSampler(prompt=800, output=60), num_requests=50
    )
    cluster.run(workload.generate(0))
    assert lens.models[0].observations == cluster.engines[0].step_count


def test_larry_admits_only_when_the_expected_footprint_and_growth_reserve_fit():
    larry = Larry(output_prior=1000, reserve_fraction=0.5)
    engine = SimpleNamespace(index=0, num_running=0, num_decodes=10, free_blocks=1000, block_size=16)
    larry.attach(engine)
    candidate = Request(0, 0.0, 4000, 10, SloClass(), prefill_target=4000)
    assert larry.admit(engine, candidate, 1)  # nothing running yet
    engine.num_running = 1
    # footprint ceil(5000 / 16) = 313 blocks, reserve 10 decodes * 0.5 * 1000 / 16 = 312.5 blocks
    engine.free_blocks = 626
    assert larry.admit(engine, candidate, 1)
    engine.free_blocks = 625
    assert not larry.admit(engine, candidate, 1)


def test_larry_preempts_the_request_freeing_most_blocks_per_lost_token():
    larry = Larry()
    held = {1: 100, 2: 10, 3: 50}
    computed = {1: 1600, 2: 20, 3: 1600}
    engine = SimpleNamespace(
        running_requests=lambda: tuple(SimpleNamespace(id=i) for i in (1, 2, 3)),
        held_blocks=lambda r: held[r.id],
        computed_tokens=lambda r: computed[r.id],
    )
    assert larry.choose_victim(engine).id == 2  # 10 / 21 beats 100 / 1601


def test_larry_keeps_preemptions_rare_under_kv_pressure():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 12.0),)),
        lengths=LengthSampler("lognormal", prompt=1500, output=400, prompt_sigma=0.5, output_sigma=0.8),
        num_requests=400,
    )
    engine = EngineConfig(gpu="A100-80GB", gpu_memory_utilization=0.3)

    def run(policy):
        cluster = Cluster(ClusterConfig((InstanceGroup(1, engine),)), LeastOutstandingRequests(), batch_policy=policy)
        return cluster.run(workload.generate(0)).summary()

    vllm, larry = run(None), run(Larry())
    assert vllm["preemptions"] > 50
    assert larry["preemptions"] < vllm["preemptions"] / 5


def test_arrow_prefill_cost_is_lexicographic_and_slo_aware():
    arrow = Arrow(slo_ttft_s=1.0)
    v = view(
        [snap(role="prefill", decode_kv=5000), snap(role="prefill", decode_kv=0, pending=600_000), snap(role="decode")]
    )
    assert arrow.prefill_time_s(v, 1) > 1.0  # its queue alone misses the TTFT SLO
    assert arrow.route(request(), v) == 0  # fewer resident decode tokens loses to meeting the SLO
    v2 = view([snap(role="prefill", decode_kv=5000), snap(role="prefill", decode_kv=0), snap(role="decode")])
    assert arrow.route(request(), v2) == 1  # both meet it: the fewer resident decode tokens


def test_arrow_decode_placement_respects_max_resident_tokens():
    arrow = Arrow(slo_tpot_s=0.05)
    limit = arrow.max_decode_tokens(info(0))
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    seqs = limit // 1024
    assert perf.predict(StepBatch.decode(seqs, limit - seqs)) <= 50.0
    v = view(
        [
            snap(role="prefill"),
            snap(role="decode", decode_kv=limit - 100, pending=0),
            snap(role="decode", decode_kv=limit - 5000, pending=3000),
        ]
    )
    assert arrow.route_decode(request(prompt=1000), v) == 2  # 1 would exceed MT


def test_arrow_flips_a_prefill_instance_when_decode_stays_overloaded():
    arrow = Arrow(slo_tpot_s=0.05, sustain=3, cooldown_s=0)
    busy = [
        snap(role="prefill", pending=60_000),
        snap(role="prefill", pending=58_000),
        snap(role="decode", step_ms=80),
        snap(role="decode", step_ms=90),
    ]
    prefill_load, decode_load = arrow.loads(view(busy))
    assert 0.5 < prefill_load < 1.0 and decode_load == pytest.approx(1.7)
    assert arrow.rebalance(view(busy, now=1)) == []
    assert arrow.rebalance(view(busy, now=2)) == []
    assert arrow.rebalance(view(busy, now=3)) == [(1, "decode")]  # sustained: the least resident work flips


def test_arrow_moves_idle_prefill_capacity_to_a_busy_decode_pool_at_once():
    arrow = Arrow(slo_tpot_s=0.05, cooldown_s=10)
    idle_prefill = [
        snap(role="prefill"),
        snap(role="prefill", decodes=1, decode_kv=10),
        snap(role="decode", step_ms=40),
    ]
    assert arrow.rebalance(view(idle_prefill, now=1)) == [(1, "decode")]  # already serving decodes: preferred
    assert arrow.rebalance(view(idle_prefill, now=5)) == []  # cooldown


def test_sla_planner_sizes_pools_for_the_forecast():
    planner = SlaPlanner(slo_tpot_s=0.05, smoothing=1.0, cooldown_s=0)
    roles = ["prefill"] * 2 + ["decode"] * 6
    v = view([snap(role=r) for r in roles], now=1.0)
    for i in range(200):  # 200 requests of 4000 prompt tokens in one second
        planner.on_arrival(request(prompt=4000, rid=i))
    flips = planner.rebalance(v)
    prefill, decode = planner.targets(v)
    assert prefill > 2 and flips and flips[0][1] == "prefill"
    assert prefill + decode <= 8
