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

A method whose preconditioner is the same for every query (a d x d matrix, an eigenbasis, a diagonal) can fit
it once from the training blocks: :meth:`Estimator.fit` returns a :class:`FittedState` (tensors + JSON
metadata) and sets ``state_file``; scoring a store then caches the state inside the store (checksummed,
refitted when the store, the settings it depends on or its bytes change: :mod:`datainf.fitted`) and hands it
to every block's estimator as ``self.shared``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from datainf.errors import DataInfError
from datainf.estimators.blocks import BlockRows, paper_damping


@dataclass
class FittedState:
    """What a method fitted once from the training blocks (:meth:`Estimator.fit`): ``tensors`` (name ->
    tensor, usually ``"<block>::<what>"``) and ``meta`` (JSON-able: what the tensors mean, per-block numbers
    such as the damping the state was fitted for, a breakdown of the fit's time). ``seconds``: how long the fit
    took (of the run that made it, for a cached state); ``cached``: read from the store's cache, not fitted
    now."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False


class Estimator:
    """How one method applies ``(H + lambda I)^{-1}`` on one block, built once per block and scoring call.

    Class attributes a method sets: ``name`` (registry key), ``summary`` (one line for ``--help``),
    ``options`` (a frozen dataclass of the method's own settings, e.g. LiSSA's iterations, or None),
    ``needs_curvature`` (True: it cannot score without a fitted state or the Kronecker factors the caller
    passes, see :meth:`prepare`), ``scale_power`` (how its scores scale with the gradients, see below),
    ``state_file`` / ``state_format`` / ``state_version`` (its fitted state's cache, see :meth:`fit`).

    Instance attributes: ``block`` (:class:`BlockRows`, the training gradients G, n x d), ``damping``
    (lambda > 0), ``sq_norms`` ((n,) squared row norms of G), ``opts`` (an instance of ``options`` or None),
    ``shared`` (what :meth:`prepare` returned), ``info`` (a JSON-able dict of per-block diagnostics the
    method may fill, e.g. LiSSA's residual).

    A subclass implements :meth:`precondition` and may override :meth:`setup` (per-block state such as a
    Cholesky factor), :meth:`self_scores` (a cheaper diagonal), :meth:`default_damping`, :meth:`prepare`, and
    :meth:`fit` with :meth:`state_settings` (a query-independent state fitted once and cached in the store).
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
    #: the file name of the fitted state's cache inside a store (``fitted-<name>.safetensors`` by convention;
    #: methods sharing one state may share one file); None for a method without a fitted state
    state_file: ClassVar[str | None] = None
    #: True: the preconditioner is symmetric and the same for every query, so ``v^T P g = v . (P g)`` and a
    #: store's rows can be preconditioned once (``datainf store precondition``, :meth:`precondition_rows`)
    symmetric: ClassVar[bool] = False
    #: the ``format`` recorded in the cache's metadata, and the version of the state's layout: a cache of
    #: another version is fitted again (not refused)
    state_format: ClassVar[str] = "datainf-fitted-state"
    state_version: ClassVar[int] = 1

    def __init__(self, block: BlockRows, damping: float, sq_norms: Tensor, opts: Any = None, shared: Any = None):
        self.block, self.damping, self.sq_norms, self.opts, self.shared = block, damping, sq_norms, opts, shared
        self.info: dict[str, Any] = {}
        self.setup()

    # ---------------------------------------------------------------- what a method may override
    @classmethod
    def fit(cls, train: list[tuple[str, Any]], arguments: Any) -> FittedState | None:
        """The method's query-independent state, fitted once from the training blocks (``train``: the list of
        (block name, rows), e.g. a store's memory-mapped blocks) under ``arguments`` (a
        :class:`~datainf.estimators.ScoreArguments`). None (the default): the method has no fitted state.
        A state may leave blocks out (e.g. blocks too large for a d x d matrix): :meth:`setup` then works as
        without one. Scoring a store calls it only when the store holds no sound cache for the same
        :meth:`state_settings`, and passes the state to :meth:`prepare`."""
        return None

    @classmethod
    def check_diagnostics(cls, diagnostics: dict[str, dict[str, Any]]) -> None:
        """Once per scoring call, after every block is scored: warn about what this method's per-block
        ``diagnostics`` (block name -> what :attr:`info` gathered) say the user should know (LiSSA: a recursion
        that has not converged). Default: nothing to say."""

    @classmethod
    def state_settings(cls, arguments: Any) -> dict[str, Any]:
        """The part of ``arguments`` the fitted state depends on (JSON-able; e.g. the damping, the compute
        dtype, an option): recorded in the cache, which is fitted again when they differ. Default: nothing
        (the state depends on the store's gradients alone)."""
        return {}

    @classmethod
    def prepare(cls, train: list[tuple[str, Any]], given: Any, chunk_size: int) -> Any:
        """Work shared by all blocks of one scoring call; its result is ``self.shared``. ``train`` is the list
        of (block name, rows); ``given`` is the :class:`FittedState` scoring a store fitted or read from its
        cache, or whatever an in-memory caller passed (K-FAC: ``factors=``). The default passes a
        :class:`FittedState` on and drops anything else."""
        return given if isinstance(given, FittedState) else None

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

    @property
    def one_pass(self) -> bool:
        """True when this block's scores are ``-G precondition(V)^T``: the scoring path then preconditions the
        queries and takes the product in its one sweep over every such block's rows (instead of calling
        :meth:`scores` block by block). Default: the method does not override :meth:`scores`; a method whose
        override is only for some blocks (exact's Gram route) says so here."""
        return type(self).scores is Estimator.scores

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
    if cls.state_file is not None and (not isinstance(cls.state_file, str) or "/" in cls.state_file
                                       or not cls.state_file.endswith(".safetensors")):
        raise DataInfError(f"method '{cls.name}': `state_file` must be a file name ending .safetensors, got "
                           f"{cls.state_file!r}")
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


def accepted_options(name: str, **values: Any) -> dict[str, Any]:
    """Of ``values`` (e.g. ``iterations=10`` for every method of a table), those the method ``name``
    declares in its options dataclass: what a caller with settings for several methods passes to each."""
    return {k: v for k, v in values.items() if k in allowed_options(name)}


def allowed_options(name: str) -> list[str]:
    cls = get_method(name)
    return [] if cls.options is None else [f.name for f in dataclasses.fields(cls.options)]


def value_of(text: str, hint: Any) -> Any:
    """``text`` as the type a field is annotated with (int, float, bool, str, or one of them or None)."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if type(None) in typing.get_args(hint) and text.lower() in ("none", "null"):
        return None
    kind = kinds[0]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    return kind(text) if kind in (int, float, str) else text


def options_from_text(methods: Sequence[str], pairs: Sequence[str], optional: Sequence[str] = ()
                      ) -> dict[str, dict[str, Any]]:
    """Each method's options from ``NAME=VALUE`` texts (``--option``): ``METHOD.NAME=VALUE`` for one method, a
    bare ``NAME`` for every method of ``methods`` that has it; each value converted to its field's type and the
    whole validated by the method's options dataclass (``optional``: more pairs, left out where no chosen method
    has the name, as an old flag such as ``--lissa-iterations`` was). Refused, naming the methods and their allowed names: a
    text without ``=``, a name no chosen method has, a value of the wrong type."""
    allowed = {m: allowed_options(m) for m in methods}
    listing = "; ".join(f"{m}: {', '.join(a) or 'none'}" for m, a in allowed.items())
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    names = {n for a in allowed.values() for n in a}
    pairs = [*pairs, *(p for p in optional if p.partition("=")[0].rpartition(".")[2].strip() in names)]
    for pair in pairs:
        key, sep, text = str(pair).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise DataInfError(f"--option {pair}: give NAME=VALUE or METHOD.NAME=VALUE (e.g. --option "
                               f"lissa.iterations=50); allowed for the chosen methods: {listing}")
        method, _, name = key.rpartition(".")
        if method and method not in allowed:
            raise DataInfError(f"--option {pair}: method '{method}' is not among the chosen methods "
                               f"({', '.join(methods)}); allowed: {listing}")
        targets = [m for m in ([method] if method else methods) if name in allowed[m]]
        if not targets:
            raise DataInfError(f"--option {pair}: {'method ' + repr(method) if method else 'no chosen method'} "
                               f"takes an option '{name}'; allowed: {listing}")
        for m in targets:
            hint = typing.get_type_hints(get_method(m).options)[name]
            try:
                out[m][name] = value_of(text, hint)
            except ValueError:
                raise DataInfError(f"--option {pair}: method '{m}' wants {getattr(hint, '__name__', hint)} for "
                                   f"'{name}', not {text!r}; allowed: {listing}") from None
    for m, given in out.items():
        if given:
            try:
                parse_options(m, given)
            except (TypeError, DataInfError) as e:
                raise DataInfError(f"--option: method '{m}': {e}; allowed: {listing}") from None
    return {m: given for m, given in out.items() if given}


__all__ = ["Estimator", "FittedState", "accepted_options", "get_method", "method_names", "options_from_text", "parse_options", "register",
           "unregister"]
