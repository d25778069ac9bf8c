"""LoRA fine-tuning of a sequence classifier (transformers + peft), sized for a CPU.

Typical use::

    model, tokenizer = load_classifier(minilm_dir(), num_labels=2, lora=LoraSettings(rank=4))
    finetune_classifier(model, tokenizer, train_records, TrainSettings(epochs=2))
    evaluate_classifier(model, tokenizer, val_records)   # {"accuracy": ..., "loss": ..., "n": ...}
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datainf import atomic
from datainf.data.tables import read_json_object
from datainf.errors import DataInfError, parse_json


@dataclass
class LoraSettings:
    """LoRA adapter: rank r, scale alpha / r (alpha=None -> alpha = r, as in the DataInf paper)."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("value",)
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.modules_to_save = tuple(self.modules_to_save)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise DataInfError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise DataInfError(f"LoRA alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DataInfError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise DataInfError(
                f"target_modules must be a non-empty list of module names, got {self.target_modules!r}"
            )

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class TrainSettings:
    """AdamW with a linear schedule and warm-up; batches are shuffled with ``seed``."""

    epochs: int = 3
    learning_rate: float = 3e-4
    batch_size: int = 32
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 0
    head_learning_rate: float | None = None   # rate of the non-LoRA trainable parameters (the head); None: same
    length_buckets: bool = False              # batches of similar token length (far less padding; classifier)

    def __post_init__(self) -> None:
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise DataInfError(f"head_learning_rate must be > 0 or None, got {self.head_learning_rate!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise DataInfError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not self.learning_rate > 0:
            raise DataInfError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataInfError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataInfError(f"max_length must be an integer >= 2 (tokens), got {self.max_length!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DataInfError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if not self.weight_decay >= 0:
            raise DataInfError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the load report about the freshly initialised classifier head and the weight-loading bar."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar_enabled:
            hf_logging.enable_progress_bar()


#: how the classifier turns token states into the vector its head reads: "mean" (average over non-padding
#: tokens, as sentence-transformers does for MiniLM; BERT-family models only) or "pooler" (the model's own
#: sequence-classification head, e.g. BERT's dense+tanh pooler over [CLS])
POOLINGS = ("mean", "pooler")
#: written next to the adapter by save_adapter: the pooling the head was trained with
HEAD_FILE = "datainf_head.json"


@functools.cache
def _mean_pooling_class() -> type:
    """BertForSequenceClassification reading the mean of the last hidden states over non-padding tokens.

    Same modules and names as the stock model (``bert.*``, ``dropout``, ``classifier``), minus the unused
    pooler, so peft adapters, ``modules_to_save=("classifier",)`` and the gradient hooks work unchanged.
    Built on first use so that importing this module does not import transformers.
    """
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolingBertForSequenceClassification(BertForSequenceClassification):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.bert.pooler = None  # mean pooling replaces it; its pretrained weights are not loaded

        def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    **kwargs: Any) -> SequenceClassifierOutput:
            kwargs.pop("return_dict", None)
            outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
            hidden = outputs.last_hidden_state                                   # (B, T, H)
            if attention_mask is None:
                mask = hidden.new_ones(hidden.shape[:2])
            else:
                mask = attention_mask.to(hidden.dtype)
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))                         # (B, num_labels)
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                            attentions=outputs.attentions)

    return MeanPoolingBertForSequenceClassification


