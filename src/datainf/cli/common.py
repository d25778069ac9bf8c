"""What several commands share: settings files, the device, method lists, model loading, reading data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from datainf.cli.options import device_option, overwrite_option
from datainf.errors import DataInfError
from datainf.outputs import ADAPTER_MARKER


def load_config(path: str) -> dict[str, Any]:
    """The settings of a YAML or TOML file (safe loaders only), as a mapping."""
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


def default_map(config: dict[str, Any], commands: dict[str, click.Command]) -> dict[str, dict[str, Any]]:
    """click default_map from a config: keys are option names (``store`` or ``mean-query``); flat keys apply to
    every command that has such an option, a section named after a command to that command only."""
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    out = {}
    for name, command in commands.items():
        params: dict[str, click.Parameter] = {}
        for p in command.params:
            params[str(p.name)] = p
            for opt in p.opts:
                params[opt.lstrip("-").replace("-", "_")] = p
        section = config.get(name) if isinstance(config.get(name), dict) else {}  # (`store` is also a flat key/option)
        values = {}
        for key, value in {**flat, **section}.items():
            key = str(key).replace("-", "_")
            if key in params:
                param = params[key]
                if getattr(param, "multiple", False) and not isinstance(value, list):
                    value = [value]  # `method: datainf,exact` in a config, for an option that may be repeated
                values[str(param.name)] = value
            elif key in section:
                raise DataInfError(f"config: '{name}' has no option '{key}'; see `datainf {name} --help`")
        out[name] = values
    return out


def setup(ctx: click.Context, device: str | None) -> tuple[bool, str]:
    """(show progress, device): the device defaults to cuda when available; cuda without CUDA is refused."""
    import torch

    quiet = bool(ctx.find_root().params.get("quiet"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataInfError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return not quiet, device


def rank_device(device: str, rank_world: tuple[int, int]) -> str:
    """Under torchrun with CUDA, each process takes the GPU of its LOCAL_RANK."""
    if rank_world[1] > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: the file that marks an adapter folder as written by `datainf finetune` (task, labels, training summary)
FINETUNE_MARKER = ADAPTER_MARKER


def adapter_labels(adapter_dir: str | None) -> dict[str, Any]:
    """What `datainf finetune` recorded about the classes of an adapter: {"num_labels", "label_names"}
    (empty for an adapter from elsewhere)."""
    if adapter_dir is None:
        return {}
    marker = Path(adapter_dir) / FINETUNE_MARKER
    if not marker.is_file():
        return {}
    from datainf.data.tables import read_json_object

    data = read_json_object(marker, "rewrite the adapter with `datainf finetune`")
    out: dict[str, Any] = {}
    if isinstance(data.get("num_labels"), int) and not isinstance(data.get("num_labels"), bool):
        out["num_labels"] = data["num_labels"]
    names = data.get("label_names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names) and names:
        out["label_names"] = names
    return out


def run_labels(adapter_dir: str | None, labels_from: str | None, num_labels: int | None
               ) -> tuple[list[str] | None, int | None, str]:
    """The run's class mapping for `grads`: (names or None, number of classes or None, where it came from).

    ``--labels-from STORE`` (the training store's manifest) first, then what `datainf finetune` recorded in
    the adapter folder; None when neither says (the data file's own sorted names are used then).
    """
    names, count, source = None, num_labels, "this file's sorted label names"
    if labels_from is not None:
        from datainf.store import GradientStore

        recorded = GradientStore.open(labels_from).metadata
        if not recorded.labels:
            raise DataInfError(f"--labels-from {labels_from}: that store records no class mapping (it was not made "
                               "by `datainf grads` on a classification task)")
        names, source = recorded.label_names, f"the training store {labels_from}"
        count = count if count is not None else recorded.num_labels
    else:
        recorded = adapter_labels(adapter_dir)
        if recorded.get("label_names"):
            names, source = recorded["label_names"], f"the adapter {adapter_dir}"
        count = count if count is not None else recorded.get("num_labels")
    if count is None and names:
        count = len(names)
    return names, count, source


def model_dtype_option(f: Any) -> Any:
    return click.option("--model-dtype", type=click.Choice(MODEL_DTYPES), default="float32",
                        help="dtype the model is loaded in (gradients are accumulated in float32 at least).")(f)


def load_model(model_dir: str, adapter_dir: str | None, task: str, num_labels: int | None, device: str,
               model_dtype: str = "float32"):
    """A PEFT model with its LoRA adapter, and its tokenizer, for gradients."""
    import torch

    dtype = getattr(torch, model_dtype)
    if adapter_dir is None:
        raise DataInfError("--adapter is required: gradients are taken with respect to the LoRA weights")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise DataInfError(f"{adapter_dir} has no adapter_config.json; pass a folder written by `datainf finetune` "
                           "or peft's save_pretrained")
    if task == "classification":
        from datainf.models.finetune import load_adapter

        if num_labels is None:
            num_labels = adapter_labels(adapter_dir).get("num_labels") or 2
        model, tokenizer = load_adapter(model_dir, adapter_dir, num_labels, is_trainable=True, dtype=dtype)
    else:
        from datainf.models.llm import load_causal_lm_adapter

        model, tokenizer = load_causal_lm_adapter(model_dir, adapter_dir, dtype=dtype)
    return model.to(device), tokenizer


def data_options(f: Any) -> Any:
    """The options that say how a data file becomes records (shared by grads, finetune, explain)."""
    options = [
        click.option("--data-format", "data_format", type=click.Choice(["auto", "messages", "prompt-response", "text"]),
                     default="auto", help="Causal LM record format; auto: a 'messages' column is chat, then "
                                          "prompt/response (strings, or TRL's conversational lists of turns), "
                                          "then text."),
        click.option("--messages-column", default="messages", help="causal LM: the chat column (list of turns)."),
        click.option("--prompt-column", default="prompt", help="causal LM: the prompt column."),
        click.option("--response-column", default="response",
                     help="causal LM: the response column (scored); 'completion' is found too."),
        click.option("--text-column", default="text", help="The text column (classification, or plain LM text)."),
        click.option("--label-column", default="label", help="classification: the label column."),
        click.option("--chat-template", is_flag=True,
                     help="causal LM: wrap prompt/response records in the tokenizer's chat template (user, assistant)."),
        click.option("--assistant-turns", type=click.Choice(["all", "last"]), default="all",
                     help="chat records: loss on all assistant turns or only the last."),
        click.option("--loss-tokens", type=click.Choice(["assistant", "all"]), default="assistant",
                     show_default=True,
                     help="causal LM: the tokens that carried the loss in training: the answer's (assistant turns, "
                          "completion, response), or 'all' of them (TRL's SFT on 'messages' data without "
                          "assistant_only_loss, or with completion_only_loss=False)."),
        click.option("--truncation", type=click.Choice(["auto", "keep_start", "keep_end"]), default="auto",
                     show_default=True,
                     help="causal LM: which tokens of an example longer than --max-length are kept: auto (the end of "
                          "chat and prompt/response records, the start of text: as `datainf finetune` trains), or "
                          "as TRL's SFTConfig.truncation_mode (keep_start, TRL's default; keep_end)."),
        click.option("--split", default=None, help="The split of a save_to_disk DatasetDict folder."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def read_data(path: str, task: str, *, data_format: str = "auto", text_column: str = "text",
              label_column: str = "label", prompt_column: str = "prompt", response_column: str = "response",
              messages_column: str = "messages", split: str | None = None, label_names: list[str] | None = None,
              num_labels: int | None = None, extra_columns: tuple[str, ...] = (), **_: Any) -> list[dict]:
    """Records for a task from a data file: {"text", "label"} for classification (class names mapped through
    ``label_names``, the run's mapping; ids checked against ``num_labels``); for the causal LM tasks chat
    ({"messages"}), {"prompt", "response"} or {"text"} records (see datainf.data.text.load_lm_records)."""
    from datainf.data.text import load_lm_records, load_records

    if task == "classification":
        return load_records(path, text_column=text_column, label_column=label_column, split=split,
                            label_names=label_names, num_labels=num_labels, extra_columns=extra_columns)
    return load_lm_records(path, format=data_format, messages_column=messages_column, prompt_column=prompt_column,
                           response_column=response_column, text_column=text_column, split=split)


def scored_training_data(loaded: Any, data_path: str, *, extra_columns: tuple[str, ...] = (),
                         **data: Any) -> list[dict]:
    """The training examples of a scores file, read from ``--data`` the way `datainf grads` read them (the
    training store's class mapping; the rows the store dropped for a non-finite loss left out) and checked
    against the store's dataset fingerprint, so that texts are never attached to the wrong scores."""
    from datainf.store import fingerprint_dataset

    train = loaded.meta.get("train_store") or {}
    task = train.get("task") if train.get("task") in ("causal_lm", "causal_lm_mean") else "classification"
    names = (train.get("labels") or {}).get("names")
    records = read_data(data_path, task, label_names=names, extra_columns=extra_columns, **data)
    dropped = set(train.get("dropped_rows") or [])
    if dropped:
        records = [r for i, r in enumerate(records) if i not in dropped]
    expected = (train.get("fingerprints") or {}).get("dataset")
    if expected is not None:
        plain = [{k: v for k, v in r.items() if k not in extra_columns} for r in records]
        if fingerprint_dataset(plain) != expected:
            raise DataInfError(f"{data_path} is not the data the scores' training store was made from (its rows "
                               f"differ: fingerprint {fingerprint_dataset(plain)} != {expected}); pass that file, "
                               "with the column and format options given to `datainf grads`")
    if len(records) != loaded.n_train:
        raise DataInfError(f"{data_path} has {len(records)} examples but the scores have {loaded.n_train} training "
                           "rows; pass the data the store was made from")
    return records


#: the run record of datainf.integrations.DatainfCallback (its TRAINING_FILE; named here: the CLI starts without
#: importing transformers)
CALLBACK_RUN_FILE = "datainf_training.json"
#: the collator settings that decide which tokens carry the loss (compared with what `finetune` recorded)
TRAINING_TOKENIZATION = ("format", "chat_template", "assistant_turns", "append_eos", "loss_tokens", "max_length",
                         "truncation")


def tokenization_differences(adapter_dir: str | None, settings: dict[str, Any]) -> list[str]:
    """How ``settings`` (a TextCollator's) tokenize differently from the fine-tune that made the adapter, as
    recorded by `datainf finetune` or by DatainfCallback (its run's datainf_training.json, in the final
    adapter's folder or above a checkpoint-N folder) ("truncation: 'keep_start' in training, 'auto' here");
    empty for an adapter from elsewhere or one that matches."""
    from datainf.data.collate import TextCollator
    from datainf.data.tables import read_json_object

    if adapter_dir is None:
        return []
    marker = Path(adapter_dir) / FINETUNE_MARKER
    callback_runs = [Path(adapter_dir) / CALLBACK_RUN_FILE, Path(adapter_dir).parent / CALLBACK_RUN_FILE]
    if marker.is_file():
        trained = read_json_object(marker, "rewrite the adapter with `datainf finetune`").get("collate")
    elif (run := next((f for f in callback_runs if f.is_file()), None)) is not None:
        tokenization = read_json_object(run, "record the run again with DatainfCallback").get("tokenization")
        trained = tokenization.get("collate") if isinstance(tokenization, dict) else None
    else:
        return []
    if not isinstance(trained, dict):
        return []
    # left out of the settings when they are the default
    defaults = {"loss_tokens": TextCollator.loss_tokens, "truncation": TextCollator.truncation}
    out = []
    for key in TRAINING_TOKENIZATION:
        then, now = trained.get(key, defaults.get(key)), settings.get(key, defaults.get(key))
        if then != now:
            out.append(f"{key}: {then!r} in training, {now!r} here")
    return out


def make_collator(tokenizer: Any, task: str, max_length: int, *, chat_template: bool = False,
                  assistant_turns: str = "all", loss_tokens: str = "assistant", truncation: str = "auto",
                  **_: Any) -> Any:
    """The collator that tokenizes records as the model was trained on them."""
    from datainf.data.collate import TextCollator

    return TextCollator(tokenizer=tokenizer, task=task, max_length=max_length, chat_template=chat_template,
                        assistant_turns=assistant_turns, loss_tokens=loss_tokens, truncation=truncation)


__all__ = ["FINETUNE_MARKER", "MODEL_DTYPES", "adapter_labels", "data_options", "default_map", "device_option", "load_config", "overwrite_option",
           "load_model", "make_collator", "tokenization_differences", "model_dtype_option", "rank_device", "read_data", "run_labels", "scored_training_data", "setup"]
