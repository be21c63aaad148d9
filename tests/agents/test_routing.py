"""Each router's decision rule pinned on small hand-built states."""

import pytest
from servegym.agents.routing.cache_aware import PrefixAware, PrismCacheBalance, WeightedScorer
from servegym.agents.routing.classic import (
    JoinShortestQueue,
    LeastKvUsage,
    LeastResidentDecode,
    PowerOfTwoChoices,
    RandomRouter,
    TokenAware,
)
from servegym.agents.routing.predictive import BlockPredictive, Prism, SloPartitionPrism
from servegym.envs.features import ENGINE_FEATURES, FeatureContext, FeatureSpec
from servegym.envs.sim.prefix_index import capacity_segments
from servegym.envs.sim.request import SloClass
from servegym.envs.sim.view import RequestInfo
from viewkit import info, request, snap, view


def test_jsq_counts_snapshot_queues_plus_what_it_sent_since():
    router = JoinShortestQueue()
    v = view([snap(running=3, waiting=1), snap(running=2, waiting=0), snap(running=2, waiting=1)])
    assert router.route(request(), v) == 1  # 2 < 3 < 4
    assert router.route(request(), v) == 1  # 1 now has 2 + 1 routed since = 3: tie with 2 goes to the lower index
    assert router.route(request(), v) == 2
    fresh = view([snap(time_s=0.1, running=3, waiting=1), snap(time_s=0.1, running=2), snap(time_s=0.1, running=2)])
    assert router.route(request(), fresh) == 1  # a new snapshot resets the correction


def test_least_kv_usage_includes_prompt_blocks_sent_since():
    router = LeastKvUsage()
    v = view([snap(kv=0.30), snap(kv=0.29)])
    assert router.route(request(prompt=20_000), v) == 1
    assert router.route(request(), v) == 0  # 0.29 + 20000 / (25000 * 16) = 0.34 > 0.30


def test_power_of_two_picks_the_less_loaded_of_two_and_is_seeded():
    picks = [PowerOfTwoChoices(seed=3).route(request(), view([snap()] * 4, outstanding=[5, 1, 9, 1])) for _ in range(2)]
    assert picks[0] == picks[1]
    router = PowerOfTwoChoices(seed=0)
    choices = [router.route(request(), view([snap()] * 3, outstanding=[0, 10, 20])) for _ in range(200)]
    assert 2 not in choices  # the most loaded never wins a pair
    assert set(choices) == {0, 1}


def test_random_router_is_seeded_and_uniform():
    a = [RandomRouter(seed=1).route(request(), view([snap()] * 4)) for _ in range(3)]
    router = RandomRouter(seed=1)
    counts = [0] * 4
    for _ in range(4000):
        counts[router.route(request(), view([snap()] * 4))] += 1
    assert len(set(a)) == 1 and min(counts) > 900


def test_token_aware_weighs_pending_prompt_tokens_and_expected_decodes():
    router = TokenAware(output_prior=100)
    v = view([snap(pending=5000), snap(pending=0)], outstanding=[1, 60])
    assert router.load(v, 0) == 5000 + 100 and router.load(v, 1) == 6000
    assert router.route(request(prompt=500), v) == 0
    router.on_completion(request(), 0, 10_100, 1.0)  # mean output learns: 100 + 0.01 * 10000 = 200
    assert router.outputs.mean == pytest.approx(200)


def test_decode_placement_prefers_least_resident_tokens_among_decode_instances():
    router = LeastResidentDecode()
    v = view(
        [snap(decode_kv=0, role="prefill"), snap(decode_kv=9000, role="decode"), snap(decode_kv=4000, role="decode")]
    )
    assert router.route_decode(request(prompt=6000), v) == 2
    # the counts are the router's live ones (the handoff it just made is in the next view), no correction on top
    assert router.route_decode(request(prompt=100), v) == 2
    after = view(
        [snap(decode_kv=0, role="prefill"), snap(decode_kv=9000, role="decode"), snap(decode_kv=10_000, role="decode")]
    )
    assert router.route_decode(request(prompt=100), after) == 1


