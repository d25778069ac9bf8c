"""datainf: which training examples made my fine-tuned model do this?

Sign convention (the paper's eq. 2), identical for every method:
``score[k, j] = - sum_l g_{j,l}^T (H_l + lambda_l I)^{-1} g_{k,l}`` is the first-order change of query j's
loss when training example k is up-weighted. Positive = harmful (raises the query's loss),
negative = helpful.

The public API is re-exported here and imported on first use, so that ``import datainf`` (and the
command line's start-up) stays cheap: :func:`influence`, :func:`self_influence`, :func:`score`,
:class:`ScoreArguments`, :class:`ScoreResult`, :func:`per_example_gradients`, :class:`GradientCollector`,
:class:`Attributor`, :class:`GradientStore`, :class:`StreamingWriter`, :func:`method_names`,
:func:`default_damping`, :func:`explain` (many prompts against a training store at once, typed answers) and its
:class:`Explainer`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from datainf.version import __version__

#: public name -> the module that defines it
_PUBLIC = {
    "Attributor": "datainf.attributor",
    "DataInfError": "datainf.errors",
    "Explainer": "datainf.explaining",
    "GradientCollector": "datainf.collector",
    "explain": "datainf.explaining",
    "GradientStore": "datainf.store",
    "StreamingWriter": "datainf.store",
    "ScoreArguments": "datainf.estimators",
    "ScoreResult": "datainf.estimators",
    "default_damping": "datainf.estimators",
    "influence": "datainf.estimators",
    "method_names": "datainf.estimators",
    "score": "datainf.estimators",
    "score_self": "datainf.estimators",
    "self_influence": "datainf.estimators",
    "per_example_gradients": "datainf.gradients",
    "tracked_parameters": "datainf.gradients",
}

#: modules that moved in 0.2 -> where they live now (the old names still import, with a warning)
MOVED_MODULES = {
    "datainf.finetune": "datainf.models.finetune",
    "datainf.llm": "datainf.models.llm",
    "datainf.diffusion": "datainf.models.diffusion",
    "datainf.kfac": "datainf.estimators.kfac",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import datainf.finetune`` gives ``datainf.models.finetune`` (the same module object)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        warnings.warn(f"{spec.name} has moved to {MOVED_MODULES[spec.name]}; import that instead",
                      DeprecationWarning, stacklevel=4)
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: Any) -> None:
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in ("METHODS", "ALL_METHODS"):
        return getattr(importlib.import_module("datainf.estimators"), name)
    if f"datainf.{name}" in MOVED_MODULES:
        return importlib.import_module(f"datainf.{name}")
    raise AttributeError(f"module 'datainf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = ["__version__", *sorted(_PUBLIC)]
