"""experiments/validate.py: replays measured runs given by path, writes the fidelity CSV and plot, and names bad
input in one line with exit status 2. The runs are tiny synthetic ones (the tests never read ../shared)."""

import json

import pandas as pd
import pytest
from servegym.experiments.validate import main

RUN = {
    "format": "servegym.serving_run/1",
    "name": "tiny",
    "gpu": "H100-SXM",
    "model": "Llama-2-7B",
    "engine": {"max_num_seqs": 32, "max_num_batched_tokens": 1024, "max_model_len": 4096},
    "prefix": {"groups": 2, "users_per_group": 2, "system_prompt_tokens": 64},
    "stages": [
        {"rate": 3, "duration_s": 8, "prompt_tokens": 200, "output_tokens": 20,
         "measured": {"requests": 24, "ttft_mean_ms": 20.0, "ttft_p90_ms": 25.0, "tpot_mean_ms": 7.0,
                      "e2e_mean_ms": 160.0, "e2e_p90_ms": 170.0}},
    ],
}  # fmt: skip


def test_validate_writes_the_table_and_the_plot(tmp_path, capsys):
    (tmp_path / "tiny.json").write_text(json.dumps(RUN))
    unsupported = {**RUN, "name": "elsewhere", "gpu": "Imaginary-X1"}
    (tmp_path / "elsewhere.json").write_text(json.dumps(unsupported))
    main([str(tmp_path / "tiny.json"), str(tmp_path / "elsewhere.json"), "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "fidelity.csv")
    replayed = table[table["skipped"].isna()]
    assert replayed["run"].tolist() == ["tiny"] and replayed["profile"].tolist() == ["default"]
    assert {"ttft_mean_measured_ms", "ttft_mean_sim_ms", "ttft_mean_err", "flag"} <= set(table.columns)
    assert table.loc[table["run"] == "elsewhere", "skipped"].str.contains("not in the catalog").all()
    assert (tmp_path / "out" / "fidelity.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "tiny: H100-SXM x1, Llama-2-7B" in printed and "TTFT mean" in printed
    assert "elsewhere: skipped: GPU 'Imaginary-X1' is not in the catalog" in printed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/missing"], "error: {tmp}/missing: no such file or folder"),
        (["{tmp}/tiny.json", "--profile", "nope"], "error: group tiny: unknown profile 'nope'"),
        (["{tmp}/tiny.json", "--max-stage-s", "0"], "error: --max-stage-s must be positive"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, expected):
    (tmp_path / "tiny.json").write_text(json.dumps(RUN))
    with pytest.raises(SystemExit) as exit_:
        main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path))
