"""Checkpoints of a LoRA fine-tune, for influence summed over training (TracIn's checkpoint sum).

A fully trained model's per-example gradients can lose what made each example matter: on our LLM runs the
class of a test prompt is found near chance by every method on the final adapter, and well on adapters from
early in fine-tuning, best of all at step 0, before the first optimizer step (docs/results.md). Summing
each checkpoint's scores weighted by the learning rate over the interval it stands for,
``sum_c lr_c * score_c``, follows the training trajectory instead of its end point (TracIn, Pruthi et al.
2020; LESS sums warm-up checkpoints the same way).

* :class:`Snapshots` records the trainable weights at step 0 and at chosen optimizer steps (the training
  loop's ``on_step`` hook), every step's learning rate, and puts weights back into the model;
* :func:`interval_rates` is the weight rule of our checkpoints: the mean learning rate of the optimizer steps
  from a checkpoint to the next one (the final adapter: its own step's rate);
* :func:`learning_rate` reads the weight a checkpoint folder was saved with: ours
  (``datainf_checkpoint.json``, written by ``datainf finetune --checkpoints``) or the Trainer's / TRL's
  (``trainer_state.json``, in every ``checkpoint-N`` folder they save);
* :func:`run_checkpoints` reads a whole run folder (ours or the Trainer's) as (adapter, weight, step) in
  step order; :func:`checkpoint_weights` the weights of (adapter, store) pairs given by hand;
* :func:`load_adapter_weights` swaps a checkpoint's LoRA weights into an already loaded PEFT model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from datainf.data.tables import read_json_object
from datainf.errors import DataInfError

#: what `datainf finetune --checkpoints` writes into each checkpoint folder: {"step", "learning_rate", "steps"}
CHECKPOINT_FILE = "datainf_checkpoint.json"
#: what the transformers Trainer (and TRL's trainers) write into each checkpoint-N folder
TRAINER_STATE = "trainer_state.json"
#: how a checkpoint's learning_rate (its weight in a checkpoint sum) is chosen; see interval_rates
LEARNING_RATE_RULE = ("mean learning rate of the optimizer steps from this checkpoint to the next one (the final "
                      "adapter: its own step's rate)")


def snapshot_steps(count: int, total_steps: int) -> list[int]:
    """``count`` evenly spaced optimizer steps out of ``total_steps`` (1-based; the last is ``total_steps``)."""
    if count < 1 or total_steps < 1:
        return []
    return sorted({max(1, round(total_steps * (i + 1) / count)) for i in range(count)})


class Snapshots:
    """The model's trainable weights at ``steps`` (optimizer steps, counted from 1): pass :meth:`on_step` to
    the training loop; ``taken`` then holds (step, learning rate that step used, {name: tensor}) and
    ``rates`` the rate of every step (``rates[t - 1]`` for step t). With ``initial``, the weights at
    construction (before the first optimizer step: step 0) are kept in ``initial``; :meth:`checkpoints` gives
    every saved state with its weight in a checkpoint sum (:func:`interval_rates`)."""

    def __init__(self, model: Any, steps: list[int], initial: bool = False):
        self.model = model
        self.steps = sorted(set(steps))
        self.taken: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.rates: list[float] = []
        self.initial = self.current() if initial and self.steps else None

    def on_step(self, step: int, lr: float) -> None:
        self.rates.append(float(lr))
        if step in self.steps:
            self.taken.append((step, lr, self.current()))

    def checkpoints(self) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
        """(step, weight, weights of the model) of step 0 (with ``initial``) and of every step taken, in
        step order; the weight is :func:`interval_rates`'s for these steps."""
        states = ([(0, self.initial)] if self.initial is not None else []) + [(s, st) for s, _, st in self.taken]
        rates = interval_rates([s for s, _ in states], self.rates)
        return [(s, r, st) for (s, st), r in zip(states, rates)]

    def current(self) -> dict[str, torch.Tensor]:
        """The model's trainable weights now (to put back after visiting the snapshots)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Put a snapshot's weights into the model."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in state:
                    p.copy_(state[name])


def interval_rates(steps: list[int], rates: list[float]) -> list[float]:
    """Each checkpoint's weight in a checkpoint sum (TracIn's learning rate over the interval a checkpoint
    stands for): a checkpoint saved after ``step`` optimizer steps stands for the steps that start from near
    its weights, ``step + 1`` up to the next checkpoint's step, and weighs their mean learning rate
    (``rates[t - 1]`` is the rate step t used). The last checkpoint, which no step follows (the final
    adapter), weighs the rate of its own step. Where an interval's mean is 0 (a warm-up that starts at rate
    0, e.g. step 0 when the next checkpoint is step 1), the interval runs on to the first step with a rate
    above 0: step 0 always weighs what the first steps of training used."""
    steps = sorted(steps)
    out = []
    for i, step in enumerate(steps):
        if step >= len(rates):  # the final adapter (or beyond the recorded steps): the rate of its own step
            out.append(rates[-1] if rates else 0.0)
            continue
        end = steps[i + 1] if i + 1 < len(steps) else len(rates)
        end = min(max(end, step + 1), len(rates))
        while end < len(rates) and not any(r > 0 for r in rates[step:end]):
            end += 1
        window = rates[step:end]
        out.append(sum(window) / len(window))
    return out


def learning_rate(adapter_dir: str | Path) -> float | None:
    """This checkpoint's weight in a sum over the run, or None when the folder does not say:
    ``datainf_checkpoint.json``'s ``learning_rate`` (:func:`interval_rates`' rule), else the last ``learning_rate`` the Trainer logged at or before the
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


