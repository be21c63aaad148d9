"""Errors that name a bad simulator input: the message says which part of the configuration and why."""


class ClusterConfigError(ValueError):
    """An impossible cluster configuration; the message says which group and why."""


class ServingRunError(ValueError):
    """A measured serving run that cannot be read or replayed; the message names the file and the field."""
