"""The one metric-cell formatter and the tables built on it."""

import math

import pandas as pd
from servegym.agents.harness import METRICS, summarise
from servegym.agents.reporting import SUMMARY_ROWS, cell, markdown_table, print_summary, print_tables


def test_a_cell_is_the_mean_and_its_half_width_in_one_format():
    assert cell(0.8123, 0.0312, "{:.1%}") == "81.2% ±3.1%"
    assert cell(1234.5, 56.7, "{:,.0f}") == "1,234 ±57"
    assert cell(0.0123, 0.0004, "ms") == "12.3 ±0.4"  # seconds shown as milliseconds
    assert cell(0.021, 0.004, "{:+.1%}") == "+2.1% ±0.4%"  # the sign on the mean only
    assert cell(1.5, fmt="{:.2f}x") == "1.50x"
    assert cell(25587, fmt="{:,}") == "25,587"  # integers stay integers


def test_without_an_interval_only_the_mean_shows():
    assert cell(0.5, math.nan, "{:.1%}") == "50.0%"  # one seed
    assert cell(0.5, None, "{:.1%}") == "50.0%"


def test_a_missing_mean_is_a_dash_unless_the_table_prints_nan():
    assert cell(math.nan, 0.1, "{:.3f}") == "-"
    assert cell(None) == "-"
    assert cell(math.nan, fmt="{:.3f}", missing=None) == "nan"
    assert cell(math.nan, fmt="ms", missing=None) == "nan"


def test_markdown_tables_space_the_plus_minus():
    table = pd.DataFrame(
        [
            {
                "policy": "a",
                "slo_attainment": 0.9,
                "slo_attainment_ci": 0.01,
                "tpot_p50_s": 0.0123,
                "tpot_p50_s_ci": math.nan,
                "slo_attainment_diff": 0.05,
                "slo_attainment_diff_ci": 0.02,
            }
        ]
    )
    text = markdown_table(table, [("SLO", "slo_attainment", "{:.1%}"), ("TPOT (ms)", "tpot_p50_s", "ms")], "b")
    assert text.splitlines() == [
        "| policy | SLO | TPOT (ms) | attainment − b (paired) |",
        "|---|---|---|---|",
        "| a | 90.0% ± 1.0% | 12.3 | +5.0% ± 2.0% |",
    ]


def _rows(policy: str, attainments: list[float]) -> list[dict]:
    rows = []
    for seed, attainment in enumerate(attainments):
        row = {"policy": policy, "workload": "w", "load": 1.0, "seed": seed, **dict.fromkeys(METRICS, 0.01)}
        rows.append({**row, "slo_attainment": attainment})
    return rows


def test_the_terminal_table_shows_intervals_ratios_and_paired_differences(capsys):
    table = summarise(_rows("ref", [0.5, 0.6]) + _rows("better", [0.75, 0.9]), reference="ref")
    print_tables(table, "ref")
    out = capsys.readouterr().out
    assert "w (load x1; mean ±95% CI over 2 seeds)" in out
    assert "82.5% ±95.3%" in out  # mean ± Student-t half-width over two seeds
    assert "1.50x" in out and "+27.5% ±31.8%" in out  # ratio to ref, paired difference


def test_the_simulation_summary_pairs_percentiles(capsys):
    summary = {key: 0.0 for _, keys, _ in SUMMARY_ROWS for key in (keys if isinstance(keys, tuple) else (keys,))}
    summary.update(num_requests=1234, ttft_p50_s=0.041, ttft_p99_s=0.241, tpot_p50_s=0.0123, tpot_p99_s=0.0143)
    summary["per_instance"] = [
        {
            "instance": 0,
            "gpu": "H100-SXM",
            "role": "prefill",
            "completed": 0,
            "ttft_p50_s": math.nan,
            "tpot_p50_s": math.nan,
            "kv_blocks": 25587,
            "preemptions": 0,
        }
    ]
    print_summary(summary, "title")
    out = capsys.readouterr().out
    assert "1,234" in out and "0.041 / 0.241" in out and "12.3 / 14.3" in out
    assert "nan" in out and "25,587" in out  # an instance without completions, as before
