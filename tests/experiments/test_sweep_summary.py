"""The sweep table reports the policy that best/ holds: under validation.min_gain a later, slightly better
evaluation does not replace the start, and the table must say so."""

import pandas as pd
from servegym.experiments.sweep_summary import job_row


def _job(tmp_path, rows):
    job = tmp_path / "0"
    job.mkdir()
    pd.DataFrame(rows).to_csv(job / "evaluations.csv", index=False)
    return job


def test_the_selected_policy_not_the_highest_mean(tmp_path):
    job = _job(
        tmp_path,
        [
            {"stage": "start", "timesteps": 0, "learned": 0.9134, "selected": True},
            {"stage": "rl", "timesteps": 5000, "learned": 0.9150, "selected": False},
            {"stage": "rl", "timesteps": 10000, "learned": 0.9170, "selected": True},
            {"stage": "rl", "timesteps": 15000, "learned": 0.9180, "selected": False},
        ],
    )
    row = job_row(job)
    assert (row["best_validation"], row["best_at"], row["status"]) == (0.917, 10000, "unfinished")


def test_runs_without_the_column_report_the_best_mean(tmp_path):
    job = _job(
        tmp_path,
        [{"stage": "start", "timesteps": 0, "learned": 0.91}, {"stage": "rl", "timesteps": 5, "learned": 0.92}],
    )
    assert job_row(job)["best_at"] == 5
