"""Per-example LoRA gradients against a loop of single-example backward calls on the UNPADDED examples.

The reference losses are independent of datainf.tasks: cross-entropy of the logits for classification and
the next-token cross-entropy of the unpadded example's response tokens (summed, or averaged) for causal LMs.
Models run in float64, so hooks and loop agree to rounding (tests/reference.py states the bound); what the
comparisons catch: a padded position leaking into a gradient, a call of a module missed by the hooks, a
wrong loss reduction, a wrong example order, all O(1e-2) or more of the largest entry.
"""

from __future__ import annotations

import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from datainf.errors import DataInfError  # noqa: E402
from datainf.gradients import per_example_gradients, tracked_parameters  # noqa: E402
from datainf.tasks import per_example_loss  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to, assert_per_example_close  # noqa: E402
from tiny_models import (  # noqa: E402
    random_causal_lm_batch,
    random_classification_batch,
    tiny_bert_classifier,
    tiny_llama_causal_lm,
    unpad,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def reference_loss(model: nn.Module, example: dict, task: str) -> torch.Tensor:
    """The loss of ONE unpadded example, computed without datainf."""
    inputs = {k: v for k, v in example.items() if k != "labels"}
    if task == "classification":
        return F.cross_entropy(model(**inputs).logits, example["labels"])
    # next-token cross-entropy over the response tokens, written out (Hugging Face's own loss casts the
    # logits to float32, which would make a float64 reference a float32 one)
    logits = model(**inputs).logits[0, :-1]
    targets = example["labels"][0, 1:]
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return total if task == "causal_lm" else total / int((targets != -100).sum())


def reference_gradients(model: nn.Module, batch: dict, task: str) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} from a loop of single-example loss.backward() calls on unpadded examples."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    model.eval()
    for i in range(batch["labels"].shape[0]):
        model.zero_grad(set_to_none=True)
        reference_loss(model, unpad(batch, i), task).backward()
        for n, p in params.items():
            rows[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(r) for n, r in rows.items()}


def assert_blocks_close(actual: dict, expected: dict) -> None:
    """float64 gradients of a float64 model, equal to the loop's to float64 rounding (per example)."""
    assert all(a.dtype == torch.float64 for a in actual.values()), {n: a.dtype for n, a in actual.items()}
    assert_per_example_close(actual, expected)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_classifier(num_labels=3).double()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_causal_lm().double()


def test_float32_model_gives_float32_gradients_within_float32_rounding():
    """The float32 path itself: float32 gradients, within FLOAT32_TOL of the float64 loop on the same weights
    (tests/reference.py: under 1e4 accumulated terms at 6e-8 each); a wrong mask or loss is O(1e-1) off."""
    model32 = tiny_llama_causal_lm()
    batch = random_causal_lm_batch(5, padding="left", seed=14)
    actual = per_example_gradients(model32, batch, "causal_lm")
    assert all(a.dtype == torch.float32 for a in actual.values())
    expected = reference_gradients(tiny_llama_causal_lm().double(), batch, "causal_lm")
    assert_per_example_close(actual, expected, tol=FLOAT32_TOL)


def test_bert_padded_batch_matches_unpadded_loop(bert):
    batch = random_classification_batch(6, num_labels=3, seed=1)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # uneven lengths
    expected = reference_gradients(bert, batch, "classification")
    actual = per_example_gradients(bert, batch, "classification")
    assert_blocks_close(actual, expected)
    lora_a = [n for n in actual if "lora_A" in n]
    assert len(lora_a) == 4 and all(actual[n].abs().sum(dim=(1, 2)).min() > 0 for n in lora_a)
    assert any("classifier" in n and n.endswith("bias") for n in actual)


def test_bert_batch_of_one(bert):
    batch = random_classification_batch(1, num_labels=3, seed=2)
    assert_blocks_close(per_example_gradients(bert, batch), reference_gradients(bert, batch, "classification"))


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("task", ["causal_lm", "causal_lm_mean"])
def test_llama_padded_batch_matches_unpadded_loop(llama, padding, task):
    batch = random_causal_lm_batch(5, padding=padding, seed=3)
    expected = reference_gradients(llama, batch, task)
    actual = per_example_gradients(llama, batch, task)
    assert_blocks_close(actual, expected)
    assert all(g.abs().sum() > 0 for g in actual.values())


@pytest.mark.parametrize("padding", ["right", "left"])
def test_causal_lm_loss_matches_unpadded_examples(llama, padding):
    batch = random_causal_lm_batch(5, padding=padding, seed=4)
    with torch.no_grad():
        losses = per_example_loss("causal_lm", llama, batch)
        expected = torch.stack([reference_loss(llama, unpad(batch, i), "causal_lm") for i in range(5)])
    assert_close_to(losses, expected, what="per-example causal LM losses")  # float64: a wrong mask is O(1e-1)


def test_group_lora_is_the_concatenation(bert):
    batch = random_classification_batch(4, num_labels=3, seed=5)
    separate = per_example_gradients(bert, batch)
    grouped = per_example_gradients(bert, batch, group_lora=True)
    module = "base_model.model.bert.encoder.layer.1.attention.self.value"
    a, b = separate[f"{module}.lora_A.default.weight"], separate[f"{module}.lora_B.default.weight"]
    torch.testing.assert_close(grouped[f"{module}.lora"], torch.cat([a.flatten(1), b.flatten(1)], dim=1))
    assert len(grouped) == 4 + 2  # four LoRA modules, classifier weight and bias
    assert "base_model.model.classifier.modules_to_save.default.weight" in grouped