class RunCheckpoint(NamedTuple):
    """One checkpoint of a run: its adapter folder, its weight in the sum (learning rate), its step."""

    adapter: Path
    learning_rate: float
    step: int


_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _recorded_step(folder: Path) -> int | None:
    """The optimizer step a folder's files say it was saved at: datainf_checkpoint.json's ``step``, else
    trainer_state.json's ``global_step``; None when neither says."""
    for name, key in ((CHECKPOINT_FILE, "step"), (TRAINER_STATE, "global_step")):
        if (folder / name).is_file():
            value = read_json_object(folder / name).get(key)
            if _is_number(value) and float(value).is_integer() and value >= 0:
                return int(value)
    return None


def run_checkpoints(run: str | Path) -> list[RunCheckpoint]:
    """Every checkpoint of a fine-tuning run folder, in step order, each with its weight in a sum over the
    run (TracIn) and its step. A run folder is ``datainf finetune --checkpoints K``'s (OUT, the final adapter,
    and OUT/checkpoint-STEP, checkpoint-0 included) or a ``transformers`` Trainer / TRL output folder
    (``checkpoint-N/`` subfolders holding an adapter and trainer_state.json). The root adapter is included
    when it records its step (datainf_checkpoint.json, trainer_state.json) and no checkpoint-N has that step;
    a root that records nothing (the Trainer's ``save_model`` after its last checkpoint) is left out when
    checkpoint-N folders exist, and is the only checkpoint, weighing 1, when none do. Weights are
    :func:`learning_rate`'s (ours: the mean rate from the checkpoint to the next, see :func:`interval_rates`;
    the Trainer's: the rate last logged at or before its step); a checkpoint that records none is refused."""
    folder = Path(run)
    if not folder.is_dir():
        raise DataInfError(f"run folder {folder} does not exist; pass the --out of `datainf finetune --checkpoints "
                           "K` or a Trainer / TRL output_dir with checkpoint-N folders")
    found: dict[int, Path] = {}
    for sub in sorted(folder.iterdir()):
        match = _CHECKPOINT_DIR.match(sub.name)
        if match and sub.is_dir() and (sub / "adapter_config.json").is_file():
            found[int(match.group(1))] = sub
    root_is_adapter = (folder / "adapter_config.json").is_file()
    if not found:
        if not root_is_adapter:
            raise DataInfError(f"{folder} holds no adapter (adapter_config.json) and no checkpoint-N folder with "
                               "one; pass a run folder of `datainf finetune --checkpoints K` or the Trainer")
        return [RunCheckpoint(folder, 1.0, _recorded_step(folder) or 0)]
    if root_is_adapter:
        step = _recorded_step(folder)
        if step is not None and step not in found:
            found[step] = folder
    out = []
    for step in sorted(found):
        rate = learning_rate(found[step])
        if rate is None:
            raise DataInfError(f"{found[step]} does not say its learning rate (no datainf_checkpoint.json, no "
                               "trainer_state.json with a logged learning_rate), its weight in the run's sum")
        out.append(RunCheckpoint(found[step], rate, step))
    return out


def checkpoint_weights(weights: str, adapter_dirs: tuple[str, ...] | list[str]) -> list[float]:
    """Each (adapter, store) pair's weight in the summed scores: the learning rate its checkpoint was saved at
    ("lr"), 1 each ("equal"), or the numbers given; one pair always weighs 1. Every weight must be a finite
    number > 0 (NaN, infinity, 0 and negative numbers are refused, naming the checkpoint or the position in
    --weights), the learning rates read from a checkpoint's files included."""
    if weights not in ("lr", "equal"):
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise DataInfError(f"--weights must be 'lr', 'equal' or comma-separated numbers, got {weights!r}"
                               ) from None
        if len(values) != len(adapter_dirs):
            raise DataInfError(f"--weights gives {len(values)} numbers for {len(adapter_dirs)} --adapter")
        for i, (text, value) in enumerate(zip(weights.split(","), values), start=1):
            checked_rate(value, f"--weights number {i} ({text.strip()!r}, for --adapter {adapter_dirs[i - 1]})")
    if len(adapter_dirs) == 1 or weights == "equal":
        return [1.0] * len(adapter_dirs)
    if weights == "lr":
        try:
            rates = [learning_rate(a) for a in adapter_dirs]
        except DataInfError as e:
            raise DataInfError(f"{e}; pass --weights equal, or one number per --adapter") from None
        missing = [a for a, r in zip(adapter_dirs, rates) if r is None]
        if missing:
            raise DataInfError(f"{missing[0]} does not say the learning rate it was saved at (no "
                               "datainf_checkpoint.json or trainer_state.json with a logged learning_rate); pass "
                               "--weights equal, or one number per --adapter")
        return [float(r) for r in rates if r is not None]
    return values


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


__all__ = ["CHECKPOINT_FILE", "LEARNING_RATE_RULE", "TRAINER_STATE", "RunCheckpoint", "Snapshots", "checkpoint_weights", "checked_rate", "interval_rates", "learning_rate", "load_adapter_weights",
           "run_checkpoints", "snapshot_steps"]
