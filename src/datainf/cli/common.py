"""What several commands share: settings files, the device, method lists, model loading, reading data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from datainf.errors import DataInfError


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


def parse_methods(value: str) -> list[str]:
    """Comma-separated method names, each checked against the registry."""
    from datainf.estimators import method_names

    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in method_names():
            raise DataInfError(f"unknown method '{m}'; choose from {', '.join(method_names())}")
    if not methods:
        raise DataInfError("--method needs at least one method")
    return methods


def device_option(f: Any) -> Any:
    return click.option("--device", default=None, help="cpu or cuda[:N]; default cuda when available.")(f)


def check_output(path: str | os.PathLike, *, inputs: dict[str, str | os.PathLike | None]) -> Path:
    """Refuse an output path that is, or lies inside, one of the command's inputs (a store, a model folder):
    writing there would overwrite or corrupt what the command reads."""
    out = Path(path).resolve()
    for what, value in inputs.items():
        if value is None:
            continue
        where = Path(value).resolve()
        if out == where or where in out.parents:
            raise DataInfError(f"--out {path} lies inside the {what} {value}; write the output somewhere else")
    return Path(path)


def load_model(model_dir: str, adapter_dir: str | None, task: str, num_labels: int | None, device: str):
    """A PEFT model (LoRA tracked) and its tokenizer, for gradients."""
    if adapter_dir is None:
        raise DataInfError("--adapter is required: gradients are taken with respect to the LoRA weights")
    if task == "classification":
        from datainf.models.finetune import load_adapter

        if num_labels is None:
            meta = Path(adapter_dir) / "datainf_finetune.json"
            num_labels = json.loads(meta.read_text())["num_labels"] if meta.exists() else 2
        model, tokenizer = load_adapter(model_dir, adapter_dir, num_labels, is_trainable=True)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        try:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        except Exception as e:  # noqa: BLE001
            raise DataInfError(f"adapter {adapter_dir} does not fit model {model_dir}: {e}".splitlines()[0]) from None
    return model.to(device), tokenizer


def read_data(path: str, task: str, text_column: str, label_column: str, prompt_column: str,
              response_column: str) -> list[dict]:
    """Records for a task from a data file: {"text", "label"} for classification, {"prompt", "response"}
    for the causal LM tasks."""
    from datainf.data.text import load_records

    if task == "classification":
        return list(load_records(path, text_column=text_column, label_column=label_column))
    records = load_records(path, text_column=prompt_column, label_column=None, extra_columns=(response_column,))
    for i, r in enumerate(records):
        if not isinstance(r.get(response_column), str):
            raise DataInfError(f"{path}: row {i} has no text in column {response_column!r}; name the response "
                               "column with --response-column, or fill it in")
    return [{"prompt": r["text"], "response": r[response_column]} for r in records]


__all__ = ["check_output", "default_map", "device_option", "load_config", "load_model", "parse_methods",
           "rank_device", "read_data", "setup"]
