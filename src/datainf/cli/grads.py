"""`datainf grads`: per-example gradients of a data file into a gradient store (resumable; torchrun-ready)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from datainf.cli.common import (
    data_options,
    load_model,
    make_collator,
    model_dtype_option,
    rank_device,
    read_data,
    run_labels,
    setup,
    tokenization_differences,
)
from datainf.cli.options import device_option, option
from datainf.data.labels import describe
from datainf.errors import DataInfError
from datainf.outputs import check_apart


@click.command("grads")
@option("--model", required=True)
@option("--adapter", "adapter_dir", default=None,
        help="LoRA adapter folder (from `datainf finetune`, TRL, the Trainer or peft's save_pretrained).")
@option("--run", help="A fine-tuning run folder instead of --adapter (`datainf finetune --checkpoints K`'s --out, or a "
                   "Trainer / TRL output_dir with checkpoint-N folders): one store per checkpoint, --store/"
                   "checkpoint-STEP, and datainf_run.json saying each one's learning rate; complete stores are "
                   "kept, interrupted ones resumed. A run DatainfCallback recorded is tokenized as it trained "
                   "(its datainf_training.json: --max-length, --loss-tokens, --truncation...) unless these "
                   "options are given.")
@option("--data", required=True)
@option("--store", required=True, help="Gradient store folder (created, or resumed when it exists); with --run, the folder of the run's "
                   "stores.")
@option("--task", default=None,
        help="classification: cross-entropy; causal_lm: NLL summed over the loss tokens; causal_lm_mean: averaged "
             "over them. Default: the task the adapter folder records (datainf_finetune.json, or PEFT's task_type "
             "in adapter_config.json), else classification.")
@data_options
@option("--num-labels", help="Classification: number of classes; default what `datainf finetune` recorded, else 2.")
@click.option("--labels-from", "labels_from", type=click.Path(file_okay=False), default=None,
              help="Classification: read class names with the mapping of this (training) store, e.g. for a "
                   "validation file that lacks some classes; default the adapter's, else this file's sorted names.")
@click.option("--skip-nonfinite", is_flag=True,
              help="Drop the examples whose loss is NaN or infinite (recorded in the store's manifest) instead of "
                   "refusing the run; costs one forward pass over the data.")
@option("--batch-size")
@click.option("--chunk-size", type=int, default=256, help="Examples per store shard (unit of resumption).")
@option("--dtype", default="float32")
@option("--max-length")
@click.option("--project", "project_dim", type=click.IntRange(min=1), default=None, metavar="K",
              help="Project every gradient inside the hooks with fixed seeded random matrices: each side of a "
                   "module larger than K becomes K (LoRA A r x d_in -> r x K, B d_out x r -> K x r). Queries must "
                   "use the same K and seed. Default: full gradients.")
@click.option("--project-seed", type=click.IntRange(min=0), default=0, help="Seed of the projection matrices.")
@click.option("--initial", is_flag=True,
              help="Step 0 from the final adapter alone (causal LM): gradients at a fresh LoRA of the adapter's own "
                   "config, B = 0 and A drawn with the seed `datainf finetune` recorded (else --seed), i.e. the "
                   "LoRA before the first optimizer step. Queries need the same --initial (and seed).")
@click.option("--seed", "initial_seed", type=click.IntRange(min=0), default=None,
              help="With --initial, for an adapter that records no seed (TRL, the Trainer): the seed A is drawn "
                   "with; default 0. The line printed says which seed was used.")
@model_dtype_option
@device_option
@click.pass_context
def command(ctx: click.Context, model_dir: str, adapter_dir: str | None, run_dir: str | None, data_path: str,
            store_dir: str, task: str | None,
            num_labels: int | None, labels_from: str | None, skip_nonfinite: bool, batch_size: int, chunk_size: int,
            dtype: str, max_length: int, project_dim: int | None, project_seed: int, initial: bool,
            initial_seed: int | None, model_dtype: str, device: str | None, **data: Any) -> None:
    """Per-example gradients of a dataset into a gradient store (resumes an interrupted run)."""
    from datainf.attributor import Attributor
    from datainf.distributed import init_distributed, is_main_process
    from datainf.gradients import ProjectionSettings
    from datainf.store import disk_full

    # the store itself resumes, or refuses a folder that is not one (datainf.store); here: apart from the inputs
    check_apart(store_dir, {"model folder": model_dir, "adapter folder": adapter_dir, "data file": data_path,
                            "--labels-from store": labels_from, "run folder": run_dir}, option="--store")
    jobs = [(adapter_dir, store_dir)]
    if initial_seed is not None and not initial:
        raise DataInfError("--seed is the seed of --initial's LoRA A matrices: give --initial too, or drop --seed")
    if initial and (run_dir is not None or adapter_dir is None or task == "classification"):
        raise DataInfError("--initial builds step 0 from one final --adapter of a causal LM (--task causal_lm or "
                           "causal_lm_mean); a --run folder already holds checkpoint-0")
    if run_dir is not None:
        jobs = run_jobs(run_dir, adapter_dir, store_dir)
        adapter_dir = jobs[0][0]
    task, said = task_for(task, adapter_dir)
    recorded = None
    if task != "classification":  # a run DatainfCallback recorded: tokenize as it trained, unless told otherwise
        recorded = callback_tokenization(run_dir, adapter_dir)
    progress, device = setup(ctx, device)
    device = rank_device(device, init_distributed())
    progress = progress and is_main_process()
    if said and progress:
        click.echo(said, err=True)
    names, source = None, ""
    if task == "classification":
        names, num_labels, source = run_labels(adapter_dir, labels_from, num_labels)
    elif labels_from is not None:
        raise DataInfError("--labels-from applies to --task classification only")
    # labels are read with the run's mapping and checked against the classes before anything is written
    records = read_data(data_path, task, label_names=names, num_labels=num_labels, **data)
    names = getattr(records, "label_names", None)
    if initial:
        import torch

        from datainf.models.initial import initial_lora

        model, tokenizer, seed_used, seed_source = initial_lora(model_dir, adapter_dir, seed=initial_seed,
                                                                dtype=getattr(torch, model_dtype), device=device)
        if is_main_process():
            click.echo(f"step 0 of {adapter_dir}: a fresh LoRA of its config, B = 0, A drawn with seed {seed_used} "
                       f"({seed_source})")
    else:
        model, tokenizer = load_model(model_dir, adapter_dir, task, num_labels, device, model_dtype)
    if recorded is not None:
        max_length, data, applied, overridden = apply_recorded(ctx, recorded[1], max_length, data)
        if is_main_process():
            if overridden:
                click.echo(f"warning: {' '.join(overridden)} given here, but {recorded[0]} records that the run "
                           f"trained with {recorded[1]['grads_options']}: these gradients are not of its training "
                           "loss; leave those options out to use the recorded ones", err=True)
            if applied and progress:
                click.echo(f"tokenized as the run trained ({recorded[0]}): {' '.join(applied)}", err=True)
    collate = make_collator(tokenizer, task, max_length, **data)
    for i, (adapter_dir, store_dir) in enumerate(jobs):
        if i:
            from datainf.models.checkpoints import load_adapter_weights

            load_adapter_weights(model, adapter_dir)
        if task != "classification" and recorded is None and is_main_process():
            differences = tokenization_differences(adapter_dir, collate.settings())
            if differences:
                click.echo(f"warning: {adapter_dir} was fine-tuned on examples tokenized otherwise "
                           f"({'; '.join(differences)}): these gradients are not of its training loss; pass the "
                           "options it was trained with", err=True)
        attributor = Attributor(model, task=task, store=store_dir, tokenizer=tokenizer, collate=collate,
                                batch_size=batch_size, chunk_size=chunk_size, store_dtype=dtype, progress=progress,
                                label_names=names, skip_nonfinite=skip_nonfinite,
                                projection=None if project_dim is None else ProjectionSettings(project_dim,
                                                                                               project_seed))
        try:
            store = attributor.fit(records)
        except OSError as e:
            if not disk_full(e):
                raise
            raise DataInfError(f"the disk is full: writing the store {store_dir} ({e}); free some space, then rerun "
                               "the same command: it resumes after the chunks written") from None
        if is_main_process():
            shown = f" (labels {describe(names)}, from {source})" if names else ""
            projected = f" (projected, k={project_dim}, seed {project_seed})" if project_dim is not None else ""
            dropped = store.metadata.dropped
            skipped = (f"; dropped {len(dropped)} examples with a non-finite loss: rows "
                       f"{', '.join(str(d['row']) for d in dropped[:10])}{', ...' if len(dropped) > 10 else ''}"
                       if dropped else "")
            cut = store.metadata.truncated
            truncated = (f"; {cut['examples']} examples cut to --max-length {cut['max_length']} (the longest "
                         f"{'>= ' if cut.get('longest_is_a_lower_bound') else ''}{cut['longest']} tokens)"
                         if cut else "")
            click.echo(f"stored gradients of {store.n_examples} examples, {len(store.block_names)} blocks"
                       f"{projected}, in {store_dir}{shown}{skipped}{truncated}")


def task_for(task: str | None, adapter_dir: str | None) -> tuple[str, str | None]:
    """(the task, a line saying where it came from or None): ``--task``, else the one the adapter folder
    records, else the default. Refused: a ``--task`` of another kind (classifier / causal LM) than the adapter
    was fine-tuned as, naming the file that says so."""
    from datainf.tasks import DEFAULT_TASK, get_task, recorded_task

    recorded = recorded_task(adapter_dir)
    if task is None:
        if recorded is None:
            return DEFAULT_TASK, None
        return recorded[0], f"task {recorded[0]} (recorded in {recorded[1]}; --task overrides it)"
    if recorded is not None and get_task(task).collate != get_task(recorded[0]).collate:
        raise DataInfError(f"--task {task}, but {recorded[1]} says the adapter was fine-tuned as {recorded[0]}; "
                           f"pass --task {recorded[0]} (or leave --task out to use it)")
    return task, None


def run_jobs(run_dir: str, adapter_dir: str | None, store_dir: str) -> list[tuple[str, str]]:
    """(adapter, store) of every checkpoint of ``run_dir`` (final first: its tokenizer is loaded), after
    recording them in ``store_dir``'s datainf_run.json. Refused: --adapter beside --run, and a --store folder
    that already holds anything but run stores."""
    from datainf.combine import is_run_stores, write_run_stores
    from datainf.distributed import is_main_process
    from datainf.models.checkpoints import run_checkpoints

    if adapter_dir is not None:
        raise DataInfError("--run gives the adapters (every checkpoint of the run): leave out --adapter")
    checkpoints = run_checkpoints(run_dir)
    folder = Path(store_dir)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_run_stores(folder))):
        raise DataInfError(f"--store {store_dir} exists and is not a folder of run stores (no datainf_run.json); "
                           "with --run give a new folder, or the one an earlier `datainf grads --run` wrote")
    if is_main_process():
        stores = write_run_stores(folder, run_dir, checkpoints)
    else:
        stores = [folder / f"checkpoint-{c.step}" for c in checkpoints]
    paths = [str(getattr(s, "path", s)) for s in stores]
    return [(str(c.adapter), p) for c, p in reversed(list(zip(checkpoints, paths)))]


#: the `datainf grads` options that decide how a causal LM example is tokenized, by their TextCollator setting
#: (name, default when the recorded settings leave it out, option)
TOKENIZATION_OPTIONS = (("max_length", None, "--max-length"), ("loss_tokens", "assistant", "--loss-tokens"),
                        ("chat_template", False, "--chat-template"), ("assistant_turns", "all", "--assistant-turns"),
                        ("truncation", "auto", "--truncation"))


def callback_tokenization(run_dir: str | None, adapter_dir: str | None) -> tuple[str, dict[str, Any]] | None:
    """(the file, its tokenization record) of a run DatainfCallback recorded: ``datainf_training.json`` in
    the --run folder, or in the adapter's folder or the one above it (a checkpoint-N of such a run); None
    for an adapter from elsewhere, or a record without the collator's settings (a plain Trainer's run
    recorded without collate=)."""
    from datainf.cli.common import CALLBACK_RUN_FILE
    from datainf.data.tables import read_json_object

    folders = [Path(run_dir)] if run_dir is not None else []
    if adapter_dir is not None:
        folders += [Path(adapter_dir), Path(adapter_dir).parent]
    found = next((f / CALLBACK_RUN_FILE for f in folders if (f / CALLBACK_RUN_FILE).is_file()), None)
    if found is None:
        return None
    tokenization = read_json_object(found, "record the run again with DatainfCallback").get("tokenization")
    if not isinstance(tokenization, dict) or not isinstance(tokenization.get("collate"), dict):
        return None
    if not isinstance(tokenization.get("grads_options"), str):
        raise DataInfError(f"{found} records the run's tokenization without its grads_options; record the run "
                           "again with DatainfCallback")
    return str(found), tokenization


def apply_recorded(ctx: click.Context, tokenization: dict[str, Any], max_length: int,
                   data: dict[str, Any]) -> tuple[int, dict[str, Any], list[str], list[str]]:
    """The recorded tokenization applied to the options not given on the command line (a value from the
    defaults or a config file is not given): (max_length, the data options, the options applied, the
    options given that contradict the record, each as "--option value")."""
    from click.core import ParameterSource

    collate = tokenization["collate"]
    values = {"max_length": max_length, **data}
    applied, overridden = [], []
    for key, default, flag in TOKENIZATION_OPTIONS:
        want = collate.get(key, default)
        if want is None or values[key] == want:
            continue
        if ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            values[key] = want
            applied.append(_shown(flag, want))
        else:
            overridden.append(_shown(flag, values[key]))
    max_length = values.pop("max_length")
    return max_length, values, applied, overridden


def _shown(flag: str, value: Any) -> str:
    """An option as typed: a flag alone (or "no --flag" when off), else "--option value"."""
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"
