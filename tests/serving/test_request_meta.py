"""What a request tells the router beyond its body — SLO class, session, prompt prefix — reaches the policy
as the simulator's ``RequestInfo`` carries it, and a twin with prefix caching reuses shared prefixes."""

from __future__ import annotations

import aiohttp
from router_cluster import served_cluster
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import RoundRobin
from servegym.envs.sim.request import SloClass
from servegym.serving.tokens import hashed_prompt, prefix_hashes
from servegym.serving.twin import TwinConfig, start_twin
from serving_helpers import FAST, MODEL, run

SLO = [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}, {"name": "batch", "e2e_s": 60.0}]


def test_hashed_prompts_share_exactly_the_prefixes_their_hash_ids_share():
    def hashes(ids):
        return prefix_hashes(hashed_prompt(ids, 1400, 512, seed=hash(ids) % 1000), 512)

    a, b, c = hashes((1, 2, 3)), hashes((1, 2, 9)), hashes((7, 2, 3))
    assert len(a) == 3  # 512 + 512 + a partial 376
    assert a[:2] == b[:2] and a[2] != b[2]
    assert all(x != y for x, y in zip(a, c, strict=True))  # chained: a different first segment changes all


class Recording(RoundRobin):
    def __init__(self) -> None:
        super().__init__()
        self.infos = []

    def route(self, request, view):
        self.infos.append(request)
        return super().route(request, view)


def test_slo_class_session_and_prefix_hashes_reach_the_policy():
    policy = Recording()
    prompt = hashed_prompt((11, 12), 700, 512, seed=0)

    async def go():
        async with served_cluster(2, policy, slo=SLO) as cluster, aiohttp.ClientSession() as session:
            statuses = []
            for headers, extra in (
                ({}, {}),
                ({"X-SLO-Class": "batch", "X-Session-Id": "42"}, {}),
                ({}, {"user": "alice"}),
                ({"X-SLO-Class": "gold"}, {}),
            ):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, **extra}
                async with session.post(cluster.url + "/v1/completions", json=body, headers=headers) as response:
                    statuses.append((response.status, await response.json()))
            return statuses

    statuses = run(go())
    assert [s for s, _ in statuses] == [200, 200, 200, 400]
    assert (
        "unknown SLO class 'gold'" in statuses[3][1]["error"]["message"]
        and "chat, batch" in statuses[3][1]["error"]["message"]
    )
    first, named, user = policy.infos
    assert first.slo == SloClass("chat", 2.0, 0.1) and first.session_id == -1
    assert named.slo == SloClass("batch", e2e_s=60.0) and named.session_id == 42
    assert user.session_id >= 0 and user.session_id != 42
    assert first.hash_ids == named.hash_ids == prefix_hashes(prompt, 512) and len(first.hash_ids) == 2


def test_a_twin_with_prefix_caching_reuses_a_shared_prompt_prefix():
    shared = hashed_prompt((5, 6, 7), 1600, 512, seed=1)
    other = hashed_prompt((5, 6, 8), 1600, 512, seed=2)  # the first two segments in common

    async def go():
        engine = EngineConfig(enable_prefix_caching=True)
        async with start_twin(TwinConfig(time_scale=FAST), engine=engine) as twin, aiohttp.ClientSession() as session:
            for prompt in (shared, other):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
                async with session.post(twin.url + "/v1/completions", json=body) as response:
                    assert response.status == 200
            return twin.twin.engine.engine.cache.hit_tokens

    assert run(go()) == 2 * 512