def test_llmd_scorer_sums_prefix_queue_and_kv_scores():
    router = WeightedScorer()
    v = view([snap(waiting=4, kv=0.5), snap(waiting=0, kv=0.9)])
    scores = router.scores(request(hashes=(1, 2)), v)
    assert scores[0] == pytest.approx(2 * 0 + (1 - 4 / 4) + 0.5)
    assert scores[1] == pytest.approx(2 * 0 + 1 + 0.1)
    assert router.route(request(hashes=(1, 2)), v) == 1
    assert router.scores(request(hashes=(1, 2, 3, 4)), v)[1] == pytest.approx(2 * 0.5 + 1 + 0.1)


def test_prefix_aware_follows_the_prefix_unless_load_is_imbalanced():
    router = PrefixAware(balance_abs=4, balance_rel=1.5)
    balanced = view([snap(), snap()], outstanding=[3, 2])
    first = router.route(request(hashes=(7, 8, 9)), balanced)
    assert first == 1  # no match yet: the smaller believed cache (both empty) and fewer outstanding
    assert router.route(request(hashes=(7, 8, 5)), view([snap(), snap()], outstanding=[0, 3])) == 1  # 2/3 match
    assert router.route(request(hashes=(7, 8, 9)), view([snap(), snap()], outstanding=[0, 9])) == 0  # imbalanced


def test_the_contracts_prefix_match_is_the_share_of_the_prompt_the_router_sent_there_as_llmd_scores_it():
    spec, context, scorer = FeatureSpec(3), FeatureContext(), WeightedScorer(queue_weight=0.0, kv_weight=0.0)
    small = [info(0), info(1), info(2, kv_tokens=1024)]  # engine 2's cache covers two 512-token segments
    v = view([snap(), snap(), snap()], infos=small)
    for hashes, engine in (((1, 2, 3, 4), 1), ((1, 2, 3, 4), 2), ((9,), 0)):
        context.observe_route(request(hashes=hashes), engine, v)
        scorer.index.add(engine, hashes, capacity_segments(v, engine))
    column = [f.name for f in ENGINE_FEATURES].index("prefix_match")
    asked = request(hashes=(1, 2, 7, 8))
    rows, _ = spec.raw(v, asked, context)
    assert list(rows[:, column]) == [0.0, 0.5, 0.0]  # engine 2 forgot 1 and 2 (it holds 3 and 4)
    assert list(rows[:, column]) == [scorer.scores(asked, v)[i] / 2.0 for i in range(3)]  # llm-d's prefix term
    rows, _ = spec.raw(v, request(), context)
    assert not rows[:, column].any()  # a prompt without hashes matches nothing
    fill = rows[:, [f.name for f in ENGINE_FEATURES].index("cache_fill")]  # what PrefixAware's fallback reads
    assert list(fill) == [1 / 781, 4 / 781, 2 / 2]  # 400,000 KV tokens hold 781 segments; engine 2 holds 2
    assert list(fill) == [scorer.index.size(i) / capacity_segments(v, i) for i in range(3)]


def test_prism_cache_balance_follows_the_prefix_and_starts_new_sessions_on_the_emptiest_cache():
    router, prism = PrismCacheBalance(prefix_weight=3.0, fill_weight=3.0), Prism(slo_tpot_s=0.1)
    v = view([snap(), snap(), snap()], infos=[info(0, kv_tokens=2048), info(1, kv_tokens=2048), info(2)])
    assert router.scores(request(), v) == prism.scores(request(), v)  # an empty index: PRISM's scores
    assert router.route(request(hashes=(1, 2)), v) == 0  # a tie: the lowest index, as PRISM
    assert router.route(request(hashes=(1, 2, 3)), v) == 0  # two of three segments held: follow them
    # engine 0's four-segment cache is now 3/4 full: a new prompt goes to an empty one
    assert router.route(request(hashes=(7,)), v) == 1 and router.index.size(0) == 3  # 1 and 2 tie at 0
    loaded = view([snap(pending=200_000), snap(), snap()], infos=v.engines)  # PRISM's load term outvotes a match
    assert router.route(request(hashes=(1, 2, 3)), loaded) != 0