def test_params_filter_names_and_predicate(bert):
    batch = random_classification_batch(4, num_labels=3, seed=6)
    full = per_example_gradients(bert, batch)
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    names = [n for n in full if "layer.0" in n and "value" in n]
    by_names = per_example_gradients(bert, batch, params=names)
    by_predicate = per_example_gradients(bert, batch, params=lambda n, p: "classifier" in n)
    assert list(by_names) == names
    assert all("classifier" in n for n in by_predicate) and len(by_predicate) == 2
    for part in (by_names, by_predicate):
        for n, g in part.items():
            torch.testing.assert_close(g, full[n])
    assert {n: p.requires_grad for n, p in bert.named_parameters()} == flags
    with pytest.raises(DataInfError, match="not a parameter"):
        per_example_gradients(bert, batch, params=["nope"])
    with pytest.raises(DataInfError, match="frozen"):
        per_example_gradients(bert, batch, params=["base_model.model.bert.pooler.dense.weight"])


def test_embedding_lora_falls_back_to_the_loop(caplog):
    model = tiny_llama_causal_lm(lora_targets=("embed_tokens", "v_proj"), seed=7).double()
    assert any("lora_embedding_A" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = random_causal_lm_batch(4, padding="left", seed=8)
    with caplog.at_level(logging.INFO, logger="datainf.gradients"):
        actual = per_example_gradients(model, batch, "causal_lm")
    assert "lora_embedding_A" in caplog.text and "single-example" in caplog.text
    assert_blocks_close(actual, reference_gradients(model, batch, "causal_lm"))


class RawModel(nn.Module):
    """A linear layer plus a raw nn.Parameter scale and a weight also used outside its module (tied)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.linear(x)) * self.scale  # x: (B, T, 5)
        h = self.head(h) + F.linear(h, self.head.weight)  # head.weight tied: hooks alone would miss a term
        return h.sum(dim=1)  # (B, 3)


def raw_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).pow(2).sum(dim=1)


def test_raw_parameter_and_tied_weight_fall_back_to_the_loop():
    model = RawModel().double().eval()
    generator = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(4, 6, 5, generator=generator, dtype=torch.float64),
             "y": torch.randn(4, 3, generator=generator, dtype=torch.float64)}
    actual = per_example_gradients(model, batch, raw_loss)
    expected: dict[str, list[torch.Tensor]] = {name: [] for name, _ in model.named_parameters()}
    for i in range(4):
        model.zero_grad(set_to_none=True)
        raw_loss(model, {"x": batch["x"][i : i + 1], "y": batch["y"][i : i + 1]}).sum().backward()
        for name, p in model.named_parameters():
            expected[name].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    # the tied head.weight term missed by hooks alone would be an O(1) error
    assert_per_example_close(actual, {name: torch.stack(rows) for name, rows in expected.items()})


def test_example_without_response_tokens_gets_zero_gradient_and_warning(llama):
    batch = random_causal_lm_batch(4, padding="right", seed=9, empty=(2,))
    with pytest.warns(UserWarning, match=r"\[2\]"):
        actual = per_example_gradients(llama, batch, "causal_lm")
    for name, g in actual.items():
        assert torch.count_nonzero(g[2]) == 0, name
    keep = [0, 1, 3]
    sub = {k: v[keep] for k, v in batch.items()}
    expected = reference_gradients(llama, sub, "causal_lm")
    assert_blocks_close({n: g[keep] for n, g in actual.items()}, expected)


def test_no_trainable_parameters_raises():
    model = nn.Sequential(nn.Linear(3, 2))
    model.requires_grad_(False)
    with pytest.raises(DataInfError, match="no trainable parameters"):
        per_example_gradients(model, {"labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(DataInfError, match="no trainable parameters"):
        tracked_parameters(model)


def test_unknown_task_raises(bert):
    with pytest.raises(DataInfError, match="unknown task"):
        per_example_gradients(bert, random_classification_batch(2), "regression")


def test_state_is_restored_also_after_an_exception(bert):
    batch = random_classification_batch(3, num_labels=3, seed=10)
    bert.train()
    dropout_mode = {n: m.training for n, m in bert.named_modules()}
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    per_example_gradients(bert, batch, params=lambda n, p: "lora_B" in n)

    def failing(model, batch):
        model(**{k: v for k, v in batch.items() if k != "labels"})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_example_gradients(bert, batch, failing, params=lambda n, p: "lora_B" in n)
    assert {n: m.training for n, m in bert.named_modules()} == dropout_mode
    assert {n: p.requires_grad for n, p in bert.named_parameters()} == flags
    assert all(p.grad is None for p in bert.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in bert.modules())
    bert.eval()


def test_eval_mode_turns_lora_dropout_off(bert):
    batch = random_classification_batch(3, num_labels=3, seed=11)
    bert.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = per_example_gradients(bert, batch)
            second = per_example_gradients(bert, batch)
    finally:
        bert.eval()
    for name in first:
        torch.testing.assert_close(first[name], second[name])
    assert_blocks_close(first, reference_gradients(bert, batch, "classification"))


def test_fast_path_covers_lora_models_without_fallback(bert, llama, caplog):
    with caplog.at_level(logging.INFO, logger="datainf.gradients"):
        per_example_gradients(bert, random_classification_batch(3, num_labels=3, seed=12))
        per_example_gradients(llama, random_causal_lm_batch(3, padding="left", seed=12), "causal_lm")
    assert "single-example" not in caplog.text


def test_left_padding_with_absolute_positions_matches_unpadded():
    """GPT-2 has absolute position embeddings (RoPE in Llama hides a position shift): left padding needs
    position_ids derived from the attention mask."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True))
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = random_causal_lm_batch(4, padding="left", seed=13)
    assert_blocks_close(per_example_gradients(model, batch, "causal_lm"), reference_gradients(model, batch, "causal_lm"))
