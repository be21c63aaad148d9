"""Saved routers through the router: an ONNX export and a training run route live in front of twins, and a
manifest that does not match the feature contract the router serves refuses to start, in one line."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from router_cluster import served_cluster
from servegym.agents.exported import ExportedRouter
from servegym.agents.learned import LearnedRouter
from servegym.serving.bench import tiny_export
from servegym.serving.router import main as router_main
from servegym.serving.router_config import RouterConfigError, load_routing_policy
from serving_helpers import MODEL, run

SLOTS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny (untrained) routing run written by ``save_run`` and its ONNX export by ``export_run``."""
    export = tiny_export(SLOTS, tmp_path_factory.mktemp("run"))
    return export.parent, export


def _edited_export(export: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(export, copy)
    manifest = json.loads((copy / "policy.json").read_text())
    edit(manifest)
    (copy / "policy.json").write_text(json.dumps(manifest))
    return copy


async def _stream(session: aiohttp.ClientSession, url: str, words: int) -> int:
    body = {"model": MODEL, "prompt": " ".join(["w"] * words), "max_tokens": 4, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as response:
        await response.read()
        return response.status


def test_an_onnx_export_routes_live_in_front_of_twins(saved):
    _, export = saved

    async def go():
        async with served_cluster(3, policy=str(export)) as cluster, aiohttp.ClientSession() as session:
            statuses = [await _stream(session, cluster.url, 10 + 40 * i) for i in range(9)]
            counters = await cluster.router_counters(session)
            return cluster.router.policy, statuses, counters

    policy, statuses, counters = run(go())
    assert isinstance(policy, ExportedRouter)
    assert statuses == [200] * 9
    assert sum(counters["routed"].values()) == 9 and counters["failovers"] == 0
    assert policy.fallbacks == 0  # the graph's choices were within the router's candidates (its mask)
    assert policy.context.output_mean != 256.0  # completions reached the policy's feature context


def test_the_export_is_named_by_its_directory_manifest_or_graph_and_the_run_by_its_directory(saved):
    run_path, export = saved
    for name in (export, export / "policy.json", export / "policy.onnx"):
        assert isinstance(load_routing_policy(str(name), 3), ExportedRouter)
    assert isinstance(load_routing_policy(str(run_path), 3), LearnedRouter)


def test_a_training_run_routes_live(saved):
    run_path, _ = saved

    async def go():
        async with served_cluster(2, policy=str(run_path)) as cluster, aiohttp.ClientSession() as session:
            return [await _stream(session, cluster.url, 20) for _ in range(4)], cluster.router.policy

    statuses, policy = run(go())
    assert statuses == [200] * 4 and isinstance(policy, LearnedRouter)
    # an unmasked PPO may name an empty slot of its 8; the simulator's fallback (counted) then places it
    assert 0 <= policy.fallbacks <= 4


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(env_id="servegym/Batch-v0"), "not a routing environment"),
        (lambda m: m["features"].update(version=1), "version differs"),
        (lambda m: m["features"]["engine_features"][3].update(scale=128.0), "engine_features differs"),
        (lambda m: m["feature_names"].reverse(), "feature_names differ"),
    ],
)
def test_a_manifest_off_the_contract_is_refused_with_the_reason(saved, tmp_path, edit, reason):
    edited = _edited_export(saved[1], tmp_path, edit)
    with pytest.raises(RouterConfigError, match=reason) as refused:
        load_routing_policy(str(edited), 2)
    assert "\n" not in str(refused.value)


def test_a_policy_with_fewer_slots_than_engines_is_refused(saved):
    with pytest.raises(RouterConfigError, match="8 engine slots; this cluster has 9 engines"):
        load_routing_policy(str(saved[1]), 9)


def test_the_cli_refuses_a_mismatched_export_in_one_line(saved, tmp_path):
    edited = _edited_export(saved[1], tmp_path, lambda m: m["features"].update(version=1))
    config = tmp_path / "router.yaml"
    config.write_text(
        "cluster: {groups: [{count: 2, engine: {gpu: H100-SXM}}]}\nbackends: [http://127.0.0.1:1, http://127.0.0.1:2]\n"
    )
    with pytest.raises(SystemExit) as refused:
        router_main(["--config", str(config), "--policy", str(edited)])
    message = str(refused.value.code)
    assert message.startswith("error: policy ") and "version differs" in message and "\n" not in message
    with pytest.raises(SystemExit) as unknown:
        router_main(["--config", str(config), "--policy", str(tmp_path / "nowhere")])
    assert "unknown policy" in str(unknown.value.code) and "ONNX export" in str(unknown.value.code)


def test_routing_spreads_over_the_twins_by_the_policys_choices(saved):
    """The export's choices are its own (an untrained graph need not spread evenly), but each reaches the twin
    it names: the twin header of every answer is the backend the router counted."""
    _, export = saved

    async def go():
        async with served_cluster(3, policy=str(export)) as cluster, aiohttp.ClientSession() as session:
            seen = Counter()
            for i in range(6):
                body = {"model": MODEL, "prompt": "a b c " * (i + 1), "max_tokens": 2, "ignore_eos": True}
                async with session.post(cluster.url + "/v1/completions", json=body) as response:
                    seen[response.headers["X-ServeGym-Twin"]] += 1
            counters = await cluster.router_counters(session)
            return seen, counters

    seen, counters = run(go())
    assert {f"t{b}": n for b, n in counters["routed"].items() if n} == dict(seen)
