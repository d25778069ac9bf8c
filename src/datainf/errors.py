"""The one exception family of datainf: every message says what to fix."""


class DataInfError(ValueError):
    """Bad input or settings. Subclasses ValueError so callers can catch either."""


class AllBlocksZeroError(DataInfError):
    """Every block of the training gradients is zero, so there is nothing to score (a rank of a distributed
    run may hold only such blocks; the others then still score theirs)."""


class NonFiniteError(DataInfError):
    """Examples whose loss (or gradient) is NaN or infinite. ``examples``: their indices (in the batch, or in
    the dataset once the Attributor has translated them); ``what``: "loss" or "gradient"; ``values``: the
    losses (for "loss")."""

    def __init__(self, message: str, examples: list[int], what: str = "loss", values: list[float] | None = None):
        super().__init__(message)
        self.examples = list(examples)
        self.what = what
        self.values = list(values or [])