def test_prism_scores_latency_load_mode_and_affinity():
    router = Prism(slo_tpot_s=0.05)
    v = view(
        [
            snap(predicted_ms=30.0, pending=0, tokens_per_step=100),
            snap(predicted_ms=300.0, pending=0, tokens_per_step=2000),
        ]
    )
    scores = router.scores(request(), v)
    assert scores[0] == pytest.approx((1 - 0.6) + 1 + 1 + 0)
    assert scores[1] == pytest.approx(0 + 1 + 0 + 0)
    assert router.route(request(session=4), v) == 0
    fresh = dict(time_s=5.0, predicted_ms=30.0, tokens_per_step=100)
    same = view([snap(**fresh), snap(**fresh)], now=10)
    assert router.scores(request(session=4), same)[0] - router.scores(request(session=4), same)[1] == pytest.approx(1)


def test_prism_normalises_pending_tokens_by_capacity():
    """The same pending tokens weigh less on an H100 than on an A100: the heterogeneity PRISM targets."""
    router = Prism()
    infos = [info(0, gpu="A100-80GB"), info(1, gpu="H100-SXM")]
    v = view([snap(pending=20_000), snap(pending=20_000)], infos=infos)
    scores = router.scores(request(), v)
    assert scores[1] > scores[0]
    assert router.route(request(), v) == 1


def test_slo_partition_sends_tight_requests_to_the_fastest_engines_and_loose_ones_elsewhere():
    infos = [info(0, gpu="A100-80GB"), info(1, gpu="H100-SXM")]
    v = view([snap(pending=20_000), snap(pending=20_000)], infos=infos)  # PRISM prefers the H100
    router, prism = SloPartitionPrism(bonus=2.0), Prism(slo_tpot_s=0.1)

    def with_tpot(tpot):
        return RequestInfo(0, 0.0, 1000, SloClass("c", ttft_s=2.0, tpot_s=tpot))

    base = prism.scores(with_tpot(0.1), v)
    assert router.scores(with_tpot(0.03), v) == pytest.approx({0: base[0], 1: base[1] + 2.0})
    assert router.scores(with_tpot(0.2), v) == pytest.approx({0: base[0] + 2.0, 1: base[1]})
    assert router.scores(with_tpot(0.1), v) == pytest.approx(base)  # in between: PRISM
    assert router.scores(request(), v) == pytest.approx(base)  # no TPOT target: PRISM
    assert router.route(with_tpot(0.2), v) == 0 and prism.route(with_tpot(0.2), v) == 1


def test_block_predicts_each_engine_and_picks_the_fastest():
    router = BlockPredictive(output_prior=100)
    infos = [info(0, gpu="A100-80GB"), info(1, gpu="H100-SXM")]
    idle = view([snap(), snap()], infos=infos)
    assert router.route(request(), idle) == 1  # the faster GPU
    busy = view([snap(), snap(pending=200_000, decodes=200, decode_kv=400_000)], infos=infos)
    assert router.predicted_e2e_s(request(), busy, 1) > router.predicted_e2e_s(request(), busy, 0)
    assert router.route(request(), busy) == 0


@pytest.mark.parametrize(
    "router",
    [
        JoinShortestQueue(),
        LeastKvUsage(),
        TokenAware(),
        WeightedScorer(),
        PrefixAware(),
        Prism(),
        BlockPredictive(),
        RandomRouter(),
    ],
)
def test_new_requests_only_go_to_prefill_capable_engines(router):
    v = view([snap(role="decode"), snap(role="prefill"), snap(role="decode")])
    assert all(router.route(request(rid=i), v) == 1 for i in range(5))
