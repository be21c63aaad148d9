"""`experiments/headroom.py --scenario`: a scenario's cluster, workload and reference router (or another base
heuristic), at its test load or another, with the same table as the cluster/workload form; an unknown
scenario is a clear error."""

from __future__ import annotations

import pytest
from servegym.experiments import headroom


def test_a_scenario_gives_its_reference_and_the_true_lookahead_never_loses(capsys) -> None:
    argv = ["--scenario", "multi-slo", "--load", "18", "--seeds", "0", "--warmup", "40", "--horizon", "8"]
    rows = headroom.main([*argv, "--num-requests", "200", "--every", "2", "--modes", "base,true", "--jobs", "1"])
    printed = capsys.readouterr().out
    assert "over vllm_prism: scenario multi-slo at load x18" in printed
    base, true = rows
    assert (base["policy"], true["policy"]) == ("base", "true")
    assert true["counted"] == base["counted"] > 0
    assert true["gain"] >= 0.0  # the true-future lookahead only changes a decision that gains


def test_an_unknown_scenario_is_named(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        headroom.main(["--scenario", "no-such-scenario"])
    assert exited.value.code != 0
    assert "no-such-scenario" in capsys.readouterr().err


def test_a_scenario_can_be_measured_over_another_heuristic(capsys) -> None:
    """The issue's bound is over the best heuristic; on prefix-chat that may be PrefixAware, not PRISM."""
    argv = ["--scenario", "prefix-chat", "--policy", "vllm_prefix", "--seeds", "0", "--warmup", "40"]
    rows = headroom.main([*argv, "--horizon", "8", "--num-requests", "200", "--every", "4", "--modes", "base,true"])
    assert "over vllm_prefix: scenario prefix-chat at load x1.3" in capsys.readouterr().out
    base, true = rows
    assert true["counted"] == base["counted"] > 0 and true["gain"] >= 0.0
