"""Simulated results do not change by accident: every policy's summary equals the recorded one."""

import json

import pytest
from golden import GOLDEN, summaries


def test_every_policy_reproduces_its_recorded_summary():
    recorded = json.loads(GOLDEN.read_text())
    now = summaries()
    assert sorted(now) == sorted(recorded)
    for key, values in recorded.items():
        for metric, value in values.items():
            assert now[key][metric] == (None if value is None else pytest.approx(value, rel=1e-9)), (key, metric)
