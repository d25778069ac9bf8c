"""Synthetic label noise: flip a fixed share of labels to a different class."""

from __future__ import annotations

import random
from collections.abc import Sequence

from datainf.errors import DataInfError


def flip_labels(
    labels: Sequence[int], fraction: float, num_classes: int, seed: int = 0
) -> tuple[list[int], list[bool]]:
    """Flip exactly ``round(fraction * n)`` labels, chosen at random, each to a different random class.

    Returns the new labels and the mask of flipped examples (both of length n). With two classes a flipped
    label becomes the other class. The same seed gives the same result.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataInfError(f"fraction must lie in [0, 1], got {fraction}")
    if num_classes < 2:
        raise DataInfError(f"num_classes must be >= 2 to flip labels, got {num_classes}")
    labels = [int(y) for y in labels]
    for i, y in enumerate(labels):
        if not 0 <= y < num_classes:
            raise DataInfError(
                f"label {y} of example {i} is outside 0..{num_classes - 1}; fix num_classes or the labels"
            )
    rng = random.Random(seed)
    n_flip = round(fraction * len(labels))
    chosen = rng.sample(range(len(labels)), n_flip)
    new_labels = list(labels)
    flipped = [False] * len(labels)
    for i in sorted(chosen):
        shift = rng.randrange(1, num_classes)  # 1..C-1, so the new class always differs
        new_labels[i] = (labels[i] + shift) % num_classes
        flipped[i] = True
    return new_labels, flipped
