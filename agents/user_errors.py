"""Errors that name a bad input, and the one way the entry points report them: ``error: <message>`` on
one line of stderr and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from servegym.agents.configs import ConfigError
from servegym.agents.exported import ExportError
from servegym.agents.learned import ContractMismatch
from servegym.envs.plugins import PluginError
from servegym.envs.scenarios import ScenarioError
from servegym.envs.sim.errors import ClusterConfigError, ServingRunError
from servegym.envs.sim.traces import TraceError
from servegym.envs.sim.workload import WorkloadError
from servegym.perfmodel.errors import PerfModelError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,  # an unknown config or reproduction name
    ScenarioError,  # an unknown scenario name (the known ones listed), or a scenario file that says too little
    PluginError,  # a user's policy import path that does not import, or names no policy class
    ClusterConfigError,
    WorkloadError,
    TraceError,
    ServingRunError,  # a measured serving run (experiments/validate.py) that cannot be read
    PerfModelError,  # unknown GPU or model, impossible engine config
    ContractMismatch,  # a saved policy trained on another observation contract
    ExportError,
    FileNotFoundError,  # a saved policy or run path that is not there
)
EXIT_STATUS = 2


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Inside: a :data:`USER_ERRORS` exception prints ``error: <message>`` to stderr and exits with status 2."""
    try:
        yield
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_STATUS)
