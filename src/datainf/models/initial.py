"""Step 0 of a LoRA fine-tune from its final adapter alone (``datainf grads --initial``).

A LoRA adapter starts from B = 0 and a random A; gradients there (step 0) carry what the data teaches far
better than the final adapter's (issue 29). :func:`initial_lora` rebuilds that starting point from the
adapter folder: its own LoRA config, and A drawn as ``datainf finetune`` draws it, with the seed it recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datainf.data.tables import read_json_object
from datainf.errors import DataInfError
from datainf.models.finetune import FINETUNE_RECORD, LoraSettings, recorded_seed
from datainf.models.llm import load_causal_lm


def initial_lora(model_dir: str | Path, adapter_dir: str | Path, *, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
                 ) -> tuple[Any, Any, int, str]:
    """Step 0 of a causal-LM LoRA fine-tune from its final adapter alone: the base model with a fresh LoRA of
    the adapter's own config (rank, alpha, dropout, target modules from ``adapter_config.json``), B = 0 and
    A drawn as ``datainf finetune`` draws it (:func:`datainf.models.llm.load_causal_lm` under the seed), so
    for an adapter it made, with the seed it recorded, A is the one training started from.

    ``seed``: used when the adapter records none (else 0); a seed that contradicts the recorded one is
    refused. Returns (PeftModel in eval mode with trainable LoRA, tokenizer, the seed used, where it came
    from: "recorded in <file>", "--seed" or "default")."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise DataInfError(f"{adapter_dir} has no adapter_config.json; pass a folder written by peft's save_pretrained")
    config = read_json_object(config_path, "pass a folder written by peft's save_pretrained")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise DataInfError(f"{config_path}: peft_type {config.get('peft_type')!r}; step 0 is built for LoRA adapters")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise DataInfError(f"{config_path}: task_type {config.get('task_type')!r}; step 0 from a final adapter is "
                           "built for causal LMs (a classifier's head is new and random at step 0)")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise DataInfError(f"{config_path}: target_modules {targets!r} is not a list of module names; step 0 needs "
                           "the modules LoRA was put on")
    recorded = recorded_seed(adapter_dir)
    if recorded is not None and seed is not None and seed != recorded:
        raise DataInfError(f"--seed {seed} contradicts the seed {recorded} recorded in {adapter_dir / FINETUNE_RECORD} "
                           "(the one the adapter's A matrices were drawn with); drop --seed")
    if recorded is not None:
        used, source = recorded, f"recorded in {adapter_dir / FINETUNE_RECORD}"
    else:
        used, source = (seed, "--seed") if seed is not None else (0, "default (the adapter records none)")
    lora = LoraSettings(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", config.get("r", 8))),
                        dropout=float(config.get("lora_dropout") or 0.0), target_modules=tuple(targets),
                        modules_to_save=())
    model, tokenizer = load_causal_lm(model_dir, lora, device=device, seed=used)
    if (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # as load_causal_lm_adapter reads it
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    if dtype != torch.float32:
        model.to(dtype)
    return model, tokenizer, used, source


__all__ = ["initial_lora"]
