"""The task object (issue 30): named tasks declared once, a query measurement apart from the training loss, and
`grads` reading the task an adapter folder records.

References are written here in float64: each example's gradient by its own backward pass through a loss
written by hand (the margin of the true class's logit over the log-sum-exp of the others; a causal LM's
summed negative log-likelihood of the response tokens), and exact influence by a dense solve per block
``score = -g^T (G^T G / n + lambda I)^{-1} q``. Both sides round float64 sums in another order, so they agree
to FLOAT64_TOL (tests/reference.py); a query gradient of the training loss instead of the measurement, or a
mean instead of a sum over tokens, moves them by far more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import hashes, refused, write_jsonl  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from datainf.tasks import NAMED_TASKS, TASKS, TaskSpec, classification_loss, get_task, recorded_task  # noqa: E402
from reference import assert_close_to  # noqa: E402

DAMPING = 0.1


# ------------------------------------------------------------------------------- a toy query measurement
class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(5, 4).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


def margin(model: nn.Module, batch: dict) -> torch.Tensor:
    """The toy query measurement: the true class's logit minus the log-sum-exp of the other classes' logits."""
    logits = model(batch["x"])
    labels = batch["labels"]
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


TOY = TaskSpec("toy-margin", classification_loss, measurement=margin)


def one_by_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn) -> dict[str, torch.Tensor]:
    """Each example's gradient of ``fn`` by its own backward pass (float64)."""
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        value = fn(model, x[i: i + 1], y[i: i + 1])
        for n, g in zip(params, torch.autograd.grad(value, list(params.values()))):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def test_a_query_measurement_in_one_module_against_a_dense_float64_reference():
    model = TinyClassifier()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    qx, qy = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
    train = datainf.per_example_gradients(model, {"x": x, "labels": y}, TOY)
    query = datainf.per_example_gradients(model, {"x": qx, "labels": qy}, TOY.query())

    def ce(m, xi, yi):
        logits = m(xi)
        return torch.logsumexp(logits, dim=1).sum() - logits[0, yi[0]]

    def hand_margin(m, xi, yi):
        logits = m(xi)[0]
        others = torch.cat([logits[: yi[0]], logits[yi[0] + 1:]])
        return logits[yi[0]] - torch.logsumexp(others, dim=0)

    want_train, want_query = one_by_one(model, x, y, ce), one_by_one(model, qx, qy, hand_margin)
    for name in want_train:
        assert_close_to(train[name], want_train[name], what=name)
        assert_close_to(query[name], want_query[name], what=name)
    want = torch.zeros(12, 4, dtype=torch.float64)
    for name in want_train:
        G, Q = want_train[name].reshape(12, -1), want_query[name].reshape(4, -1)
        H = G.T @ G / 12 + DAMPING * torch.eye(G.shape[1], dtype=torch.float64)
        want -= G @ torch.linalg.solve(H, Q.T)
    got = datainf.influence(train, query, "exact", damping=DAMPING)
    assert_close_to(got, want, what="exact influence of the margin")
    # the measurement is what the queries' gradients are of: the training loss's differ
    loss_query = datainf.per_example_gradients(model, {"x": qx, "labels": qy}, TOY)
    assert float((loss_query["head.weight"] - query["head.weight"]).abs().max()) > 1e-3


def test_named_tasks_are_declared_once():
    assert TASKS == tuple(NAMED_TASKS) and set(TASKS) == {"classification", "causal_lm", "causal_lm_mean"}
    assert get_task("causal_lm").query() is get_task("causal_lm")  # no measurement: the training loss
    assert TOY.query().loss is margin and TOY.query().measurement is None
    with pytest.raises(datainf.DataInfError, match="unknown task 'nope'"):
        get_task("nope")


def test_the_task_an_adapter_folder_records(tmp_path):
    assert recorded_task(tmp_path) is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    assert recorded_task(tmp_path) == ("causal_lm", str(tmp_path / "adapter_config.json"))
    (tmp_path / "datainf_finetune.json").write_text(json.dumps({"task": "causal_lm_mean"}))
    assert recorded_task(tmp_path) == ("causal_lm_mean", str(tmp_path / "datainf_finetune.json"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    (tmp_path / "datainf_finetune.json").unlink()
    assert recorded_task(tmp_path)[0] == "classification"


# ------------------------------------------------------------------------------- grads: the adapter's task
@pytest.fixture(scope="module")
def causal_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter of the tiny Llama saved the usual way (task_type CAUSAL_LM), B matrices not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                  target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("causal-adapter")
    peft_model.save_pretrained(str(folder))
    return folder


def prompt_response_data(path: Path) -> list[dict]:
    from datainf.data.generation import make_task

    records = [{"prompt": r["prompt"], "response": r["response"]} for r in make_task("sentences", classes=2,
                                                                                          per_class=2)]
    write_jsonl(path, records)
    return records


def test_grads_takes_the_task_the_adapter_records(tiny_llama_dir, causal_adapter, tmp_path, capsys):
    """Without --task, a causal LM adapter gives causal LM gradients (before: "no column 'text'")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.data.collate import TextCollator

    records = prompt_response_data(tmp_path / "data.jsonl")
    code, _, err = run(["--verbose", "grads", "--model", str(tiny_llama_dir), "--adapter", str(causal_adapter), "--data",
                        str(tmp_path / "data.jsonl"), "--store", str(tmp_path / "store"), "--dtype", "float64",
                        "--model-dtype", "float64", "--device", "cpu"], capsys)
    assert code == 0, err
    store = GradientStore.open(tmp_path / "store")
    assert store.manifest["meta"]["task"] == "causal_lm"
    # independent: each example's summed response-token NLL, by hand, one backward pass each
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64),
                                      str(causal_adapter), is_trainable=True)
    collate = TextCollator(AutoTokenizer.from_pretrained(str(tiny_llama_dir)), task="causal_lm")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stored = dict(store.blocks())
    blocks = {name: next(b for b in stored if b in name or name in b) for name in params}
    assert sorted(blocks.values()) == sorted(stored) and len(stored) == len(params) == 8  # 2 layers x q, v x A, B
    for i, record in enumerate(records):
        batch = collate([record])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != -100
        nll = -torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep][:, None]).sum()
        for name, g in zip(params, torch.autograd.grad(nll, list(params.values()))):
            assert float(g.abs().max()) > 0
            assert_close_to(stored[blocks[name]][i].reshape(g.shape), g, what=f"{name}, example {i}")


def test_grads_refuses_a_task_of_another_kind_than_the_adapters(tiny_llama_dir, causal_adapter, tmp_path, capsys):
    prompt_response_data(tmp_path / "data.jsonl")
    before = hashes(tmp_path, causal_adapter)
    refused(["grads", "--task", "classification", "--model", str(tiny_llama_dir), "--adapter", str(causal_adapter),
             "--data", str(tmp_path / "data.jsonl"), "--store", str(tmp_path / "store"), "--device", "cpu"], capsys,
            "--task classification", "causal_lm", "adapter_config.json")
    assert not (tmp_path / "store").exists() and hashes(tmp_path, causal_adapter) == before
