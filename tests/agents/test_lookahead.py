"""The one-step lookahead over a base router (agents/lookahead.py): one lookahead decision on the true
future can only gain (the rest of the window is the rollout it chose); the table pairs modes over seeds."""

import os

import pytest
from servegym.agents.lookahead import headroom

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="branching needs os.fork")

CLUSTER = {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A100-80GB"}}]}
WORKLOAD = {
    "kind": "synthetic",
    "num_requests": 120,
    "arrivals": {"rate": 50.0},
    "lengths": {"kind": "lognormal", "prompt": 1500, "output": 150},
    "slo": [{"name": "chat", "ttft_s": 0.3, "tpot_s": 0.05}],
}
PRISM = {"router": {"_target_": "servegym.agents.routing.predictive.Prism", "slo_tpot_s": 0.05}, "batch": None}


def test_one_true_lookahead_only_gains_and_the_table_pairs_seeds():
    kwargs = {"warmup": 20, "horizon": 6, "num_requests": 120, "max_instances": 4, "jobs": 2}
    once = headroom(CLUSTER, WORKLOAD, PRISM, 1.0, [1, 2], every=100, modes=["true"], **kwargs)
    assert [o.looked for o in once.outcomes["true"]] == [1, 1]
    gains = [t.met - b.met for t, b in zip(once.outcomes["true"], once.outcomes["base"], strict=True)]
    assert min(gains) >= 0 and max(gains) > 0 and once.gain_requests("true")[0] == sum(gains) / 2
    result = headroom(CLUSTER, WORKLOAD, PRISM, 1.0, [1], every=3, **kwargs)
    rows = {row["policy"]: row for row in result.table()}
    assert set(rows) == {"base", "true", "sampled"} and rows["true"]["counted"] == rows["base"]["counted"] == 26
    assert result.outcomes["true"][0].looked == 2
