import json

import pytest
from servegym.perfmodel.cli import main
from servegym.perfmodel.structural import StructuralModel


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_predict_echoes_each_line_with_latency(tmp_path, capsys):
    steps = _write(
        tmp_path / "steps.jsonl",
        [
            {"gpu": "H100-SXM", "model": "Llama-2-70B", "tp": 4, "seqs": [[512, 0], [1, 900]], "tag": "a"},
            "",
            {"gpu": "a100-80gb", "model": "llama-3-8b", "seqs": [[1, 100]]},
        ],
    )
    assert main(["predict", str(steps)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("tag") for line in lines] == ["a", None]
    expected = StructuralModel("H100-SXM", "Llama-2-70B", tp=4).predict_seqs([(512, 0), (1, 900)])
    assert lines[0]["latency_ms"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"gpu": "H900", "model": "Llama-2-7B", "seqs": [[1, 2]]}', "unknown GPU 'H900'"),
        ('{"gpu": "H100-SXM", "model": "Llama-9B", "seqs": [[1, 2]]}', "unknown model 'Llama-9B'"),
        (
            '{"gpu": "H100-SXM", "model": "Llama-2-7B", "seqs": [[-4, 2]]}',
            "sequence 0: new_tokens must be non-negative",
        ),
        ('{"gpu": "H100-SXM", "model": "Llama-2-7B", "seqs": []}', "seqs must be a non-empty list"),
        ('{"gpu": "H100-SXM", "model": "Llama-2-7B", "seqs": [[1, 2]], "tp": 0}', "tp must be a positive integer"),
        ('{"gpu": "H100-SXM", "model": "Llama-2-7B"', "not valid JSON"),
        ('{"gpu": "H100-SXM", "seqs": [[1, 2]]}', "missing field(s) model"),
    ],
)
def test_bad_lines_exit_2_with_one_line_naming_the_line(tmp_path, capsys, line, message):
    steps = _write(tmp_path / "steps.jsonl", [{"gpu": "H100-SXM", "model": "Llama-2-7B", "seqs": [[1, 2]]}, line])
    assert main(["predict", str(steps)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {steps}:2: ") and message in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot open" in capsys.readouterr().err


def test_report_on_held_out_token_counts(tmp_path, capsys):
    plot, csv = tmp_path / "report.png", tmp_path / "report.csv"
    assert main(["report", "--splits", "tokens", "--plot", str(plot), "--csv", str(csv)]) == 0
    assert plot.stat().st_size > 10_000
    import pandas as pd

    table = pd.read_csv(csv)
    tokens = table[table["split"] == "tokens"].set_index("family")["mape"]
    assert tokens["structural"] < 0.06
    assert tokens["roofline"] > tokens["structural"]
    steps = table[table["split"] == "steps"].set_index("family")["mape"]  # shipped CPU step log, attention included
    assert steps["structural"] < min(steps["roofline"], steps["saturation"], steps["arrow"])
