"""The one exception family of datainf: every message says what to fix."""


class DataInfError(ValueError):
    """Bad input or settings. Subclasses ValueError so callers can catch either."""


class AllBlocksZeroError(DataInfError):
    """Every block of the training gradients is zero, so there is nothing to score (a rank of a distributed
    run may hold only such blocks; the others then still score theirs)."""
