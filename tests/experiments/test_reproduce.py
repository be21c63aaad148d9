"""The reproduction command end to end, in its quick mode."""

from servegym.experiments.reproduce import main


def test_sal_larry_reproduction_writes_its_tables(tmp_path):
    main(["sal_larry", "--quick", "--jobs", "1", "--out", str(tmp_path)])
    text = (tmp_path / "sal_larry" / "results.md").read_text()
    assert "SAL (token-aware)" in text and "LARRY" in text and "preemptions / request" in text
    assert (tmp_path / "sal_larry" / "runs.csv").stat().st_size > 0
