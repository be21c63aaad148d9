"""The router's view against the simulator's on recorded traffic: at every decision of a replayed window,
the features the router computes from its own traffic (outstanding requests and prompt tokens, pending
prefill, decodes and their KV, the next step and its predicted latency) equal what the observation contract
computes — the simulator's router tap, :class:`servegym.envs.sim.router_tap.RouterTap` — from the twins' true token
streams at that instant, up to the requests and tokens still on the wire (the router counts a request from
the moment it sends it and sees each token when it is relayed), and the scraped gauges are at most a few
scrape intervals old."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from servegym.envs.features import ENGINE_FEATURES, EngineModels, FeatureContext, FeatureSpec
from servegym.envs.sim.policies import RoundRobin
from servegym.envs.sim.router_tap import RouterTap
from servegym.envs.sim.view import ClusterView, EngineSnapshot, RequestInfo
from servegym.serving.loadgen import replay
from servegym.serving.router import start_router
from servegym.serving.router_config import router_config
from servegym.serving.twin import TwinConfig, start_twin
from serving_helpers import run

SCALE = 0.5  # wall seconds per simulated second: tokens spend ~1-2 ms (sim) on the wire
ENGINES = 3
COLUMN = {f.name: j for j, f in enumerate(ENGINE_FEATURES)}


def _gauges(engine) -> EngineSnapshot:
    """The engine's gauges now, as the simulator's ``Cluster`` reads them."""
    return EngineSnapshot(
        time_s=engine.env.now,
        num_requests_running=engine.num_running,
        num_requests_waiting=engine.num_waiting,
        kv_cache_usage_perc=engine.used_blocks_at(engine.env.now) / engine.total_blocks,
        num_gpu_blocks=engine.total_blocks,
        block_size=engine.block_size,
    )


def _true_tap(streams: list[list]) -> RouterTap:
    """The tap of a router that saw every token of every in-flight request the instant it was produced."""
    tap = RouterTap(len(streams))
    for i, engine_streams in enumerate(streams):
        for stream in engine_streams:
            tap.sent(i, stream.request.prompt_tokens)
            if stream.times_s:
                tap.first_token(i, stream.request.prompt_tokens)
                for _ in stream.times_s[1:]:
                    tap.token(i, 0.0)
    return tap


class Recording(RoundRobin):
    """Round-robin that, at every decision, records the router's view and the twins' true state."""

    def __init__(self) -> None:
        super().__init__()
        self.twins: list = []
        self.pairs: list[tuple[RequestInfo, ClusterView, ClusterView]] = []

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        engines = []
        for twin in self.twins:
            twin.twin.engine.advance()
            engines.append(twin.twin.engine)
        streams = [list(e._streams.values()) for e in engines]
        tap = _true_tap(streams)
        truth = ClusterView(
            view.now_s,
            view.engines,
            tap.snapshots(view.engines, [_gauges(e.engine) for e in engines], EngineModels()),
            tap.outstanding,
            tap.outstanding_prompt,
        )
        _ = view.snapshots  # the router's snapshots are lazy: take them now, not after the traffic ended
        self.pairs.append((request, view, truth))
        return super().route(request, view)


async def _recorded(requests) -> Recording:
    policy = Recording()
    async with contextlib.AsyncExitStack() as stack:
        for i in range(ENGINES):
            config = TwinConfig(time_scale=SCALE, engine_index=i, seed=i)
            policy.twins.append(await stack.enter_async_context(start_twin(config)))
        mapping = {
            "cluster": {"snapshot_interval_s": 0.1, "groups": [{"count": ENGINES, "engine": {"gpu": "H100-SXM"}}]},
            "backends": [t.url for t in policy.twins],
            "time_scale": SCALE,
            "scrape_interval_s": 0.1 * SCALE,
        }
        router = await stack.enter_async_context(start_router(router_config(mapping), policy))
        records, _ = await replay(router.url, requests, "Llama-3-8B", SCALE, time_limit_s=60)
        assert (records["state"] == "finished").all()
        await asyncio.sleep(0)
    return policy


def _requests():
    from servegym.envs.sim.request import Request

    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1 / 30.0, 48))  # 30 req/s on three engines: queues form and drain
    lengths = zip(rng.integers(100, 3000, 48), rng.integers(4, 60, 48), strict=True)
    return [Request(i, float(t), int(p), int(o)) for i, (t, (p, o)) in enumerate(zip(arrivals, lengths, strict=True))]


@pytest.fixture(scope="module")
def recorded() -> Recording:
    return run(_recorded(_requests()))


def _differences(recorded: Recording, name: str) -> np.ndarray:
    """Router view minus the contract on the true state, for one engine feature, every engine and decision."""
    spec = FeatureSpec(8)
    out = []
    for request, live, truth in recorded.pairs:
        live_rows, _ = spec.raw(live, request, FeatureContext())
        true_rows, _ = spec.raw(truth, request, FeatureContext())
        out.append(live_rows[:, COLUMN[name]] - true_rows[:, COLUMN[name]])
    return np.concatenate(out)


def test_the_routers_own_fields_equal_the_contracts_on_the_twins_true_streams_up_to_the_wire(recorded):
    assert len(recorded.pairs) == 48
    # outstanding: the router counts a request from the moment it sends it until it relayed the end, the
    # twin from its arrival to its last token: the router leads by the requests on the wire, never lags
    outstanding = _differences(recorded, "outstanding")
    assert outstanding.min() >= 0 and outstanding.max() <= 8 and np.mean(outstanding == 0) >= 0.25
    prompt = _differences(recorded, "outstanding_prompt")
    assert np.all((prompt == 0) == (outstanding == 0)) and prompt.min() >= 0
    # pending prefill: requests on the wire, and first tokens on their way back, are pending for the router only
    pending = _differences(recorded, "pending_prefill_s")
    assert pending.min() >= -1e-9 and np.mean(np.isclose(pending, 0.0)) >= 0.5
    # decodes' KV and the next step built on the same counts: equal up to the tokens on the wire
    decode_kv = _differences(recorded, "decode_kv_share")
    assert np.abs(decode_kv).max() <= 0.02 and np.mean(np.isclose(decode_kv, 0.0)) >= 0.25
    step = _differences(recorded, "predicted_step_ms")  # ms: a prompt on the wire changes the next step's shape
    same_counts = np.isclose(pending, 0.0) & (np.abs(decode_kv) < 1e-3)
    assert np.abs(step[same_counts]).max() <= 0.5 and np.mean(same_counts) >= 0.25
    for _, live, truth in recorded.pairs:
        for seen, true in zip(live.snapshots, truth.snapshots, strict=True):
            assert abs(seen.num_decodes - true.num_decodes) <= 4


def test_scraped_gauges_are_at_most_a_few_scrape_intervals_old(recorded):
    ages = [live.now_s - seen.time_s for _, live, _ in recorded.pairs for seen in live.snapshots]
    assert max(ages) <= 0.1 * 4  # simulated seconds: one interval, plus scrape and event-loop time (2 busy cores)
