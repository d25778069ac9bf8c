"""Checkpoints of a LoRA fine-tune, for influence summed over training (TracIn's checkpoint sum).

A fully trained model's per-example gradients can lose what made each example matter: on our LLM runs the
class of a test prompt is found near chance by every method on the final adapter, and well on adapters from
early in fine-tuning (docs/results.md). Summing each checkpoint's scores weighted by the learning rate at
that checkpoint, ``sum_c lr_c * score_c``, follows the training trajectory instead of its end point (TracIn,
Pruthi et al. 2020; LESS sums warm-up checkpoints the same way).

* :class:`Snapshots` records the trainable weights at chosen optimizer steps (the training loop's
  ``on_step`` hook) and puts them back into the model;
* :func:`learning_rate` reads the learning rate a checkpoint folder was saved at: ours
  (``datainf_checkpoint.json``, written by ``datainf finetune --checkpoints``) or the Trainer's / TRL's
  (``trainer_state.json``, in every ``checkpoint-N`` folder they save);
* :func:`load_adapter_weights` swaps a checkpoint's LoRA weights into an already loaded PEFT model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from datainf.data.tables import read_json_object
from datainf.errors import DataInfError

#: what `datainf finetune --checkpoints` writes into each checkpoint folder: {"step", "learning_rate", "steps"}
CHECKPOINT_FILE = "datainf_checkpoint.json"
#: what the transformers Trainer (and TRL's trainers) write into each checkpoint-N folder
TRAINER_STATE = "trainer_state.json"


def snapshot_steps(count: int, total_steps: int) -> list[int]:
    """``count`` evenly spaced optimizer steps out of ``total_steps`` (1-based; the last is ``total_steps``)."""
    if count < 1 or total_steps < 1:
        return []
    return sorted({max(1, round(total_steps * (i + 1) / count)) for i in range(count)})


class Snapshots:
    """The model's trainable weights at ``steps`` (optimizer steps, counted from 1): pass :meth:`on_step` to
    the training loop; ``taken`` then holds (step, learning rate that step used, {name: tensor})."""

    def __init__(self, model: Any, steps: list[int]):
        self.model = model
        self.steps = sorted(set(steps))
        self.taken: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def on_step(self, step: int, lr: float) -> None:
        if step in self.steps:
            self.taken.append((step, lr, self.current()))

    def current(self) -> dict[str, torch.Tensor]:
        """The model's trainable weights now (to put back after visiting the snapshots)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Put a snapshot's weights into the model."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in state:
                    p.copy_(state[name])


def learning_rate(adapter_dir: str | Path) -> float | None:
    """The learning rate the training was at when this checkpoint was saved, or None when the folder does not
    say: ``datainf_checkpoint.json``'s, else the last ``learning_rate`` the Trainer logged at or before the
    checkpoint's ``global_step`` in ``trainer_state.json`` (logged every ``logging_steps``, so the rate of the
    last logging step before the save). A rate that is not a finite number > 0 (NaN, infinite, 0, negative,
    a boolean, a string) is refused, naming the file: it would be used as the checkpoint's weight."""
    folder = Path(adapter_dir)
    ours = folder / CHECKPOINT_FILE
    if ours.is_file():
        value = read_json_object(ours).get("learning_rate")
        return None if value is None else checked_rate(value, f"{ours}: learning_rate")
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        return None
    state = read_json_object(state_file)
    step = state.get("global_step")
    logged = [e for e in state.get("log_history") or [] if isinstance(e, dict)
              and e.get("learning_rate") is not None and _is_number(e.get("step"))
              and (not _is_number(step) or e["step"] <= step)]
    if not logged:
        return None
    last = max(logged, key=lambda e: e["step"])
    return checked_rate(last["learning_rate"], f"{state_file}: the learning_rate logged at step {last['step']}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_rate(value: Any, where: str) -> float:
    """``value`` as a checkpoint's weight in a sum over checkpoints: a finite number > 0, else one error
    naming ``where`` (a file and key, a flag): NaN or infinity would make every score NaN or infinite, zero
    drop the checkpoint, a negative weight swap helpful and harmful."""
    shown = json.dumps(value, default=repr)  # as the file spells it: true, NaN, "1e-3"
    if not _is_number(value):
        raise DataInfError(f"{where} is {shown}, not a number; a checkpoint's weight must be a finite number > 0")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise DataInfError(f"{where} is {shown}; a checkpoint's weight must be a finite number > 0 (NaN or "
                           "infinity make every score NaN or infinite, 0 drops the checkpoint, a negative weight "
                           "swaps helpful and harmful)")
    return number


def load_adapter_weights(model: Any, adapter_dir: str | Path) -> None:
    """Swap the LoRA weights saved in ``adapter_dir`` (peft's ``save_pretrained``: a checkpoint of the same
    fine-tune) into ``model``, a PEFT model already carrying an adapter of the same shape. An adapter of
    another rank, alpha or set of target modules is refused; so is one whose weights do not all fit."""
    from peft import set_peft_model_state_dict

    folder = Path(adapter_dir)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DataInfError(f"{folder} has no adapter_config.json; pass a folder written by peft's save_pretrained "
                           "(a checkpoint-N folder of the Trainer or TRL holds one)")
    theirs, mine = read_json_object(config_file), model.peft_config["default"]
    for key in ("r", "lora_alpha", "target_modules"):
        a, b = theirs.get(key), getattr(mine, key, None)
        if isinstance(a, (list, set)) or isinstance(b, (list, set)):
            a, b = sorted(a or []), sorted(b or [])
        if a != b:
            raise DataInfError(f"{folder} is not a checkpoint of the same adapter: its {key} is {a!r}, the "
                               f"model's is {b!r}")
    state = _adapter_state(folder)
    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise DataInfError(f"{folder}: {len(unexpected)} of its weights fit no module of the model (e.g. "
                           f"{unexpected[0]}); pass a checkpoint of this adapter")


def _adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise DataInfError(f"{folder} has no adapter_model.safetensors (or .bin)")


__all__ = ["CHECKPOINT_FILE", "TRAINER_STATE", "Snapshots", "checked_rate", "learning_rate", "load_adapter_weights",
           "snapshot_steps"]
