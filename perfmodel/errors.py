"""The one exception family of the performance model: bad input, named in one line."""


class PerfModelError(ValueError):
    """Bad input to the performance model (unknown GPU or model, malformed batch or step log, impossible config)."""
