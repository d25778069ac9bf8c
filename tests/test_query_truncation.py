"""`explain` cuts a query longer than the store's max_length on the side the store's training rows were cut
(the store's recorded ``truncation``: TRL's keep_start keeps the first tokens), not always keeping the end.

Reference: the query tokenized and cut at the start by hand (word tokenizer: prompt tokens, response tokens,
EOS), its gradient and the training rows' gradients by one plain backward each of the summed NLL of the
labelled tokens, in float64, compared as the Gram matrix of all of them (which does not depend on how the
gradients are laid out in blocks)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cli_helpers import hashes, run_cli, without_stamps, write_jsonl  # noqa: E402

MAX_LENGTH = 12
PROMPT = "Sentence: the cold doctor"  # 5 tokens
RESPONSE = " holds the window slowly" * 3  # 12 tokens, then EOS: the query is 18 tokens long
TRAIN = [{"prompt": "Sentence: the window", "response": " slowly holds the cold doctor"},
         {"prompt": "Sentence: the doctor", "response": " the cold window" * 4},  # cut too
         {"prompt": "Sentence: slowly", "response": " the doctor holds"}]


def by_hand(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """prompt + response + EOS, loss on the response and EOS, cut to the first MAX_LENGTH tokens."""
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(prompt)["input_ids"] + tok(response)["input_ids"] + [tok.eos_token_id]
    labels = [-100] * n_prompt + ids[n_prompt:]
    return ids[:MAX_LENGTH], labels[:MAX_LENGTH]


def loss_gradient(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """The gradient of the summed next-token NLL over the labelled tokens, all LoRA parameters flattened."""
    params = [p for n, p in sorted(model.named_parameters()) if "lora_" in n]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A float64 LoRA of the tiny Llama with random B matrices (PEFT starts them at 0), saved."""
    from reference import random_b_lora

    model = random_b_lora(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("keep-start") / "adapter"
    model.save_pretrained(str(folder))
    return folder


def test_a_long_query_is_cut_on_the_side_the_store_was(tiny_llama_dir, adapter, tmp_path, capsys):
    """A store made with --truncation keep_start and a query longer than its max_length: explain's query
    tokens are the first max_length ones (the prompt and the start of the response), and its gradient,
    with the training rows', is the hand-cut query's (Gram matrices within 1e-6 of the products of the norms:
    the model is float64 but Llama's RMSNorm computes in float32; keeping the end instead changes the
    query's tokens and moves its gradient by far more)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.explaining import Explainer, score_arguments

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    store = tmp_path / "store"
    code, _, err = run_cli(["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter", str(adapter),
                            "--data", str(data), "--store", str(store), "--max-length", str(MAX_LENGTH),
                            "--truncation", "keep_start", "--dtype", "float64", "--model-dtype", "float64"], capsys)
    assert code == 0, err
    before = hashes(store, adapter, data)

    explainer = Explainer(tiny_llama_dir, store=store, adapter=adapter, model_dtype="float64", device="cpu",
                          arguments=score_arguments("identity"))
    explainer.load()
    record = explainer.record(PROMPT, RESPONSE)
    query = by_hand(tok, PROMPT, RESPONSE)
    assert len(tok(PROMPT + RESPONSE)["input_ids"]) + 1 > MAX_LENGTH  # the query is cut
    assert explainer.collate.tokenize(record) == query
    blocks = explainer.attributors[0].gradients([record], desc=None)
    stored = explainer.stores[0]
    got = torch.cat([torch.cat([stored.load(n).double().reshape(len(TRAIN), -1) for n in stored.block_names], 1),
                     torch.cat([blocks[n].double().reshape(1, -1) for n in stored.block_names], 1)])

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True).eval()
    want = torch.stack([loss_gradient(model, *by_hand(tok, r["prompt"], r["response"])) for r in TRAIN]
                       + [loss_gradient(model, *query)])
    scale = want.norm(dim=1)[:, None] * want.norm(dim=1)[None, :]
    assert bool((scale > 0).all())
    error = (got @ got.T - want @ want.T).abs()
    assert bool((error <= 1e-6 * scale).all()), (error / scale).max()

    code, _, err = run_cli(["explain", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--store", str(store),
                            "--prompt", PROMPT, "--response", RESPONSE, "--method", "identity", "--model-dtype",
                            "float64"], capsys)
    assert code == 0, err
    assert f"its gradient is that of the first {MAX_LENGTH} tokens, as the training examples' were" in err
    assert without_stamps(hashes(store, adapter, data)) == without_stamps(before)
