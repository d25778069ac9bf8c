"""Fingerprints (short sha256 hex strings) of what the gradients depend on: :func:`fingerprint_model`,
:func:`fingerprint_dataset`, :func:`fingerprint_task`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datainf.adapters import adapter_parameters
from datainf.errors import DataInfError

_SAMPLE = 1024
#: the module PEFT keeps beside a trained ``modules_to_save`` copy: re-initialized at every load, never used
PEFT_REINITIALIZED = "original_module"
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash"}


def _short(h: Any) -> str:
    return h.hexdigest()[:16]


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _json_default(x: Any) -> Any:
    """JSON stand-ins for values json cannot write: arrays and tensors by content hash, sets sorted."""
    if isinstance(x, Tensor):
        return {"tensor": str(x.dtype), "shape": list(x.shape), "sha256": hashlib.sha256(_tensor_bytes(x)).hexdigest()}
    if isinstance(x, np.ndarray):
        data = np.ascontiguousarray(x).tobytes()
        return {"ndarray": str(x.dtype), "shape": list(x.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(bytes(x)).hexdigest()}
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=repr)
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if hasattr(x, "tobytes") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        return {"image": x.mode, "size": list(x.size), "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    raise TypeError(f"cannot fingerprint a value of type {type(x).__name__}")


def _stable_json(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        return {"repr": type(config).__name__}
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def fingerprint_model(model: torch.nn.Module) -> dict[str, str]:
    """Fingerprints of a model's base weights and of its adapter.

    Returns:
        {"model": ..., "adapter": ...}, 16 hex characters each.
        "model" hashes the config (without paths and library versions) and, for every frozen parameter,
        its name, shape, dtype, first and last 1024 values and its float64 sum (cheap even for 13B models);
        PEFT's ``original_module`` copies of ``modules_to_save`` heads are left out (they get fresh random
        weights at every adapter load and take no part in the forward pass).
        "adapter" hashes every adapter parameter's (:func:`datainf.adapters.adapter_parameters`: the
        trainable ones, or PEFT's LoRA ones of a model loaded for inference) name, shape, dtype and full
        bytes, plus the PEFT
        config (rank, alpha, target modules) when the model has one.
    """
    if not isinstance(model, torch.nn.Module):
        raise DataInfError(f"fingerprint_model expects a torch.nn.Module, got {type(model).__name__}")
    base, adapter = hashlib.sha256(), hashlib.sha256()
    try:
        base.update(_stable_json(_config_dict(model)).encode())
        peft_config = getattr(model, "peft_config", None)
        if peft_config is not None:  # without inference_mode: loading for inference or training is the same adapter
            configs = {name: {k: v for k, v in (c.to_dict() if hasattr(c, "to_dict") else dict(c)).items()
                              if k != "inference_mode"} for name, c in dict(peft_config).items()}
            adapter.update(_stable_json(configs).encode())
    except TypeError as e:
        raise DataInfError(f"fingerprint_model: the model's config cannot be written as JSON ({e})") from None
    adapter_names = set(adapter_parameters(model))
    for name, p in model.named_parameters():
        if name not in adapter_names and PEFT_REINITIALIZED in name.split("."):
            continue  # PEFT's copy of a modules_to_save head: freshly initialized at every load, never used
        if p.device.type == "meta":
            raise DataInfError(f"fingerprint_model: parameter '{name}' is on the meta device; load the weights first")
        header = f"{name}|{tuple(p.shape)}|{p.dtype}|".encode()
        if name in adapter_names:
            adapter.update(header)
            adapter.update(_tensor_bytes(p))
        else:
            flat = p.detach().reshape(-1)
            base.update(header)
            base.update(_tensor_bytes(flat[:_SAMPLE]))
            base.update(_tensor_bytes(flat[-_SAMPLE:]))
            base.update(repr(float(flat.sum(dtype=torch.float64))).encode())
    return {"model": _short(base), "adapter": _short(adapter)}


def fingerprint_dataset(records: Iterable[Any]) -> str:
    """Fingerprint of a dataset: the stable JSON (sorted keys) of every record, in order (16 hex chars).

    Records may be dicts, sequences, strings, numbers, dataclasses; tensors, arrays, bytes and PIL images
    inside them are hashed by content.
    """
    h = hashlib.sha256()
    count = 0
    for k, record in enumerate(records):
        try:
            h.update(_stable_json(record).encode())
        except TypeError as e:
            raise DataInfError(f"fingerprint_dataset: record {k} cannot be fingerprinted ({e})") from None
        h.update(b"\n")
        count += 1
    h.update(f"n={count}".encode())
    return _short(h)


def fingerprint_task(task_description: str | Mapping[str, Any]) -> str:
    """Fingerprint of whatever defines the loss (task name, prompt template, label words, ...): 16 hex chars."""
    if not isinstance(task_description, (str, Mapping)):
        raise DataInfError(
            f"fingerprint_task expects a string or a dict, got {type(task_description).__name__}"
        )
    try:
        text = _stable_json(task_description)
    except TypeError as e:
        raise DataInfError(f"fingerprint_task: the task description cannot be fingerprinted ({e})") from None
    return _short(hashlib.sha256(text.encode()))
