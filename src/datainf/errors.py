"""The one exception family of datainf: every message says what to fix."""


class DataInfError(ValueError):
    """Bad input or settings. Subclasses ValueError so callers can catch either."""
