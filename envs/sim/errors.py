"""Errors that name a bad simulator input: the message says which part of the configuration and why."""


class ClusterConfigError(ValueError):
    """An impossible cluster configuration; the message says which group and why."""