def check_model_folder(model_dir: str | Path, kind: str = "model") -> None:
    """Refuse, with one error naming the file, a folder transformers cannot load a model from: no
    config.json, one that is not a JSON object, or one without a ``model_type`` this transformers knows
    (transformers would raise deep inside ``from_pretrained``). ``kind`` names the model in the message."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from datainf.data.tables import read_json_object

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise DataInfError(f"{model_dir} has no config.json; pass the folder of a saved transformers {kind}")
    model_type = read_json_object(config_file, f"pass the folder of a saved transformers {kind}").get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise DataInfError(f"{config_file} has no 'model_type' (the architecture, e.g. \"llama\"); pass the folder "
                           f"of a saved transformers {kind}, or add the model_type it was saved with")
    if model_type not in CONFIG_MAPPING:
        raise DataInfError(f"{config_file}: model_type {model_type!r} is not one this transformers version knows; "
                           "upgrade transformers or pass a model of a known architecture")


def _load_base(model_dir: str | Path, num_labels: int, dtype: torch.dtype = torch.float32,
               pooling: str = "pooler") -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    check_model_folder(model_dir, "model")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise DataInfError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if pooling not in POOLINGS:
        raise DataInfError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if pooling == "mean":
            config = AutoConfig.from_pretrained(str(model_dir), num_labels=num_labels)
            if config.model_type != "bert":
                raise DataInfError(f"pooling='mean' supports BERT-family encoders; {model_dir} is a "
                                   f"{config.model_type!r} model: pass pooling='pooler' (its own head)")
            model = _mean_pooling_class().from_pretrained(str(model_dir), config=config, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels,
                                                                       dtype=dtype)
    return model, tokenizer


def load_classifier(
    model_dir: str | Path, num_labels: int, lora: LoraSettings | None = None, seed: int = 0,
    pooling: str = "pooler",
) -> tuple[Any, Any]:
    """A pretrained encoder with a fresh ``num_labels``-way head, wrapped with LoRA adapters (peft).

    ``pooling`` (see :data:`POOLINGS`): "mean" feeds the head the mean of the last hidden states over
    non-padding tokens (how all-MiniLM-L6-v2 was trained; its BERT pooler never was), "pooler" the model's
    stock sequence-classification head.

    Only the LoRA matrices and the modules in ``lora.modules_to_save`` are trainable. ``seed`` fixes the
    random initialisation of the head and of the LoRA A matrices. Returns (PeftModel, tokenizer).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    lora = lora or LoraSettings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tokenizer = _load_base(model_dir, num_labels, pooling=pooling)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.rank,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            modules_to_save=list(lora.modules_to_save),
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as error:
            raise DataInfError(
                f"cannot put LoRA on {list(lora.target_modules)} in {model_dir}: {str(error).splitlines()[0]}"
            ) from None
    return peft_model, tokenizer


def encode(
    tokenizer: Any,
    records: Sequence[dict],
    max_length: int = 128,
    text_key: str = "text",
    label_key: str = "label",
) -> dict[str, torch.Tensor]:
    """Tokenise records into one batch padded to its longest text (at most ``max_length`` tokens).

    Returns input_ids / attention_mask (and token_type_ids for BERT) of shape (b, t), plus ``labels``
    of shape (b,) when every record has ``label_key``.
    """
    if len(records) == 0:
        raise DataInfError("encode got no records; pass at least one")
    texts = []
    for i, record in enumerate(records):
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataInfError(
                f"record {i} has no text under key {text_key!r}; each record needs {{{text_key!r}: str}}"
            )
        texts.append(text)
    batch = dict(
        tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    )
    if all(label_key in record for record in records):
        batch["labels"] = torch.tensor([int(record[label_key]) for record in records], dtype=torch.long)
    return batch


def _check_labels(records: Sequence[dict], num_labels: int, label_key: str = "label") -> None:
    for i, record in enumerate(records):
        if label_key not in record:
            raise DataInfError(
                f"record {i} has no {label_key!r}; training and evaluation need labelled records"
            )
        if not 0 <= int(record[label_key]) < num_labels:
            raise DataInfError(
                f"record {i} has label {record[label_key]}, outside 0..{num_labels - 1} for this classifier"
            )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def optimizer_steps(n_records: int, batch_size: int, epochs: int) -> int:
    """How many optimizer steps :func:`train_epochs` takes: ``epochs`` passes of ``ceil(n / batch_size)``."""
    return epochs * math.ceil(n_records / batch_size)


