"""Every command-line flag that more than one command takes, spelled, typed and explained once.

A command asks for a flag with :func:`option` (``@option("--seed")``, or with its own help or default where the
meaning differs: ``@option("--out", "out_dir", help=...)``); the spelling, type and usual help live in
:data:`FLAGS`. The scoring flags come as one group, :func:`scoring_options`: ``--method`` (one spelling,
repeatable or comma-separated, checked against the registry once, in the option itself), ``--damping``,
``--option NAME=VALUE`` (a method's own options, validated by its options dataclass), ``--compute-dtype`` and
``--normalize``; the command receives them as one :class:`Scoring` value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import click

from datainf.errors import DataInfError

_FOLDER = click.Path(file_okay=False)
_EXISTING_FOLDER = click.Path(exists=True, file_okay=False)
_FILE = click.Path(dir_okay=False)

class TaskName(click.ParamType):
    """A named task of :data:`datainf.tasks.NAMED_TASKS`, checked when the option is read (that module imports
    torch, which ``--help`` does not)."""

    name = "task"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from datainf.tasks import get_task

        try:
            return get_task(value).name
        except DataInfError as e:
            self.fail(str(e), param, ctx)


#: flag -> click.option keywords (type, default, help ...); "dest" is the parameter name when it is not the flag's
FLAGS: dict[str, dict[str, Any]] = {
    "--out": {"type": _FILE, "help": "The output."},
    "--overwrite": {"is_flag": True, "help": "Replace an existing --out file that is not one this command wrote "
                                             "(an output that is or holds an input is refused all the same)."},
    "--device": {"default": None, "help": "cpu or cuda[:N]; default cuda when available."},
    "--seed": {"type": int, "default": 0, "help": "Seed of the sample, the label noise and the training."},
    "--model": {"dest": "model_dir", "type": _EXISTING_FOLDER, "help": "Local Hugging Face base model folder."},
    "--adapter": {"type": _EXISTING_FOLDER, "help": "LoRA adapter folder."},
    "--run": {"dest": "run_dir", "type": _EXISTING_FOLDER, "default": None, "help": "A fine-tuning run folder."},
    "--store": {"dest": "store_dir", "type": _FOLDER, "help": "Gradient store folder."},
    "--queries": {"dest": "query_dir", "type": _FOLDER, "default": None,
                  "help": "Gradient store of the queries (e.g. the validation set)."},
    "--data": {"dest": "data_path", "type": click.Path(), "help": "JSONL, JSON, CSV/TSV, parquet or a save_to_disk "
                                                                 "folder."},
    "--scores": {"dest": "scores_path", "type": _FILE, "required": True,
                 "help": "A scores file from `datainf score`."},
    "--task": {"type": TaskName(), "metavar": "TASK", "help": "What the examples are."},
    "--dataset": {"default": "rotten_tomatoes", "help": "Built-in offline labelled set, a local file, or glue:TASK."},
    "--n-train": {"type": int, "default": 1000, "help": "Training examples drawn."},
    "--n-val": {"type": int, "default": 200, "help": "Validation examples drawn."},
    "--noise": {"type": float, "default": 0.2, "help": "Share of training labels flipped."},
    "--classes": {"type": int, "default": 10, "help": "Number of classes (generated tasks: 2-10)."},
    "--num-labels": {"type": click.IntRange(min=2), "default": None, "help": "Classification: number of classes."},
    "--rank": {"type": int, "default": None, "help": "LoRA rank."},
    "--alpha": {"type": float, "default": None, "help": "LoRA alpha."},
    "--target-modules": {"default": None, "help": "Comma-separated module names to adapt."},
    "--epochs": {"type": int, "default": 3, "help": "Fine-tuning epochs."},
    "--lr": {"type": float, "default": 1e-3, "help": "Fine-tuning learning rate."},
    "--head-lr": {"type": float, "default": None, "help": "Classification: learning rate of the new head."},
    "--pooling": {"default": "pooler", "show_default": True, "help": "Classification: what the head reads."},
    "--batch-size": {"type": int, "default": 16, "help": "Examples per batch."},
    "--max-length": {"type": click.IntRange(min=2), "default": 128, "help": "Token limit per example."},
    "--checkpoints": {"type": click.IntRange(min=0), "default": 0, "show_default": True,
                      "help": "Also use this many evenly spaced checkpoints of fine-tuning."},
    "--dtype": {"type": click.Choice(["float32", "float16", "bfloat16", "float64"]), "default": None,
                "help": "Storage dtype of the gradients."},
    "--k": {"type": click.IntRange(min=1), "default": 20, "help": "Examples per list (helpful, harmful)."},
    "--nprobe": {"type": click.IntRange(min=1), "default": None, "help": "IVF lists searched."},
    "--index": {"dest": "index_dir", "type": click.Path(file_okay=False), "default": None,
                "help": "A top-k index of --store (`datainf index build`, for the --method asked): the top examples "
                        "from it, without a pass over the store."},
    "--candidates": {"type": click.IntRange(min=1), "default": None,
                     "help": "Compact index: rows re-ranked by their exact scores per list, times k."},
    "--format": {"dest": "out_format", "type": click.Choice(["jsonl", "csv"]), "default": "jsonl",
                 "help": "Output format."},
    "--weighting": {"type": click.Choice(["weights", "standardized", "squared-standardized"]), "default": "weights",
                    "show_default": True,
                    "help": "With a run's checkpoints: how their scores are summed: by learning rate (weights); each "
                            "checkpoint's scores divided by their standard deviation first (standardized); or that "
                            "with the learning rates squared (squared-standardized: math identification 0.917 "
                            "against 0.836, docs/results.md)."},
    "--allow-mismatch": {"is_flag": True, "help": "Score across stores made with another adapter or task (a "
                                                  "cross-checkpoint comparison); the differences are recorded."},
    "--normalize": {"is_flag": True, "help": "Cosine similarity after preconditioning: divide each score by both "
                                             "gradients' preconditioned norms (TrackStar)."},
    "--damping": {"type": float, "default": None,
                  "help": "One damping for every block; default each method's rule (the paper's for DataInf)."},
    "--compute-dtype": {"type": click.Choice(["float32", "float64"]), "default": None,
                        "help": "Compute dtype; default float32 (float64 for a float64 store)."},
    "--lissa-iterations": {"type": click.IntRange(min=1), "default": None,
                           "help": "Same as --option iterations=N (LiSSA's recursion steps; default 100)."},
    "--variant": {"dest": "variants", "multiple": True, "metavar": "SPEC",
                  "help": "Also score this variant (repeatable; row named by the spec): METHOD:KEY=VALUE,... e.g. "
                          "ekfac:damping_scale=10, identity:normalize, datainf:remove_top=2 (keys: damping, normalize, "
                          "remove_top, damping_scale, damping_rule, dtype, or the method's options)."},
    "--option": {"dest": "method_options", "multiple": True, "metavar": "[METHOD.]NAME=VALUE",
                 "help": "A method's own option (e.g. iterations=50 for lissa), repeatable; a bare NAME goes to every "
                         "chosen method that has it. See each method's options in `datainf.estimators`."},
    # the remedies of datainf.remedies (ScoreArguments fields of the same names; docs/math.md, "Remedies")
    "--remove-top": {"dest": "remove_top", "type": click.IntRange(min=0), "default": 0, "metavar": "R",
                     "help": "Remove the training gradients' top R principal directions of every block from training "
                             "and query gradients before the method (Bergson's style-subspace removal)."},
    "--adam-moments": {"dest": "adam_moments", "type": click.Path(), "default": None, "metavar": "FILE",
                       "help": "Adam-normalized gradients (TrackStar, LESS): divide by sqrt(v)+eps of the LoRA "
                               "parameters' second moments (optimizer_second_moments.safetensors, or the adapter "
                               "folder holding it, saved by `datainf finetune`), then unit norm."},
    "--damping-scale": {"dest": "damping_scale", "type": float, "default": 1.0, "metavar": "X",
                        "help": "Multiply every block's damping by X (the damping as a knob: 0.001-10 x the rule)."},
    "--damping-rule": {"dest": "damping_rule", "type": click.Choice(["rank"]), "default": None,
                       "help": "rank: 0.1 * mean ||g||^2 / min(n, d) per block, instead of the method's rule."},
}
#: the remedy flags' parameter names (ScoreArguments fields)
REMEDIES = ("remove_top", "adam_moments", "damping_scale", "damping_rule")


def option(flag: str, dest: str | None = None, **overrides: Any) -> Callable[[Any], Any]:
    """The click option ``flag`` as :data:`FLAGS` defines it, with this command's parameter name and overrides
    (its own help, default, type or ``required``)."""
    spec = {**FLAGS[flag], **overrides}
    name = dest or spec.pop("dest", None)
    spec.pop("dest", None)
    return click.option(flag, *([name] if name else []), **spec)


def method_names_of(value: Any, registered: bool = True) -> tuple[str, ...]:
    """Method names from ``--method`` values: comma-separated and/or repeated, a repeat kept once, each one
    registered (unless ``registered`` is False: the methods of a scores file); a value with no name is refused."""
    from datainf.estimators import method_names

    parts = [value] if isinstance(value, str) else list(value or ())
    names = tuple(dict.fromkeys(m.strip() for part in parts for m in str(part).split(",") if m.strip()))
    for name in names if registered else ():
        if name not in method_names():
            raise DataInfError(f"unknown method '{name}'; choose from {', '.join(method_names())}")
    if parts and not names:
        raise DataInfError("--method needs at least one method")
    return names


def declared(name: str) -> Callable[[], Any]:
    """A default read from :mod:`datainf.estimators.defaults` when the option is read (the module imports torch,
    which ``--help`` does not)."""

    def default() -> Any:
        import importlib

        return getattr(importlib.import_module("datainf.estimators.defaults"), name)

    return default


def method_option(default: Sequence[str] | str | Callable[[], Any] | None = None,
                  help: str | None = None, *,
                  single: bool = False, registered: bool = True, dest: str = "methods") -> Callable[[Any], Any]:
    """``--method`` (``--methods`` is the same option), parsed once, in the option: names comma-separated or
    repeated, checked against the registry; the command gets a tuple of names (empty when not given and
    ``default`` is None), or with ``single`` one name (or None). A callable ``default`` is called when the
    option is read (a default from :mod:`datainf.estimators.defaults`, imported only then)."""

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        names = method_names_of(value, registered)
        if single and len(names) > 1:
            raise DataInfError(f"--method takes one method here, got {', '.join(names)}")
        return (names[0] if names else None) if single else names

    if callable(default):
        pass
    elif single:
        default = default if isinstance(default, str) or default is None else ",".join(default)
    else:
        default = tuple([default] if isinstance(default, str) else default or ())
    return click.option("--method", "--methods", dest, multiple=not single, default=default, callback=parse,
                        show_default=True,
                        help=help or "Methods, comma-separated or repeated (--method datainf --method exact); a name "
                                     "that is not registered is refused with the list of those that are.")


@dataclass(frozen=True)
class Scoring:
    """What the scoring flags asked for: methods, damping, compute dtype, normalize, and each method's options
    (validated by its options dataclass when the flags are read)."""

    methods: tuple[str, ...]
    damping: float | None = None
    dtype: str | None = None
    normalize: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the remedies asked for (ScoreArguments fields of datainf.remedies: remove_top, adam_moments, ...)
    remedies: dict[str, Any] = field(default_factory=dict)
    #: --option texts (and --lissa-iterations') kept until the methods are known (no --method: the store decides)
    option_texts: tuple[str, ...] = ()
    old_option_texts: tuple[str, ...] = ()

    def or_default(self, token_level: bool, question: str = "per_query") -> Scoring:
        """These flags with the default of a store whose task is (or is not) over tokens, for the question asked
        (:func:`datainf.estimators.defaults.default_spec`: a method and the options measured best with it,
        each option applied where its flag was left at its default) when no --method was given; the --option
        texts are validated against that method then."""
        from datainf.estimators import ScoreArguments, arguments_from_spec, options_from_text
        from datainf.estimators.defaults import default_spec

        if self.methods:
            return self
        spec = arguments_from_spec(default_spec(token_level, question))
        plain = ScoreArguments(method=spec.method)
        changed = {f: getattr(spec, f) for f in ("damping", "dtype", "normalize", *REMEDIES)
                   if getattr(spec, f) != getattr(plain, f)}
        methods = (spec.method,)
        mine = {"damping": self.damping, "dtype": self.dtype, "normalize": self.normalize, **self.remedies}
        untouched = {f: v for f, v in changed.items() if mine.get(f, getattr(plain, f)) == getattr(plain, f)}
        options = options_from_text(methods, self.option_texts, optional=self.old_option_texts)
        return replace(self, methods=methods, options={spec.method: {**spec.options, **options.get(spec.method, {})}},
                       damping=untouched.get("damping", self.damping), dtype=untouched.get("dtype", self.dtype),
                       normalize=untouched.get("normalize", self.normalize),
                       remedies={**self.remedies, **{f: v for f, v in untouched.items() if f in REMEDIES}})

    def arguments(self, method: str, **fields: Any) -> Any:
        """The :class:`~datainf.estimators.ScoreArguments` of one method under these flags (``fields``: the
        command's own, e.g. device or mean_query)."""
        from datainf.estimators import ScoreArguments

        return ScoreArguments(method=method, damping=self.damping, dtype=self.dtype, normalize=self.normalize,
                              options=self.options.get(method, {}), **self.remedies, **fields)


def read_scoring(methods: Sequence[str], damping: float | None, compute_dtype: str | None, normalize: bool,
                 method_options: Sequence[str], lissa_iterations: int | None = None, **remedies: Any) -> Scoring:
    """One :class:`Scoring` from the flags; ``--lissa-iterations N`` is ``--option iterations=N`` for the chosen
    methods that have that option (ignored when none has, as before); ``remedies``: the remedy flags' values."""
    from datainf.estimators import options_from_text

    old = [f"iterations={lissa_iterations}"] if lissa_iterations is not None else []
    return Scoring(methods=tuple(methods), damping=damping, dtype=compute_dtype, normalize=normalize,
                   options=options_from_text(methods, method_options, optional=old) if methods else {},
                   remedies={k: v for k, v in remedies.items() if k in REMEDIES},
                   option_texts=tuple(method_options), old_option_texts=tuple(old))


SCORING_KEY = "datainf.scoring"


def scoring_options(methods: Sequence[str] = (), *, into: str | None = "scoring",
                    with_method: bool = True, normalize_help: str | None = None,
                    method_help: str | None = None) -> Callable[[Any], Any]:
    """``--method --damping --option --lissa-iterations --compute-dtype --normalize`` and the remedy flags
    (``--remove-top --adam-moments --damping-scale --damping-rule``) as one group; the command
    gets one :class:`Scoring` as the parameter ``into`` or, with ``into=None``, finds it in
    ``ctx.meta[SCORING_KEY]`` (see :func:`current_scoring`). ``with_method=False``: the command declares
    :func:`method_option` itself and keeps its ``methods`` parameter."""
    names = ("damping", "compute_dtype", "normalize", "method_options", "lissa_iterations")

    def decorate(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            chosen = kwargs.pop("methods") if with_method else kwargs["methods"]
            scoring = read_scoring(chosen, *(kwargs.pop(n) for n in names), **{n: kwargs.pop(n) for n in REMEDIES})
            if into is None:
                click.get_current_context().meta[SCORING_KEY] = scoring
            else:
                kwargs[into] = scoring
            return f(*args, **kwargs)

        decorators = [option("--damping"), option("--option"), option("--lissa-iterations"),
                      option("--compute-dtype"), option("--normalize", **({"help": normalize_help}
                                                                           if normalize_help else {}))]
        decorators += [option(flag) for flag in ("--remove-top", "--adam-moments", "--damping-scale", "--damping-rule")]
        for deco in reversed([method_option(methods, method_help)] * with_method + decorators):
            wrapper = deco(wrapper)
        return wrapper

    return decorate


def current_scoring() -> Scoring:
    """The :class:`Scoring` of the running command (one decorated with ``scoring_options(into=None)``)."""
    ctx = click.get_current_context(silent=True)
    scoring = ctx.meta.get(SCORING_KEY) if ctx is not None else None
    return scoring if isinstance(scoring, Scoring) else Scoring(methods=())


def device_option(f: Any) -> Any:
    """``--device``."""
    return option("--device")(f)


def overwrite_option(f: Any) -> Any:
    """``--overwrite``: replace an existing output that this command did not write (see datainf.outputs)."""
    return option("--overwrite")(f)


__all__ = ["FLAGS", "REMEDIES", "SCORING_KEY", "Scoring", "TaskName", "current_scoring", "declared", "device_option", "method_names_of", "method_option", "option",
           "overwrite_option", "read_scoring", "scoring_options"]
