"""The one registry of influence methods: name -> :class:`Estimator` subclass.

A method is a class that says how it applies ``(H_l + lambda_l I)^{-1}`` to query gradients of one block
(:meth:`Estimator.precondition`); the shared code turns that into scores (``score[k, j] = -g_k . r_j``),
self-influence and normalized scores, for one process or split over ranks. Adding a method is one module in
``datainf/estimators/`` (or anywhere, for your own) with a subclass decorated by :func:`register`::

    @register
    class Diagonal(Estimator):
        name = "diagonal"
        summary = "diagonal of the Fisher"

        def setup(self):
            self.diag = sum((g * g).sum(0) for _, g in self.block.rows()) / self.block.n

        def precondition(self, V):
            return V / (self.diag + self.damping)

Everything else (the CLI's choices, every experiment's validation, the report) reads :func:`method_names`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators.blocks import BlockRows, paper_damping


class Estimator:
    """How one method applies ``(H + lambda I)^{-1}`` on one block, built once per block and scoring call.

    Class attributes a method sets: ``name`` (registry key), ``summary`` (one line for ``--help``),
    ``options`` (a frozen dataclass of the method's own settings, e.g. LiSSA's iterations, or None),
    ``needs_curvature`` (True: the caller passes Kronecker factors or a fitted curvature, see
    :meth:`prepare`), ``scale_power`` (how its scores scale with the gradients, see below).

    Instance attributes: ``block`` (:class:`BlockRows`, the training gradients G, n x d), ``damping``
    (lambda > 0), ``sq_norms`` ((n,) squared row norms of G), ``opts`` (an instance of ``options`` or None),
    ``shared`` (what :meth:`prepare` returned), ``info`` (a JSON-able dict of per-block diagnostics the
    method may fill, e.g. LiSSA's residual).

    A subclass implements :meth:`precondition` and may override :meth:`setup` (per-block state such as a
    Cholesky factor), :meth:`self_scores` (a cheaper diagonal), :meth:`default_damping` and :meth:`prepare`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    needs_curvature: ClassVar[bool] = False
    #: how the method's scores change when the training and query gradients are both multiplied by ``c`` and
    #: the damping by ``c**2`` (what its default damping rule then gives by itself): times ``c**scale_power``.
    #: 0 for every method that applies ``(H + lambda I)^{-1}``, 2 for the gradient dot product. Scoring uses
    #: it to rescale blocks outside float32's safe range exactly (by a power of two); None (a method that
    #: does not say) refuses such blocks instead.
    scale_power: ClassVar[int | None] = None

    def __init__(self, block: BlockRows, damping: float, sq_norms: Tensor, opts: Any = None, shared: Any = None):
        self.block, self.damping, self.sq_norms, self.opts, self.shared = block, damping, sq_norms, opts, shared
        self.info: dict[str, Any] = {}
        self.setup()

    # ---------------------------------------------------------------- what a method may override
    @classmethod
    def prepare(cls, train: list[tuple[str, Any]], curvature: Any, chunk_size: int) -> Any:
        """Work shared by all blocks of one scoring call (e.g. fitting K-FAC factors); its result is
        ``self.shared``. ``train`` is the list of (block name, rows); ``curvature`` what the caller passed."""
        return None

    @classmethod
    def default_damping(cls, block: BlockRows, sq_norms: Tensor, shared: Any) -> float:
        """The damping when none is given: the paper's rule ``0.1 * mean_i ||g_i||^2 / d``."""
        return paper_damping(sq_norms, block.d)

    def setup(self) -> None:
        """Per-block state computed once (a factorisation, an eigenvalue estimate, ...)."""

    def precondition(self, V: Tensor) -> Tensor:
        """``R = V (H + lambda I)^{-1}`` under the method's approximation: V (m, d) -> R (m, d)."""
        raise NotImplementedError(f"method '{self.name}' does not implement precondition()")

    def precondition_rows(self, rows: Tensor) -> Tensor:
        """``precondition`` applied to training rows, chunk after chunk, to precompute a preconditioned store
        (``datainf.scoring.precondition_store``); a method may override it with a cheaper route for many rows."""
        return self.precondition(rows)

    def scores(self, V: Tensor) -> Tensor:
        """This block's part of the scores, ``-G R^T``: (n, m) for queries V (m, d)."""
        return -self.block.dot(self.precondition(V))

    def self_scores(self) -> Tensor:
        """This block's part of the self-influence ``-g_k^T (H + lambda I)^{-1} g_k``: (n,). The default
        preconditions the training rows chunk by chunk; methods override it with a cheaper form."""
        b = self.block
        out = torch.empty(b.n, dtype=b.dtype, device=b.device)
        for s, gc in b.rows():
            out[s] = -(gc * self.precondition(gc)).sum(dim=1)
        return out


_METHODS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Add a method to the registry (use as a class decorator); its ``name`` must be new."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise DataInfError(f"register() takes an Estimator subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise DataInfError(f"{cls.__name__}: set the class attribute `name` before registering it")
    if cls.options is not None and not dataclasses.is_dataclass(cls.options):
        raise DataInfError(f"method '{cls.name}': `options` must be a dataclass of the method's settings")
    known = _METHODS.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise DataInfError(f"a method named '{cls.name}' is already registered ({known.__qualname__})")
    _METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (for tests and plug-ins that replace one)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> type[Estimator]:
    """The estimator class of ``name``; a clear error listing the registered ones otherwise."""
    if name not in _METHODS:
        raise DataInfError(f"unknown method '{name}'; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def parse_options(name: str, options: Mapping[str, Any]) -> Any:
    """Validate a method's options (a mapping) into its ``options`` dataclass; None for a method without."""
    cls = get_method(name)
    if cls.options is None:
        if options:
            raise DataInfError(f"method '{name}' takes no option(s) {sorted(options)}; allowed: none")
        return None
    allowed = {f.name for f in dataclasses.fields(cls.options)}
    unknown = set(options) - allowed
    if unknown:
        raise DataInfError(f"method '{name}' takes no option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return cls.options(**dict(options))


__all__ = ["Estimator", "get_method", "method_names", "parse_options", "register", "unregister"]
