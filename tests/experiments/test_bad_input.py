"""Every entry point names a bad config name in one line on stderr and exits with status 2 (no traceback)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "simulate": (["cluster.groups.0.engine.gpu=H900", "progress=false"], "error: group h100: unknown GPU 'H900'"),
    "evaluate": (["policies=[nope]"], "error: unknown policy 'nope'; known: arrow,"),
    "train": (["imitation.expert=nope", "progress=false"], "error: unknown policy 'nope'; known: arrow,"),
    "train-labels": (
        ["distill.labels={tmp}/missing.npz", "eval_every=0", "progress=false"],
        "error: distill.labels: {tmp}/missing.npz is not a labels file written by Labels.save",
    ),
    "train-evolve": (
        ["evolve.shortfall_weight=-1", "progress=false"],
        "error: evolve.shortfall_weight must be >= 0, got -1",
    ),
    "export": (["run={tmp}/missing"], "error: {tmp}/missing: no model.zip"),
    "leaderboard": (["scenarios=[nope]"], "error: unknown scenario 'nope'; known: bursty-conv, h100x64,"),
    "reproduce": (["nope"], "error: unknown reproduction 'nope'; known: synergysched, arrow, sal_larry, all"),
}


@pytest.mark.parametrize("entry_point", CASES)
def test_a_bad_name_is_one_line_and_status_2(entry_point, tmp_path):
    args, expected = CASES[entry_point]
    args = [a.format(tmp=tmp_path) for a in args]
    if entry_point != "reproduce":
        args.append(f"hydra.run.dir={tmp_path}/out")
    result = subprocess.run(
        [sys.executable, str(ROOT / f"experiments/{entry_point.split('-')[0]}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), result.stderr[-2000:]
