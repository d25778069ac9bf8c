"""Attribution from the training run itself: a callback for the ``transformers`` Trainer and TRL's trainers.

:class:`DatainfCallback` records a fine-tune as a run folder that ``datainf grads --run``, ``datainf score
--run-stores`` and ``datainf explain --run`` read unchanged (the layout ``datainf finetune --checkpoints K``
writes, read by :func:`datainf.models.checkpoints.run_checkpoints`)::

    from trl import SFTConfig, SFTTrainer
    from datainf.integrations import DatainfCallback

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=rows, peft_config=lora,
                         callbacks=[DatainfCallback(out="run", checkpoints=4)])
    trainer.train()
    # datainf grads --run run --store stores --data rows.jsonl ...; datainf explain --run run --store stores ...

What RUN holds:

* ``checkpoint-0``: the LoRA adapter before the first optimizer step (B = 0), and ``checkpoint-STEP`` at
  ``checkpoints`` evenly spaced optimizer steps; the last of them, the final model, is RUN itself. Each is a
  folder peft loads (``adapter_config.json``, ``adapter_model.safetensors``) with the trainer's tokenizer and
  ``datainf_checkpoint.json``: its step, its learning rate (its weight in a sum over the run:
  :func:`~datainf.models.checkpoints.interval_rates`, the rule ``datainf finetune`` uses and names in
  ``learning_rate_rule``), the number of steps, and Adam's second moments of the LoRA parameters after that
  step (``optimizer_second_moments.safetensors``, the file ``datainf finetune`` writes and
  ``score --adam-moments`` reads, keyed by the parameter names of the trained model; at step 0
  none exist yet and the file says so with ``"exp_avg_sq": null`` and a note).
* ``datainf_training.json``: the run as a whole: the trainer, the base model's path and fingerprint (the one
  gradient stores record), the LoRA settings, the optimizer, and the tokenization the trainer trained with
  (chat template, assistant-only / completion-only / every token, max length, which end of a longer
  example is kept: TRL's ``truncation_mode``), as the ``datainf grads`` options that reproduce it
  (``grads_options``; ``datainf grads --run`` applies them unless told otherwise). A TRL run with
  ``packing=True`` or ``padding_free=True`` is refused at the start of training: its rows are several
  examples concatenated. An
  example TRL drops because truncation left it no loss token keeps its row in the stores, with a zero
  gradient (no influence), so that row numbers stay those of ``train_data``.

Every checkpoint folder appears whole or not at all (written under a temporary name and renamed, see
:mod:`datainf.atomic`); one is written once its weight is known, i.e. once training has reached the next
checkpoint. The final adapter's files are put into RUN one by one, ``datainf_checkpoint.json`` last: a run
cut short before it is complete has no final checkpoint, never a half-written one.

With ``gradients=True`` (and ``train_data``, the training records), each checkpoint's per-example gradients
of ``train_data`` are also written, at the moment the checkpoint is taken, into ``store/checkpoint-STEP``
with ``store/datainf_run.json`` (the layout ``datainf grads --run RUN --store STORE`` writes), by the same
:class:`datainf.attributor.Attributor` that ``datainf grads`` uses, tokenized as the trainer did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from datainf import atomic
from datainf.adapters import adapter_parameters
from datainf.data.collate import TextCollator
from datainf.errors import DataInfError
from datainf.gradients import ProjectionSettings
from datainf.models.checkpoints import (
    CHECKPOINT_FILE,
    LEARNING_RATE_RULE,
    Snapshots,
    snapshot_steps,
)
from datainf.models.finetune import second_moments
from datainf.outputs import check_apart
from datainf.remedies import SECOND_MOMENTS_FILE
from datainf.tasks import token_level
from datainf.version import __version__

#: the run-level record the callback writes into RUN
TRAINING_FILE = "datainf_training.json"
TRAINING_FORMAT = "datainf-training-run"
#: a trainer's max_length of None (no truncation) as a collator's max_length
NO_TRUNCATION = 1_000_000


class DatainfCallback(TrainerCallback):
    """Record a LoRA fine-tune run by the ``transformers`` Trainer or TRL's ``SFTTrainer`` into ``out`` (RUN).

    Args:
        out: the run folder; must not exist yet (or be empty). Not the trainer's own ``output_dir`` (its
            ``checkpoint-N`` folders would mix with these).
        checkpoints: how many evenly spaced optimizer steps to record besides step 0 (the last is the final
            model), as ``datainf finetune --checkpoints``.
        gradients: also write each checkpoint's per-example gradients of ``train_data`` into ``store``.
        train_data: the training records (chat ``messages``, ``prompt``/``completion`` or ``response``, or
            ``text``; a list or a ``datasets.Dataset``), as given to the trainer. Needed with ``gradients``;
            otherwise only used to tell the data format in the recorded tokenization.
        store: the folder of run stores (new, or empty) for ``gradients=True``.
        collate: a :class:`~datainf.data.collate.TextCollator` that tokenizes the records as the trainer did.
            Default: derived from TRL's ``SFTConfig`` (``assistant_only_loss``, ``completion_only_loss``,
            ``max_length``); a plain Trainer's data collator cannot be read, so pass it there (it is the
            collator itself when the Trainer trains with a TextCollator).
        tokenizer: the tokenizer saved into each checkpoint; default the trainer's ``processing_class``.
        projection: gradients only: a :class:`~datainf.gradients.ProjectionSettings` (random projection
            inside the hooks), as ``datainf grads --project``.
        task: the gradients' loss: "causal_lm" (NLL summed over the loss tokens) or "causal_lm_mean".
        batch_size, chunk_size, store_dtype: of the gradient pass and its store, as ``datainf grads``.
    """

    def __init__(self, out: str | os.PathLike, checkpoints: int = 4, *, gradients: bool = False,
                 train_data: Any = None, store: str | os.PathLike | None = None, collate: TextCollator | None = None,
                 tokenizer: Any = None, projection: Any = None, task: str = "causal_lm", batch_size: int = 8,
                 chunk_size: int = 256, store_dtype: str = "float32") -> None:
        if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
            raise DataInfError(f"checkpoints must be an integer >= 1 (steps recorded besides step 0), got "
                               f"{checkpoints!r}")
        if not token_level(task):
            raise DataInfError(f"task must be 'causal_lm' or 'causal_lm_mean' (the loss of the gradients), got {task!r}")
        if projection is not None and not isinstance(projection, ProjectionSettings):
            raise DataInfError(f"projection must be a datainf ProjectionSettings(dim=k, seed=s), got {projection!r}")
        if collate is not None and not isinstance(collate, TextCollator):
            raise DataInfError(f"collate must be a datainf TextCollator, got {type(collate).__name__}")
        self.out = Path(out)
        _check_new_folder(self.out, "out")
        self.checkpoints = checkpoints
        self.gradients = bool(gradients)
        self.train_data = train_data
        self.store = Path(store) if store is not None else None
        if self.gradients:
            if train_data is None:
                raise DataInfError("gradients=True needs train_data: the training records, as given to the trainer")
            if self.store is None:
                raise DataInfError("gradients=True needs store=FOLDER: where the per-checkpoint gradient stores go")
            _check_new_folder(self.store, "store")
            check_apart(self.store, {"run folder": self.out}, option="store")
        self.collate = collate
        self.tokenizer = tokenizer
        self.projection = projection
        self.task = task
        self.batch_size, self.chunk_size, self.store_dtype = batch_size, chunk_size, store_dtype
        self.snapshots: Snapshots | None = None
        self.moments: dict[int, dict[str, torch.Tensor] | None] = {}
        self.published: list[tuple[str, float, int]] = []  # (adapter folder, learning rate, step)
        self.total_steps = 0
        self.record: dict[str, Any] = {}
        self.saved_config: dict[str, dict[str, Any]] = {}
        self.lora_ids: set[int] = set()
        self.waiting = False  # a checkpoint whose interval has only had rates of 0 so far
        self.records: Sequence[Any] | None = None

    # ------------------------------------------------------------------ the trainer's events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        """Check the setting, write the run's record and take checkpoint 0 (before the first step)."""
        if self.snapshots is not None:
            raise DataInfError("this DatainfCallback already recorded a run; give each training run its own callback")
        if state.global_step:
            raise DataInfError(f"training resumes at step {state.global_step}: the callback records a run from "
                               "step 0 (before the first optimizer step); train from the start")
        _check_no_packing(args)
        self._check_apart_from(args, model)
        lora = adapter_parameters(model) if model is not None else {}
        if model is None or not hasattr(model, "peft_config") or not any("lora_" in n for n in lora):
            raise DataInfError("DatainfCallback records LoRA adapters: train a peft model (get_peft_model, or "
                               "SFTTrainer's peft_config)")
        self.tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        self.total_steps = int(state.max_steps)
        self.lora_ids = {id(p) for n, p in lora.items() if "lora_" in n}
        self.records = None if self.train_data is None else _as_records(self.train_data)
        tokenization = self._tokenization(args)
        if self.gradients and self.collate is None:
            raise DataInfError(f"gradients=True: the tokenization of a {type(args).__name__} run is not known "
                               f"({tokenization['loss_tokens_source']}); pass collate=TextCollator(...) as the "
                               "trainer's data collator tokenizes")
        base_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        self.saved_config = _saved_config(model, base_path)
        peft = model.peft_config.get("default") if isinstance(model.peft_config, dict) else None
        self.record = {
            "format": TRAINING_FORMAT, "datainf_version": __version__, "trainer": _trainer_name(args),
            "base_model": {"path": base_path, "fingerprint": self._fingerprint(model)},
            "adapter": None if peft is None else {"r": peft.r, "lora_alpha": peft.lora_alpha,
                                                  "target_modules": sorted(peft.target_modules or [])},
            "steps": self.total_steps, "checkpoint_steps": [0, *snapshot_steps(self.checkpoints, self.total_steps)],
            "learning_rate_rule": LEARNING_RATE_RULE, "optimizer": _optimizer_settings(optimizer),
            "tokenization": tokenization,
            "gradients": None if not self.gradients else {
                "store": str(self.store), "task": self.task, "store_dtype": self.store_dtype,
                "projection": None if self.projection is None else self.projection.to_dict()},
            "checkpoints": [],
        }
        self.snapshots = Snapshots(model, snapshot_steps(self.checkpoints, self.total_steps), initial=True)
        self.moments[0] = None
        if state.is_world_process_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.out / TRAINING_FILE, self.record)
            if self.gradients:
                self._collect(model, 0)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          **kwargs: Any) -> None:
        """After each optimizer step (before the scheduler moves on): note the rate the step used; at a
        checkpoint step keep the weights and Adam's second moments; write the checkpoints whose weight is known."""
        assert self.snapshots is not None, "on_train_begin was not called"
        step = int(state.global_step) + 1
        rate = _group_rate(optimizer, self.lora_ids)
        self.snapshots.on_step(step, rate)
        taken = step in self.snapshots.steps
        if taken:
            self.moments[step] = _second_moments(optimizer, model)
            if state.is_world_process_zero and self.gradients:
                self._collect(model, step)
        if state.is_world_process_zero and (taken or (self.waiting and rate > 0)):
            self._publish_ready(model, final_step=self.total_steps)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                     **kwargs: Any) -> None:
        """Training stopped: a run stopped early gets its last step as the final checkpoint; every checkpoint
        not yet written is written, and the run's record completed."""
        if self.snapshots is None:
            return
        step = len(self.snapshots.rates)
        taken = [s for s, _, _ in self.snapshots.taken]
        if step and step not in taken:  # stopped before the planned final step
            self.snapshots.taken.append((step, self.snapshots.rates[-1], self.snapshots.current()))
            self.moments[step] = _second_moments(optimizer, model)
            if state.is_world_process_zero and self.gradients:
                self._collect(model, step)
        if state.is_world_process_zero and step:
            self._publish_ready(model, final_step=step, ended=True)

    # ------------------------------------------------------------------ writing
    def _publish_ready(self, model: Any, final_step: int, ended: bool = False) -> None:
        """Write every checkpoint taken whose weight (learning rate) is known now, in step order."""
        assert self.snapshots is not None
        saved = self.snapshots.checkpoints()  # (step, weight by interval_rates on the rates so far, weights)
        steps = [s for s, _, _ in saved]
        rates = self.snapshots.rates
        done = {s for _, _, s in self.published}
        self.waiting = False
        for i, (step, weight, state) in enumerate(saved):
            if step in done:
                continue
            if not ended and not _weight_is_final(i, steps, rates, final_step):
                self.waiting = i + 1 < len(steps)  # only a rate above 0 is missing (a warm-up from 0)
                break
            self._write_checkpoint(model, step, weight, state, final=step == final_step)
        if self.gradients:
            from datainf.combine import write_run_stores

            write_run_stores(self.store, self.out, self.published)

    def _write_checkpoint(self, model: Any, step: int, weight: float, state: dict[str, torch.Tensor],
                          final: bool) -> None:
        assert self.snapshots is not None
        moments = self.moments.get(step)
        info = {"step": step, "learning_rate": weight, "steps": self.total_steps,
                "learning_rate_rule": LEARNING_RATE_RULE,
                "exp_avg_sq": SECOND_MOMENTS_FILE if moments else None}
        if step == 0:
            info["exp_avg_sq_note"] = "step 0: no optimizer step has been taken yet, so Adam has no second moments"
        elif not moments:
            info["exp_avg_sq_note"] = "the optimizer keeps no exp_avg_sq (not Adam / AdamW)"

        def fill(folder: Path) -> None:
            now = self.snapshots.current()
            try:
                self.snapshots.load(state)
                model.save_pretrained(str(folder))
            finally:
                self.snapshots.load(now)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(str(folder))
            if moments:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in moments.items()}, str(folder / SECOND_MOMENTS_FILE),
                          metadata={"format": "datainf-exp-avg-sq", "step": str(step),
                                    "note": "Adam's exp_avg_sq after this step, not bias-corrected (divide by "
                                            "1 - beta2 ** step for the corrected estimate)"})

        if final:  # the final adapter is RUN itself, as `datainf finetune --checkpoints` writes it
            scratch = Path(tempfile.mkdtemp(prefix=".final-", dir=self.out))
            try:
                fill(scratch)
                atomic.plain_modes(scratch)
                for item in sorted(scratch.iterdir()):
                    target = self.out / item.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
                atomic.write_json(self.out / CHECKPOINT_FILE, info)  # last: what makes RUN a checkpoint
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            folder = self.out
        else:
            folder = self.out / f"checkpoint-{step}"
            with atomic.new_directory(folder) as tmp:
                fill(tmp)
                (tmp / CHECKPOINT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        self.published.append((str(folder), weight, step))
        self.moments.pop(step, None)
        self.record["checkpoints"].append({"step": step, "folder": str(folder), "learning_rate": weight,
                                           "exp_avg_sq": info["exp_avg_sq"]})
        atomic.write_json(self.out / TRAINING_FILE, self.record)

    def _collect(self, model: Any, step: int) -> None:
        """This checkpoint's per-example gradients of the training records into store/checkpoint-STEP, by
        datainf grads' own Attributor (eval mode, no dropout; the trainer's RNG, modes and .grad untouched)."""
        from datainf.attributor import Attributor

        assert self.store is not None and self.records is not None
        with (torch.random.fork_rng(devices=_devices(model)), _config_as_saved(model, self.saved_config),
              _without_autocast(model)):
            Attributor(model, task=self.task, store=self.store / f"checkpoint-{step}", tokenizer=self.tokenizer,
                       collate=self.collate, batch_size=self.batch_size, chunk_size=self.chunk_size,
                       store_dtype=self.store_dtype, progress=False, projection=self.projection).fit(self.records)

    def _fingerprint(self, model: Any) -> str:
        """The base model's fingerprint as ``datainf grads`` computes it on the saved model."""
        from datainf.store import fingerprint_model

        with _config_as_saved(model, self.saved_config):
            return fingerprint_model(model)["model"]

    # ------------------------------------------------------------------ settings
    def _check_apart_from(self, args: Any, model: Any) -> None:
        out = self.out.resolve()
        output_dir = getattr(args, "output_dir", None)
        if output_dir is not None:
            trainer_dir = Path(output_dir).resolve()
            if out == trainer_dir or out in trainer_dir.parents:
                raise DataInfError(f"out {self.out} is (or holds) the trainer's output_dir {output_dir}: its "
                                   "checkpoint-N folders would mix with the callback's; give the callback another "
                                   "folder")
        base = getattr(getattr(model, "config", None), "name_or_path", None)
        if base and Path(base).is_dir():
            check_apart(self.out, {"base model folder": base}, option="out")

    def _tokenization(self, args: Any) -> dict[str, Any]:
        """How the trainer turned records into tokens and which of them carry the loss; sets ``self.collate``
        from TRL's SFTConfig when none was given."""
        data_format = _data_format(self.records[0]) if self.records else None
        trl = {k: getattr(args, k) for k in ("assistant_only_loss", "completion_only_loss", "max_length",
                                             "truncation_mode", "packing", "padding_free", "dataset_text_field",
                                             "bf16", "fp16") if hasattr(args, k)}
        out: dict[str, Any] = {"data_format": data_format, "trainer_settings": _jsonable(trl)}
        truncation = trl.get("truncation_mode")  # TRL cuts every format the same way (keep_start by default)
        if self.collate is None and "assistant_only_loss" in trl:
            loss_tokens, source = _trl_loss_tokens(trl, data_format)
            if loss_tokens is not None and self.tokenizer is not None:
                max_length = trl.get("max_length") or NO_TRUNCATION
                self.collate = TextCollator(tokenizer=self.tokenizer, task="causal_lm", max_length=int(max_length),
                                            loss_tokens=loss_tokens, truncation=truncation or "keep_start")
        elif self.collate is not None:
            source = "the collate given to the callback"
            if truncation is not None and trl.get("max_length") is not None and self.collate.truncation != truncation:
                raise DataInfError(f"the {type(args).__name__} cuts examples longer than max_length={trl['max_length']} "
                                   f"with truncation_mode={truncation!r}, but collate cuts them with "
                                   f"truncation={self.collate.truncation!r}: the gradients would be of other tokens "
                                   f"than the trained ones; pass TextCollator(..., truncation={truncation!r})")
        else:
            source = "the Trainer's data collator decides (pass collate= to record it)"
        out["loss_tokens_source"] = source
        if self.collate is not None:
            settings = self.collate.settings()
            out["loss_tokens"] = self.collate.loss_tokens
            out["max_length"] = self.collate.max_length
            out["truncation"] = self.collate.truncation
            out["collate"] = settings
            out["grads_options"] = _grads_options(settings)
        else:
            out["loss_tokens"] = None
        tok = self.tokenizer
        if tok is not None:
            template = getattr(tok, "chat_template", None)
            out["tokenizer"] = {
                "name_or_path": getattr(tok, "name_or_path", None), "class": type(tok).__name__,
                "vocab_size": len(tok) if hasattr(tok, "__len__") else None,
                "eos_token": getattr(tok, "eos_token", None), "pad_token": getattr(tok, "pad_token", None),
                "padding_side": getattr(tok, "padding_side", None),
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()
                if isinstance(template, str) else None}
        return out


# ---------------------------------------------------------------------- helpers
def _check_no_packing(args: Any) -> None:
    """Refuse a TRL run that packs examples (``packing=True``): its training rows are several examples
    concatenated (and, by the packing strategy, cut or split), so no training row is one example and a
    per-example gradient is not of anything the model was trained on. The same for ``padding_free=True``
    without packing: each batch is one row of its examples concatenated (TRL relies on FlashAttention to keep
    them apart; other attention kernels let them attend across each other)."""
    if getattr(args, "packing", False):
        strategy = getattr(args, "packing_strategy", None)
        raise DataInfError(f"{type(args).__name__}(packing=True{f', packing_strategy={strategy!r}' if strategy else ''})"
                           " concatenates training examples into packed rows, so per-example gradients and influence "
                           f"do not describe what the model was trained on; set packing=False in the "
                           f"{type(args).__name__} to record this run with DatainfCallback")
    if getattr(args, "padding_free", False):
        raise DataInfError(f"{type(args).__name__}(padding_free=True) flattens each batch of training examples into "
                           "one concatenated row, so per-example gradients and influence do not describe what the "
                           f"model was trained on; set padding_free=False in the {type(args).__name__} to record this "
                           "run with DatainfCallback")


def _check_new_folder(folder: Path, name: str) -> None:
    """Refuse a folder that exists and holds anything: the callback never writes over what it did not make."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataInfError(f"{name} {folder} already exists and is not an empty folder; give the callback a new "
                           "folder (it never writes over files it did not make)")


#: config entries a trainer switches for training that change no loss or gradient (TRL turns off the KV cache)
RUNTIME_CONFIG_KEYS = ("use_cache",)


def _saved_config(model: Any, base_path: str | None) -> dict[str, dict[str, Any]]:
    """How the model reads back from disk, where it differs from the model in training: {"model": the values
    of :data:`RUNTIME_CONFIG_KEYS` in the base model's config.json, "adapter": the entries peft's
    ``save_pretrained`` fills into the adapter's config (``auto_mapping`` when no task_type was set)}. The
    fingerprints ``datainf grads`` and ``explain`` compare are those of the model as loaded from disk."""
    out: dict[str, dict[str, Any]] = {"model": {}, "adapter": {}}
    config = getattr(model, "config", None)
    if config is not None and base_path and (Path(base_path) / "config.json").is_file():
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(base_path)
        out["model"] = {k: getattr(saved, k) for k in RUNTIME_CONFIG_KEYS
                        if hasattr(saved, k) and getattr(config, k, None) != getattr(saved, k)}
    peft = model.peft_config.get("default")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        written = json.loads((Path(folder) / "adapter_config.json").read_text())
    live = peft.to_dict()
    out["adapter"] = {k: v for k, v in written.items() if k != "inference_mode" and hasattr(peft, k)
                      and _jsonable(live.get(k)) != v and not isinstance(live.get(k), (set, list, tuple))}
    return out


@contextlib.contextmanager
def _config_as_saved(model: Any, saved: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Within the block the model's config and its adapter's config read as they do once saved and loaded
    (:func:`_saved_config`), so that the fingerprints written into the stores are those of the checkpoints."""
    targets = [(model.config, saved.get("model") or {}), (model.peft_config["default"], saved.get("adapter") or {})]
    now = [(obj, {k: getattr(obj, k) for k in values}) for obj, values in targets]
    try:
        for obj, values in targets:
            for k, v in values.items():
                setattr(obj, k, v)
        yield
    finally:
        for obj, values in now:
            for k, v in values.items():
                setattr(obj, k, v)


@contextlib.contextmanager
def _without_autocast(model: Any) -> Iterator[None]:
    """Within the block the model runs its own forward, not the one accelerate wraps in autocast for mixed
    precision training (TRL's SFTConfig trains in bf16 by default): the stores hold the gradients of the model
    as ``datainf grads`` loads it, at its own precision. The wrapped forward is put back afterwards."""
    original = getattr(model, "_original_forward", None)  # where accelerate keeps the unwrapped forward
    if original is None:
        yield
        return
    wrapped = model.forward
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _weight_is_final(i: int, steps: list[int], rates: list[float], final_step: int) -> bool:
    """Whether checkpoint ``i``'s weight (:func:`interval_rates`) no longer changes as training goes on: the
    final checkpoint once its step is taken; another once the steps up to the next checkpoint have their
    rates and, where those are all 0 (a warm-up from 0), up to the first step with a rate above 0."""
    step = steps[i]
    if step == final_step:
        return len(rates) >= step
    if i + 1 >= len(steps) or len(rates) < steps[i + 1]:
        return False
    return any(r > 0 for r in rates[step:])


def _group_rate(optimizer: Any, lora_ids: set[int]) -> float:
    """The learning rate of the optimizer's parameter group that holds the LoRA parameters (by their ids)."""
    for group in optimizer.param_groups:
        if any(id(p) in lora_ids for p in group["params"]):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _second_moments(optimizer: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """Adam's exp_avg_sq of every LoRA parameter, by the model's parameter names (None: the optimizer keeps
    none)."""
    return second_moments(optimizer, adapter_parameters(model)) or None


def _optimizer_settings(optimizer: Any) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    group = inner.param_groups[0]
    return _jsonable({"class": type(inner).__name__, **{k: group[k] for k in ("betas", "eps", "weight_decay")
                                                        if k in group}})


def _trainer_name(args: Any) -> str:
    name = type(args).__name__
    return {"SFTConfig": "trl.SFTTrainer", "TrainingArguments": "transformers.Trainer"}.get(name, name)


def _data_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record and ("completion" in record or "response" in record):
        conversational = isinstance(record["prompt"], list)
        return "conversational prompt-completion" if conversational else "prompt-completion"
    if "text" in record:
        return "text"
    return None


def _trl_loss_tokens(trl: dict[str, Any], data_format: str | None) -> tuple[str | None, str]:
    """TRL's SFT rule for which tokens carry the loss, as a collator's loss_tokens, with the reason."""
    if data_format is None:
        return None, "TRL SFTConfig, but the data format is not known (pass train_data)"
    if data_format == "text":
        return "all", "text data: every token"
    if data_format == "messages":
        if trl.get("assistant_only_loss"):
            return "assistant", "TRL assistant_only_loss=True: the assistant turns"
        return "all", "TRL 'messages' data without assistant_only_loss: every token"
    if trl.get("completion_only_loss") is False:
        return "all", "TRL completion_only_loss=False: prompt and completion"
    return "assistant", "TRL prompt-completion data (completion_only_loss default): the completion"


def _grads_options(settings: dict[str, Any]) -> str:
    """The `datainf grads` options that tokenize as ``settings`` (a TextCollator's) do."""
    parts = [f"--max-length {settings['max_length']}"]
    if settings.get("loss_tokens", "assistant") != "assistant":
        parts.append(f"--loss-tokens {settings['loss_tokens']}")
    if settings.get("chat_template"):
        parts.append("--chat-template")
    if settings.get("assistant_turns", "all") != "all":
        parts.append(f"--assistant-turns {settings['assistant_turns']}")
    if settings.get("truncation", "auto") != "auto":
        parts.append(f"--truncation {settings['truncation']}")
    return " ".join(parts)


def _as_records(data: Any) -> list[dict]:
    """The training records as ``datainf grads`` reads them from a file of the same rows (TRL's
    ``completion`` read as the response, only the columns of the format kept), so that the stores written
    during training are the ones ``datainf grads --run`` makes from that file: same rows, same fingerprint.
    They go through the file reader itself, by way of a temporary JSON lines file."""
    from datainf.attributor import as_records
    from datainf.data.text import load_lm_records

    rows = [dict(r) if hasattr(r, "keys") else r for r in as_records(data)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_data.jsonl"
        try:
            path.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in rows), encoding="utf-8")
            return load_lm_records(path)
        except DataInfError as e:
            raise DataInfError(str(e).replace(str(path), "train_data")) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))


def _devices(model: Any) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


__all__ = ["TRAINING_FILE", "TRAINING_FORMAT", "DatainfCallback"]
