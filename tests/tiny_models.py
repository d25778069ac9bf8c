"""Tiny random-weight PEFT models and padded batches for tests (no downloads; shared by several test files).

Stable API (other test files import it):

* ``tiny_bert_classifier(num_labels=2, lora_targets=("query", "value"), rank=4, seed=0, vocab_size=100)``
  -> PEFT-wrapped ``BertForSequenceClassification`` (hidden 32, 2 layers, 2 heads, intermediate 64), LoRA
  on ``lora_targets`` with dropout 0.1 and the classifier in ``modules_to_save``.
* ``tiny_llama_causal_lm(lora_targets=("q_proj", "v_proj"), rank=4, seed=0, vocab_size=100)``
  -> PEFT-wrapped ``LlamaForCausalLM`` of the same size. ``"embed_tokens"`` may be a target (embedding LoRA).
* ``random_classification_batch(batch_size, ...)`` -> padded batch {input_ids, token_type_ids,
  attention_mask, labels (B,)}, plus ``lengths`` helpers.
* ``random_causal_lm_batch(batch_size, ..., padding="right"|"left")`` -> padded batch {input_ids,
  attention_mask, labels (B, T)} with -100 on prompt and padding tokens.
* ``random_padded_batch(task, batch_size, **options)`` dispatches to the two above.
* ``unpad(batch, index)`` -> example ``index`` alone, padding removed (a batch of size 1).

LoRA B matrices start at zero in PEFT (which would make every lora_A gradient zero and tests vacuous), so
after wrapping all LoRA B weights are set to small random values. Models are returned in eval mode.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402

PAD_ID = 0
IGNORE_INDEX = -100


def _randomize_lora_b(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Give every LoRA B weight (lora_B, lora_embedding_B) small random values, reproducibly."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def tiny_bert_classifier(
    num_labels: int = 2,
    lora_targets: tuple[str, ...] = ("query", "value"),
    rank: int = 4,
    seed: int = 0,
    vocab_size: int = 100,
) -> nn.Module:
    """A PEFT LoRA model around a random tiny BertForSequenceClassification (eval mode, float32)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=PAD_ID,
    )
    base = BertForSequenceClassification(config)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        target_modules=list(lora_targets),
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.1,
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, lora)
    _randomize_lora_b(model, seed)
    return model.eval()


def tiny_llama_causal_lm(
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 4,
    seed: int = 0,
    vocab_size: int = 100,
) -> nn.Module:
    """A PEFT LoRA model around a random tiny LlamaForCausalLM (eval mode, float32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, target_modules=list(lora_targets), r=rank, lora_alpha=2 * rank, lora_dropout=0.1
    )
    model = get_peft_model(base, lora)
    _randomize_lora_b(model, seed)
    return model.eval()


def _lengths(batch_size: int, min_len: int, max_len: int, generator: torch.Generator) -> list[int]:
    """Uneven lengths in [min_len, max_len]; the first example always has max_len, the last min_len."""
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator).tolist()
    lengths[0] = max_len
    if batch_size > 1:
        lengths[-1] = min_len
    return lengths


def random_classification_batch(
    batch_size: int = 4,
    num_labels: int = 2,
    min_len: int = 3,
    max_len: int = 9,
    vocab_size: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A right-padded classification batch of uneven lengths: input_ids, token_type_ids, attention_mask
    (B, T) and labels (B,)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = _lengths(batch_size, min_len, max_len, generator)
    input_ids = torch.full((batch_size, max_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch_size, max_len, dtype=torch.long)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = torch.randint(1, vocab_size, (length,), generator=generator)
        mask[i, :length] = 1
    return {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros_like(input_ids),
        "attention_mask": mask,
        "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
    }


def random_causal_lm_batch(
    batch_size: int = 4,
    min_len: int = 4,
    max_len: int = 10,
    vocab_size: int = 100,
    padding: str = "right",
    seed: int = 0,
    empty: tuple[int, ...] = (),
) -> dict[str, Tensor]:
    """A padded causal-LM batch of uneven lengths: input_ids, attention_mask and labels (B, T). Each example
    is a prompt (its first 1 to len-2 tokens, labels -100) then a response (labels = input_ids); padding
    (``"right"`` or ``"left"``) has labels -100. Examples listed in ``empty`` have no response tokens."""
    if padding not in ("right", "left"):
        raise ValueError("padding must be 'right' or 'left'")
    generator = torch.Generator().manual_seed(seed)
    lengths = _lengths(batch_size, min_len, max_len, generator)
    input_ids = torch.full((batch_size, max_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch_size, max_len, dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
    for i, length in enumerate(lengths):
        tokens = torch.randint(1, vocab_size, (length,), generator=generator)
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        example_labels = tokens.clone()
        example_labels[:prompt] = IGNORE_INDEX
        if i in empty:
            example_labels[:] = IGNORE_INDEX
        where = slice(0, length) if padding == "right" else slice(max_len - length, max_len)
        input_ids[i, where] = tokens
        mask[i, where] = 1
        labels[i, where] = example_labels
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def unpad(batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Example ``index`` of a padded batch with its padding removed, as a batch of one (labels (1,) or
    (1, length))."""
    keep = batch["attention_mask"][index].bool()
    out = {}
    for key, value in batch.items():
        row = value[index]
        if key == "labels" and row.dim() == 0:
            out[key] = row.reshape(1)
        else:
            out[key] = row[keep].unsqueeze(0)
    return out


def random_padded_batch(task: str = "classification", batch_size: int = 4, **options) -> dict[str, Tensor]:
    """``random_classification_batch`` for task ``"classification"``, ``random_causal_lm_batch`` for
    ``"causal_lm"`` / ``"causal_lm_mean"``; ``options`` are passed on."""
    if task == "classification":
        return random_classification_batch(batch_size, **options)
    if task in ("causal_lm", "causal_lm_mean"):
        return random_causal_lm_batch(batch_size, **options)
    raise ValueError(f"unknown task {task!r}")