def train_epochs(
    model: Any,
    records: Sequence[Any],
    make_batch: Callable[[list[Any]], dict[str, torch.Tensor]],
    batch_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    settings: TrainSettings,
    progress: bool = True,
    lengths: Sequence[int] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """The fine-tuning loop shared by the classifier and the causal LM; trains in place.

    ``settings.head_learning_rate`` (if set) is the rate of the trainable parameters that are not LoRA
    matrices (a ``modules_to_save`` head). With ``settings.length_buckets`` and ``lengths`` (one token count
    per record), each epoch's shuffled order is cut into pools of 8 batches, each pool sorted by length and
    cut into batches, and the epoch's batches shuffled: batches of similar length, little padding.

    AdamW on the trainable parameters with a linear warm-up (``settings.warmup_ratio`` of the steps) then a
    linear decay; ``settings.epochs`` passes over ``records``, reshuffled every epoch with ``settings.seed``.
    Torch's RNG (dropout) is seeded with it too and restored afterwards. ``make_batch(records)`` builds a
    batch (moved here to the model's device); ``batch_loss(model, batch)`` is the scalar to minimise.
    ``on_step(step, lr)``, if given, runs after each optimizer step (``step`` counts from 1; ``lr`` is the
    learning rate that step used), e.g. to snapshot the adapter for a checkpoint sum.
    Returns {"losses": per-step losses, "steps", "seconds", "final_epoch_loss"}; the model ends in eval mode.
    """
    from transformers import get_linear_schedule_with_warmup

    if len(records) == 0:
        raise DataInfError("no training records; pass at least one")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise DataInfError("the model has no trainable parameters; load it with load_classifier or load_causal_lm")
    if lengths is not None and len(lengths) != len(records):
        raise DataInfError(f"lengths has {len(lengths)} entries for {len(records)} records")
    steps_per_epoch = optimizer_steps(len(records), settings.batch_size, 1)
    total_steps = optimizer_steps(len(records), settings.batch_size, settings.epochs)
    groups: list[dict[str, Any]] = [{"params": params}]
    if settings.head_learning_rate is not None:
        head = [p for name, p in named if "lora_" not in name]
        groups = [{"params": [p for name, p in named if "lora_" in name]},
                  {"params": head, "lr": settings.head_learning_rate}]
        groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(settings.warmup_ratio * total_steps), total_steps
    )
    device = params[0].device
    rng = random.Random(settings.seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with (
        torch.random.fork_rng(devices=[]),
        tqdm(total=total_steps, disable=not progress, desc="fine-tuning") as bar,
    ):
        torch.manual_seed(settings.seed)
        for _ in range(settings.epochs):
            order = list(range(len(records)))
            rng.shuffle(order)
            size = settings.batch_size
            if settings.length_buckets and lengths is not None:
                batches = []
                for p0 in range(0, len(order), 8 * size):
                    pool = sorted(order[p0 : p0 + 8 * size], key=lambda i: lengths[i])
                    batches.extend(pool[b : b + size] for b in range(0, len(pool), size))
                rng.shuffle(batches)
            else:
                batches = [order[b : b + size] for b in range(0, len(order), size)]
            for indices in batches:
                chunk = [records[i] for i in indices]
                batch = {k: v.to(device) for k, v in make_batch(chunk).items()}
                loss = batch_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr_used = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if on_step is not None and getattr(on_step, "wants_optimizer", False):
                    on_step(len(losses), lr_used, optimizer)  # e.g. SecondMoments: reads the optimizer's state
                elif on_step is not None:
                    on_step(len(losses), lr_used)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    last = losses[-steps_per_epoch:]
    return {"losses": losses, "steps": total_steps, "seconds": time.perf_counter() - start,
            "final_epoch_loss": sum(last) / len(last)}


def finetune_classifier(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    settings: TrainSettings | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the trainable (LoRA + head) parameters with cross-entropy on ``records`` in place.

    The loop is :func:`train_epochs` (batches reshuffled every epoch with ``settings.seed``, dropout seeded
    too), each batch padded to its own longest text. Returns {"losses": per-step training losses, "steps",
    "seconds", "final_epoch_loss"}.
    """
    settings = settings or TrainSettings()
    if len(records) == 0:
        raise DataInfError("no training records; pass at least one")
    _check_labels(records, model.config.num_labels)
    lengths = None
    if settings.length_buckets:
        lengths = [len(ids) for ids in tokenizer([r["text"] for r in records], truncation=True,
                                                 max_length=settings.max_length)["input_ids"]]
    return train_epochs(model, records, lambda chunk: encode(tokenizer, chunk, settings.max_length),
                        lambda m, batch: m(**batch).loss, settings, progress, lengths=lengths, on_step=on_step)


@torch.no_grad()
def evaluate_classifier(
    model: Any, tokenizer: Any, records: Sequence[dict], batch_size: int = 64, max_length: int = 128
) -> dict:
    """Accuracy and mean cross-entropy of the model (in eval mode) on labelled records.

    Returns {"accuracy": float, "loss": float, "n": int}.
    """
    if len(records) == 0:
        raise DataInfError("no evaluation records; pass at least one")
    if batch_size < 1:
        raise DataInfError(f"batch_size must be >= 1, got {batch_size}")
    _check_labels(records, model.config.num_labels)
    was_training = model.training
    model.eval()
    device = _device(model)
    correct, total_loss = 0, 0.0
    for first in range(0, len(records), batch_size):
        batch = {
            k: v.to(device)
            for k, v in encode(tokenizer, records[first : first + batch_size], max_length).items()
        }
        labels = batch.pop("labels")
        logits = model(**batch).logits
        total_loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return {"accuracy": correct / len(records), "loss": total_loss / len(records), "n": len(records)}


def save_adapter(model: Any, adapter_dir: str | Path) -> Path:
    """Write the LoRA adapter and the trained head (peft ``save_pretrained``) to ``adapter_dir``."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise DataInfError(
            f"save_adapter needs a peft model (from load_classifier), got {type(model).__name__}"
        )
    adapter_dir = Path(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    base = model.get_base_model()
    pooling = "mean" if isinstance(base, _mean_pooling_class()) else "pooler"
    atomic.write_text(adapter_dir / HEAD_FILE, json.dumps({"pooling": pooling}) + "\n")
    return adapter_dir


def load_adapter(
    model_dir: str | Path, adapter_dir: str | Path, num_labels: int, is_trainable: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Rebuild a saved classifier: the base model from ``model_dir`` plus the adapter in ``adapter_dir``.

    Returns (PeftModel in eval mode, tokenizer). An adapter that does not fit the base model (other sizes,
    other number of labels, missing target modules) raises DataInfError.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DataInfError(f"{adapter_dir} has no adapter_config.json; pass a folder written by save_adapter")
    read_json_object(adapter_dir / "adapter_config.json", "pass a folder written by save_adapter")
    # the pooling the head was trained with; adapters written before datainf_head.json used the stock head
    pooling = "pooler"
    if (adapter_dir / HEAD_FILE).is_file():
        head = parse_json((adapter_dir / HEAD_FILE).read_bytes(), str(adapter_dir / HEAD_FILE),
                          "rewrite the adapter with `datainf finetune`")
        pooling = head.get("pooling", "pooler") if isinstance(head, dict) else None
        if pooling not in POOLINGS:
            raise DataInfError(f"{adapter_dir / HEAD_FILE} names no known pooling ({pooling!r}); rewrite the adapter "
                               "with `datainf finetune`")
    base, tokenizer = _load_base(model_dir, num_labels, dtype, pooling=pooling)
    try:
        with _quiet_transformers():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise DataInfError(
            f"the adapter in {adapter_dir} does not fit the base model {model_dir} with num_labels={num_labels}: "
            f"{reason}"
        ) from None
    model.eval()
    return model, tokenizer


#: the record `datainf finetune` writes into an adapter folder (datainf.outputs.ADAPTER_MARKER): its "seed" is
#: the seed the LoRA A matrices were drawn with
FINETUNE_RECORD = "datainf_finetune.json"


def recorded_seed(adapter_dir: str | Path) -> int | None:
    """The seed ``datainf finetune`` recorded for this adapter (its LoRA initialisation), or None when the
    folder does not say (an adapter from TRL, the Trainer, or an earlier datainf)."""
    record = Path(adapter_dir) / FINETUNE_RECORD
    if not record.is_file():
        return None
    seed = read_json_object(record, "rewrite the adapter with `datainf finetune`").get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataInfError(f"{record}: seed {seed!r} is not a whole number; rewrite the adapter with `datainf finetune`")
    return seed


def second_moments(optimizer: Any, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Adam's second moments (``exp_avg_sq``) of ``params`` (name -> parameter), copied to the CPU, by name;
    a parameter the optimizer keeps none for (not Adam, or no step taken yet) is left out."""
    out = {}
    for name, p in params.items():
        moment = (optimizer.state.get(p) or {}).get("exp_avg_sq")
        if moment is not None:
            out[name] = moment.detach().to("cpu").clone().contiguous()
    return out


class SecondMoments:
    """An ``on_step`` for :func:`train_epochs` that keeps Adam's second moments (``exp_avg_sq``) of every
    trainable parameter, by name as in ``model.named_parameters()`` (a gradient store's block names), after
    each of ``steps``; ``then`` (another ``on_step``, e.g. :meth:`datainf.models.checkpoints.Snapshots.on_step`)
    runs first. ``taken[step]`` is {name: tensor}. The Adam-normalized scores divide by their square root
    (:mod:`datainf.remedies`)."""

    wants_optimizer = True

    def __init__(self, model: Any, steps: Sequence[int], then: Callable[[int, float], None] | None = None):
        self.model, self.steps, self.then = model, set(steps), then
        self.taken: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, step: int, lr: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        if self.then is not None:
            self.then(step, lr)
        if step not in self.steps or optimizer is None:
            return
        self.taken[step] = second_moments(optimizer, {n: p for n, p in self.model.named_parameters()
                                                      if p.requires_grad})
