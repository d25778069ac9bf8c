"""Which parameters are the adapter: the ones datainf attributes, and the ones its fingerprints call "adapter".

A model prepared for training marks them itself (``requires_grad=True``: PEFT's LoRA A/B matrices and
``modules_to_save`` copies, or whatever a user unfroze). A PEFT model loaded the usual way for inference
(``PeftModel.from_pretrained(base, folder)``, no ``is_trainable=True``) has every parameter frozen; its
adapter is then found by PEFT's own parameter names: ``lora_`` matrices and ``modules_to_save`` copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported for the marker's name (`datainf --help` imports none)
    from torch import nn

#: the file `datainf finetune` writes in an adapter folder it made (task, labels, training summary)
ADAPTER_MARKER = "datainf_finetune.json"
#: name parts of PEFT adapter parameters (LoRA matrices, LoRA embeddings, trained head copies)
ADAPTER_NAME_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                      "modules_to_save")


def is_peft_adapter_name(name: str) -> bool:
    """True for a parameter PEFT adds as (part of) an adapter, by its dotted name."""
    parts = name.split(".")
    return any(p in ADAPTER_NAME_PARTS for p in parts)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name: every trainable parameter, or, when nothing is trainable (a PEFT
    model loaded for inference), PEFT's adapter parameters by name. Empty if neither exists."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if trainable:
        return trainable
    return {name: p for name, p in model.named_parameters() if is_peft_adapter_name(name)}


__all__ = ["ADAPTER_MARKER", "ADAPTER_NAME_PARTS", "adapter_parameters", "is_peft_adapter_name"]
