"""Trace readers: the three public formats, failed rows, malformed rows named by file, line and field."""

from pathlib import Path

import numpy as np
import pytest
from servegym.envs.sim.traces import TraceError, detect_format, read_trace

DATA = Path(__file__).parent / "data"


def test_azure_sample_is_read_relative_to_its_first_request():
    trace = read_trace(DATA / "azure_conv_sample.csv")
    assert (trace.format, len(trace)) == ("azure", 50)
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert (trace.prompt_tokens[0], trace.output_tokens[0]) == (374, 44)
    assert trace.arrival_s[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)


def test_builtin_traces_match_their_published_statistics():
    conv, code = read_trace("azure_conv"), read_trace("azure_code")
    assert (len(conv), len(code)) == (19366, 8819)
    assert conv.mean_rate == pytest.approx(5.53, abs=0.01)
    assert conv.prompt_tokens.mean() == pytest.approx(1155, abs=1)
    assert code.output_tokens.mean() == pytest.approx(27.9, abs=0.1)


def test_burstgpt_failed_requests_are_dropped_and_counted():
    trace = read_trace(DATA / "burstgpt_sample.csv")
    assert trace.format == "burstgpt" and len(trace) == 4
    assert trace.dropped == {"failed (zero response tokens)": 2}
    with pytest.raises(TraceError, match=r"burstgpt_sample.csv:3: zero output tokens"):
        read_trace(DATA / "burstgpt_sample.csv", zero_output="error")


def test_mooncake_keeps_prefix_block_hashes():
    trace = read_trace(DATA / "mooncake_sample.jsonl")
    assert trace.format == "mooncake"
    assert trace.arrival_s[1] == pytest.approx(27.482)
    assert trace.hash_ids[1][:3] == (46, 47, 48)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2023-11-16 18:15:50.99,abc,10", r":3: field 'ContextTokens' is not an integer: 'abc'"),
        ("not a time,10,10", r":3: field 'TIMESTAMP' is not a timestamp"),
        ("2023-11-16 18:15:50.99,-5,10", r":3: field 'ContextTokens' must be at least 1"),
        ("2023-11-16 18:15:50.99,10", r":3: row does not have the header's columns"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "trace.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n{line}\n")
    with pytest.raises(TraceError, match=message):
        read_trace(path)
    skipped = read_trace(path, on_error="skip")
    assert len(skipped) == 1 and skipped.dropped == {"malformed rows": 1}


def test_mooncake_errors_name_the_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 1, "input_length": 10, "output_length": 2}\n{"timestamp": 2, "input_length": 5}\n')
    with pytest.raises(TraceError, match=r"m.jsonl:2: field 'output_length' is missing"):
        read_trace(path)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="unrecognised trace format"):
        detect_format(tmp_path / "x.csv")
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "missing.csv")
