"""Bad input is reported in one line with exit status 2; other errors keep their traceback."""

import pytest
from servegym.agents.configs import ConfigError, git_revision, named_configs
from servegym.agents.user_errors import USER_ERRORS, exit_on_user_error


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: e.__name__)
def test_a_user_error_is_one_line_on_stderr_and_status_2(error, capsys):
    with pytest.raises(SystemExit) as exit_, exit_on_user_error():
        raise error("bad input, named here")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: bad input, named here\n"


def test_a_bug_is_not_reported_as_bad_input():
    with pytest.raises(KeyError), exit_on_user_error():
        raise KeyError("x")


def test_an_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown workload 'nope'; known: .*azure_conv"):
        named_configs("workload", ["nope"])
    assert issubclass(ConfigError, USER_ERRORS)


def test_named_configs_merge_their_overrides():
    configs = named_configs("policy", ["vllm_rr", "arrow"], {"arrow": {"router": {"slo_ttft_s": 9.0}}})
    assert configs["vllm_rr"]["name"] == "vllm_rr"
    assert configs["arrow"]["router"]["slo_ttft_s"] == 9.0 and configs["arrow"]["pools"] == "router"


def test_the_git_revision_is_a_commit_or_unknown():
    revision = git_revision()
    assert revision == "unknown" or len(revision) == 40
