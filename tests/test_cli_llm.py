"""The LLM practitioner's path from the command line, on a tiny random Llama with SmolLM2's real tokenizer
(and chat template): finetune -> grads -> explain / score -> top, stores that do not belong together, an
adapter loaded for inference, and the bad inputs (one `error:` line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.cli import main  # noqa: E402
from datainf.data.generation import chat_records, make_task  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.store import GradientStore  # noqa: E402
from reference import FLOAT32_TOL, FLOAT64_TOL, assert_close_to  # noqa: E402


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """A saved random 1-layer Llama over SmolLM2's vocabulary, with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from datainf.models.llm import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def flow(chat_model_dir, tmp_path_factory):
    """example-data -> finetune (causal_lm, chat) -> grads, once for the module."""
    root = tmp_path_factory.mktemp("llm-flow")
    data = root / "chat.jsonl"
    records = chat_records(make_task("sentences", classes=2, per_class=3, seed=0))
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "finetune", "--task", "causal_lm", "--model", str(chat_model_dir), "--train", str(data),
              "--out", str(root / "adapter"), "--epochs", "1", "--rank", "2", "--lr", "1e-2", "--device", "cpu"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter",
              str(root / "adapter"), "--data", str(data), "--store", str(root / "store"), "--chunk-size", "4",
              "--batch-size", "2", "--dtype", "float64", "--model-dtype", "float64"])
    assert e.value.code == 0
    return root, data, records


def test_finetune_writes_an_adapter_with_its_tokenizer_and_the_store_keeps_the_chat(flow):
    root, _, records = flow
    adapter = root / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    meta = json.loads((adapter / "datainf_finetune.json").read_text())
    assert meta["task"] == "causal_lm" and meta["collate"]["assistant_turns"] == "all"
    store = GradientStore.open(root / "store")
    assert store.records() == [{"messages": r["messages"]} for r in records]
    assert store.manifest["meta"]["task"] == "causal_lm"


def test_explain_prints_and_writes_the_top_examples_of_an_independent_score(flow, chat_model_dir, capsys):
    root, _, records = flow
    system, prompt, response = (records[0]["messages"][0]["content"], "the old fox finds the book",
                                "book the finds fox old the")
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                          "--store", str(root / "store"), "--system", system, "--prompt", prompt, "--response",
                          response, "--method", "datainf,identity", "--k", "3", "--json", str(root / "explain.json"),
                          "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert "most helpful" in out and "most harmful" in out and "generated" not in out
    answer = json.loads((root / "explain.json").read_text())["answers"][0]
    # independent: the query's gradient from the chat template (float64 model), scored by the library
    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    model, tok = load_causal_lm_adapter(chat_model_dir, root / "adapter", dtype=torch.float64)
    query = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt},
                          {"role": "assistant", "content": response}]}
    att = Attributor(model, task="causal_lm", store=root / "store", collate=TextCollator(tok, task="causal_lm"),
                     progress=False)
    qgrads = att.gradients([query])
    store = GradientStore.open(root / "store")
    for method in ("datainf", "identity"):
        scores = datainf.influence(store.blocks(), qgrads, method)[:, 0]
        rows = [r for r in answer["rows"] if r["method"] == method]
        helpful = [r["train_index"] for r in rows if r["kind"] == "helpful"]
        assert helpful == torch.argsort(scores)[:3].tolist()
        for r in rows:
            assert r["score"] == pytest.approx(float(scores[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
            assert r["train_response"] == records[r["train_index"]]["messages"][-1]["content"]
            assert r["train_prompt"] in out or len(r["train_prompt"]) > 40


def test_explain_a_conversations_last_turn(flow, chat_model_dir, tmp_path, capsys):
    """--conversation: the last assistant turn of a multi-turn chat, the earlier turns as its context, scored
    as the query's gradient of that turn alone (an independent Attributor pass, float64)."""
    from transformers import AutoTokenizer

    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    root, _, records = flow
    conversation = records[0]["messages"] + [{"role": "user", "content": "the old fox finds the book"},
                                             {"role": "assistant", "content": "book the finds fox old the"}]
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"messages": conversation}))
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                          "--store", str(root / "store"), "--conversation", str(path), "--method", "identity",
                          "--k", "2", "--json", str(tmp_path / "e.json"), "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert "(after 3 earlier turns)" in out and "generated" not in out
    tok = AutoTokenizer.from_pretrained(str(root / "adapter"))
    model, _ = load_causal_lm_adapter(chat_model_dir, root / "adapter", dtype=torch.float64)
    last_turn = TextCollator(tok, task="causal_lm", assistant_turns="last")
    query = Attributor(model, task="causal_lm", collate=last_turn, progress=False).gradients(
        [{"messages": conversation}])
    scores = datainf.influence(GradientStore.open(root / "store").blocks(), query, "identity")[:, 0]
    answer = json.loads((tmp_path / "e.json").read_text())["answers"][0]
    assert answer["conversation"] == conversation[:-1] and answer["response"] == conversation[-1]["content"]
    assert [r["train_index"] for r in answer["rows"] if r["kind"] == "harmful"] == [  # positive scores only
        i for i in torch.argsort(scores, descending=True).tolist() if scores[i] > 0][:2]
    for r in answer["rows"]:
        assert r["score"] == pytest.approx(float(scores[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
    # ending on the user's turn: the model answers it
    path.write_text(json.dumps(conversation[:-1]))
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                          "--store", str(root / "store"), "--conversation", str(path), "--k", "1",
                          "--max-new-tokens", "3", "--model-dtype", "float64"], capsys)
    assert code == 0 and "generated by the model" in out, err


def test_explain_sums_over_checkpoints_weighted_by_their_learning_rate(flow, chat_model_dir, tmp_path, capsys):
    """finetune --checkpoints 2 saves the adapter half-way (OUT/checkpoint-STEP) with the learning rate it was
    saved at; explain with both (adapter, store) pairs gives sum_c lr_c * score_c, checked against each
    checkpoint loaded from its own folder into a fresh model (no weight swapping), float64."""
    from transformers import AutoTokenizer

    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    root, data, records = flow
    out = tmp_path / "adapter"
    code, text, err = run(["finetune", "--task", "causal_lm", "--model", str(chat_model_dir), "--train", str(data),
                           "--out", str(out), "--epochs", "2", "--batch-size", "3", "--rank", "2", "--lr", "1e-2",
                           "--checkpoints", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    # 6 examples, batch 3, 2 epochs: 4 steps; checkpoints at steps 2 and 4 (the final adapter, OUT itself)
    adapters = [out, out / "checkpoint-2"]
    saved = [json.loads((a / "datainf_checkpoint.json").read_text()) for a in adapters]
    assert [x["step"] for x in saved] == [4, 2] and "a run of 3 checkpoints: steps 0, 2 in" in text
    # warm-up round(0.06 * 4) = 0 steps, then linear decay: step t used lr * (4 - (t - 1)) / 4; a checkpoint
    # weighs the mean rate of the steps from it to the next (steps 3 and 4), the final its own step's
    assert [x["learning_rate"] for x in saved] == pytest.approx([1e-2 * 1 / 4, 1e-2 * (2 / 4 + 1 / 4) / 2])
    stores = []
    for i, adapter in enumerate(adapters):
        stores.append(tmp_path / f"store{i}")
        code, _, err = run(["grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter", str(adapter),
                            "--data", str(data), "--store", str(stores[-1]), "--dtype", "float64", "--model-dtype",
                            "float64"], capsys)
        assert code == 0, err
    prompt, response = "the old fox finds the book", "book the finds fox old the"
    base = ["explain", "--model", str(chat_model_dir), "--prompt", prompt, "--response", response, "--method",
            "identity", "--k", "3", "--json", str(tmp_path / "e.json"), "--model-dtype", "float64"]
    argv = base + [x for a, d in zip(adapters, stores) for x in ("--adapter", str(a), "--store", str(d))]
    code, text, err = run(argv, capsys)
    assert code == 0, err
    assert "scores summed over 2 checkpoints, weighted by lr" in text
    want = 0
    for adapter, store, meta in zip(adapters, stores, saved):
        model, _ = load_causal_lm_adapter(chat_model_dir, adapter, dtype=torch.float64)
        tok = AutoTokenizer.from_pretrained(str(adapter))
        query = Attributor(model, task="causal_lm", collate=TextCollator(tok, task="causal_lm"), progress=False
                           ).gradients([{"messages": [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": response}]}])
        want = want + meta["learning_rate"] * datainf.influence(GradientStore.open(store).blocks(), query,
                                                                "identity")[:, 0]
    answer = json.loads((tmp_path / "e.json").read_text())
    assert [c["weight"] for c in answer["checkpoints"]] == pytest.approx([x["learning_rate"] for x in saved])
    rows = answer["answers"][0]["rows"]
    assert [r["train_index"] for r in rows if r["kind"] == "helpful"] == [  # negative scores only
        i for i in torch.argsort(want).tolist() if want[i] < 0][:3]
    for r in rows:
        assert r["score"] == pytest.approx(float(want[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
    # a store paired with the wrong checkpoint is refused
    code, _, err = run(base + ["--adapter", str(adapters[0]), "--store", str(stores[1]), "--adapter", str(adapters[1]),
                               "--store", str(stores[0])], capsys)
    assert code == 2 and "was made with a different adapter" in err, err


def test_learning_rate_of_a_trainer_checkpoint(tmp_path):
    """trainer_state.json of a Trainer / TRL checkpoint-N folder: the last learning rate logged at or before
    its global_step (entries without one, such as the final train summary, skipped)."""
    from datainf.models.checkpoints import learning_rate

    state = {"global_step": 30, "log_history": [
        {"step": 10, "loss": 2.0, "learning_rate": 9e-4}, {"step": 20, "loss": 1.5, "learning_rate": 6e-4},
        {"step": 30, "eval_loss": 1.4}, {"step": 40, "learning_rate": 1e-4}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert learning_rate(tmp_path) == 6e-4
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    assert learning_rate(tmp_path) is None
    assert learning_rate(tmp_path / "missing") is None


def test_explain_generates_a_response_when_none_is_given(flow, chat_model_dir, capsys):
    root, *_ = flow
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                          "--store", str(root / "store"), "--prompt", "the old fox finds the book", "--k", "2",
                          "--max-new-tokens", "4", "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert "generated by the model" in out


def test_score_refuses_a_query_store_of_another_adapter_unless_asked(flow, chat_model_dir, tmp_path, capsys):
    root, data, _ = flow
    other = tmp_path / "adapter2"
    assert run(["finetune", "--task", "causal_lm", "--model", str(chat_model_dir), "--train", str(data), "--out",
                str(other), "--epochs", "1", "--rank", "2", "--lr", "5e-2", "--seed", "3", "--device", "cpu"],
               capsys)[0] == 0
    assert run(["grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter", str(other), "--data",
                str(data), "--store", str(tmp_path / "q"), "--model-dtype", "float64", "--dtype", "float64"],
               capsys)[0] == 0
    out = tmp_path / "s.safetensors"
    code, _, err = run(["score", "--store", str(root / "store"), "--queries", str(tmp_path / "q"), "--out", str(out)],
                       capsys)
    assert code == 2 and err.startswith("error:") and "different adapter" in err and err.count("\n") == 1
    assert not out.exists()
    code, _, err = run(["score", "--store", str(root / "store"), "--queries", str(tmp_path / "q"), "--out", str(out),
                        "--allow-mismatch"], capsys)
    assert code == 0 and "warning: scored across stores" in err
    assert "adapter" in load_scores(out).settings["ekfac"]["diagnostics"]["mismatch"][0]  # the causal-LM default


def test_score_and_explain_without_method_use_the_measured_default_of_the_stores_kind(flow, chat_model_dir, tmp_path,
                                                                                      capsys):
    """No --method: a causal LM store is scored with EK-FAC (estimators.defaults, docs/results.md), the same
    scores as asking for it; `explain` says which method answered and what it measured; an --option is
    checked against the default method."""
    root, _, records = flow
    default, chosen = tmp_path / "default.safetensors", tmp_path / "ekfac.safetensors"
    code, out, err = run(["score", "--store", str(root / "store"), "--queries", str(root / "store"), "--out",
                          str(default)], capsys)
    assert code == 0, err
    assert "method: ekfac (the default for causal_lm stores" in out
    assert run(["score", "--store", str(root / "store"), "--queries", str(root / "store"), "--out", str(chosen),
                "--method", "ekfac"], capsys)[0] == 0
    got, want = load_scores(default), load_scores(chosen)
    assert set(got.scores) == {"ekfac"} and torch.equal(got.scores["ekfac"], want.scores["ekfac"])
    code, _, err = run(["score", "--store", str(root / "store"), "--queries", str(root / "store"), "--out",
                        str(tmp_path / "x.safetensors"), "--option", "iterations=5"], capsys)
    assert code == 2 and err.startswith("error: --option iterations=5") and "ekfac" in err
    assert not (tmp_path / "x.safetensors").exists()
    prompt, response = "the old fox finds the book", "book the finds fox old the"
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"), "--store",
                          str(root / "store"), "--system", records[0]["messages"][0]["content"], "--prompt", prompt,
                          "--response", response, "--k", "2", "--model-dtype", "float64"], capsys)
    assert code == 0, err
    assert "method: ekfac (the default" in out and "LDS" in out and "--run" in out
    assert "ekfac: the 2 most helpful" in out


def test_top_writes_csv_and_jsonl_rows_with_the_training_texts(flow, tmp_path, capsys):
    root, _, records = flow
    scores = tmp_path / "self.safetensors"
    assert run(["score", "--store", str(root / "store"), "--self", "--method", "identity,datainf", "--out",
                str(scores)], capsys)[0] == 0
    code, out, err = run(["top", "--scores", str(scores), "--k", "2", "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    loaded = load_scores(scores)
    signed = [min(2, int((s < 0).sum())) + min(2, int((s > 0).sum())) for s in loaded.scores.values()]
    assert len(rows) == sum(signed)  # per method: up to k helpful (score < 0) and up to k harmful (> 0)
    for r in rows:
        value = loaded.scores[r["method"]][int(r["train_index"])]
        assert float(r["score"]) == pytest.approx(float(value), rel=1e-12)
        assert r["train_response"] == records[int(r["train_index"])]["messages"][-1]["content"]
    identity = loaded.scores["identity"]
    helpful = [int(r["train_index"]) for r in rows if r["method"] == "identity" and r["kind"] == "helpful"]
    assert helpful == [i for i in torch.argsort(identity).tolist() if identity[i] < 0][:2]
    code, out, _ = run(["top", "--scores", str(scores), "--k", "1", "--method", "datainf", "--format", "jsonl",
                        "--out", str(tmp_path / "top.jsonl")], capsys)
    lines = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    datainf_scores = loaded.scores["datainf"]
    assert code == 0 and [r["kind"] for r in lines] == [kind for kind, n in (
        ("helpful", (datainf_scores < 0).sum()), ("harmful", (datainf_scores > 0).sum())) if n]


def _trl_prompt_completion(tok, prompt: list[dict], completion: list[dict]) -> dict:
    """A pre-tokenized record by TRL's rule for a conversational prompt-completion row, computed here on the
    token ids: the prompt with its generation prompt, then the conversation's remaining tokens carry loss."""
    def ids(encoded):
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    prompt_ids = ids(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
    full_ids = ids(tok.apply_chat_template(prompt + completion, tokenize=True))
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return {"input_ids": full_ids, "labels": [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]}


def test_trls_conversational_prompt_completion_rows_go_through_grads_and_explain(flow, chat_model_dir, tmp_path,
                                                                                capsys):
    """A JSONL of {"prompt": [turns], "completion": [turns]} rows (TRL's conversational prompt-completion):
    the store's gradients and explain's query gradient equal those of records tokenized here by TRL's rule."""
    from transformers import AutoTokenizer

    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    root, _, records = flow
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(["grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter",
                        str(root / "adapter"), "--data", str(data), "--store", str(tmp_path / "store"),
                        "--batch-size", "2", "--dtype", "float64", "--model-dtype", "float64"], capsys)
    assert code == 0, err
    store = GradientStore.open(tmp_path / "store")
    assert store.records() == [{"prompt": r["prompt"], "response": r["completion"]} for r in rows]
    tok = AutoTokenizer.from_pretrained(str(root / "adapter"))
    model, _ = load_causal_lm_adapter(chat_model_dir, root / "adapter", dtype=torch.float64)
    reference = [_trl_prompt_completion(tok, r["prompt"], r["completion"]) for r in rows]
    att = Attributor(model, task="causal_lm", collate=TextCollator(tok, task="causal_lm"), progress=False)
    want = att.gradients(reference)
    got = store.blocks()
    for name in want:
        assert_close_to(got[name][:], want[name].reshape(len(rows), -1), tol=FLOAT64_TOL, what=name)

    system, prompt, response = rows[0]["prompt"][0]["content"], "the old fox finds the book", "book the finds"
    code, out, err = run(["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
                          "--store", str(tmp_path / "store"), "--system", system, "--prompt", prompt, "--response",
                          response, "--method", "identity", "--k", "2", "--json", str(tmp_path / "e.json"),
                          "--model-dtype", "float64"], capsys)
    assert code == 0, err
    query = _trl_prompt_completion(tok, [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                   [{"role": "assistant", "content": response}])
    scores = datainf.influence(got, att.gradients([query]), "identity")[:, 0]
    answer = json.loads((tmp_path / "e.json").read_text())["answers"][0]
    assert [r["train_index"] for r in answer["rows"] if r["kind"] == "helpful"] == torch.argsort(scores)[:2].tolist()
    for r in answer["rows"]:
        assert r["score"] == pytest.approx(float(scores[r["train_index"]]), rel=FLOAT64_TOL, abs=1e-300)
        assert r["train_response"] == rows[r["train_index"]]["completion"][-1]["content"]


def test_grads_warns_when_its_loss_tokens_are_not_the_fine_tunes(flow, chat_model_dir, tmp_path, capsys):
    """The adapter was fine-tuned by `datainf finetune` with the defaults (every assistant turn): gradients of
    the last turn only, or of every token, are not of its training loss, and grads says so."""
    root, data, _ = flow
    base = ["grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"),
            "--data", str(data)]
    code, _, err = run(base + ["--store", str(tmp_path / "same")], capsys)
    assert code == 0 and "warning" not in err, err
    for option, value, expected in (("--assistant-turns", "last", "assistant_turns: 'all' in training, 'last' here"),
                                    ("--loss-tokens", "all", "loss_tokens: 'assistant' in training, 'all' here")):
        code, _, err = run(base + ["--store", str(tmp_path / value), option, value], capsys)
        assert code == 0 and "warning:" in err and expected in err, err
    store = GradientStore.open(tmp_path / "all")
    assert store.manifest["meta"]["collate"]["loss_tokens"] == "all"
    # every token: TRL's labels = input_ids of the chat template's rendering, computed here
    from transformers import AutoTokenizer

    from datainf.attributor import Attributor
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    tok = AutoTokenizer.from_pretrained(str(root / "adapter"))
    model, _ = load_causal_lm_adapter(chat_model_dir, root / "adapter", dtype=torch.float32)
    rendered = [list(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                for r in flow[2]]
    want = Attributor(model, task="causal_lm", collate=TextCollator(tok, task="causal_lm"), progress=False).gradients(
        [{"input_ids": ids, "labels": ids} for ids in rendered])
    for name, block in store.blocks().items():
        assert_close_to(block[:], want[name].reshape(len(rendered), -1), tol=FLOAT32_TOL, what=name)


def test_grads_reports_the_examples_cut_to_max_length(flow, chat_model_dir, tmp_path, capsys, caplog):
    """Conversations longer than --max-length are cut (from the left): grads says how many and which, counted
    here with the chat template's own tokenization, before it computes, and the manifest keeps them."""
    from transformers import AutoTokenizer

    root, data, records = flow
    tok = AutoTokenizer.from_pretrained(str(root / "adapter"))
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in records]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the conversations are longer
    longer = [i for i, n in enumerate(lengths) if n > limit]
    assert 0 < len(longer) < len(records)
    code, out, err = run(["grads", "--task", "causal_lm", "--model", str(chat_model_dir), "--adapter",
                          str(root / "adapter"), "--data", str(data), "--store", str(tmp_path / "s"),
                          "--max-length", str(limit)], capsys)
    assert code == 0, err
    assert f"warning: {len(longer)} of {len(records)} examples are longer than max_length={limit}" in caplog.text
    assert f"max_length: 128 in training, {limit} here" in err  # not the fine-tune's either
    assert f"{len(longer)} examples cut to --max-length {limit} (the longest {max(lengths)} tokens)" in out
    cut = GradientStore.open(tmp_path / "s").manifest["meta"]["truncated"]
    assert cut["rows"] == longer and cut["longest"] == max(lengths)


def test_an_adapter_loaded_for_inference_is_attributed_and_left_frozen(flow, chat_model_dir):
    """PeftModel.from_pretrained(base, folder) without is_trainable: every parameter is frozen, the usual way
    to load an adapter. Its LoRA gradients are those of the same adapter loaded trainable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.data.collate import TextCollator

    root, _, records = flow
    tok = AutoTokenizer.from_pretrained(str(root / "adapter"))
    frozen = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float64),
                                       str(root / "adapter"))
    assert not any(p.requires_grad for p in frozen.parameters())
    batch = TextCollator(tok, task="causal_lm")(records[:3])
    got = datainf.per_example_gradients(frozen, batch, "causal_lm")
    assert not any(p.requires_grad for p in frozen.parameters())  # restored
    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(chat_model_dir),
                                                                               dtype=torch.float64),
                                          str(root / "adapter"), is_trainable=True)
    want = datainf.per_example_gradients(trainable, batch, "causal_lm")
    assert list(got) == list(want) and all("lora_" in n for n in got)
    for name in want:
        assert_close_to(got[name], want[name], what=name)
    from datainf.store import fingerprint_model

    assert fingerprint_model(frozen) == fingerprint_model(trainable)  # the same adapter, the same fingerprint


@pytest.mark.parametrize("case", ["no_chat_template", "bad_messages", "bad_completion_turns", "no_columns",
                                  "split_on_a_file", "explain_on_a_classification_store", "conversation_and_prompt",
                                  "conversation_without_turns"])
def test_bad_llm_input_is_one_line_and_exit_2(case, flow, chat_model_dir, tiny_llama_dir, tmp_path, capsys):
    root, data, _ = flow
    bad = tmp_path / "bad.jsonl"
    store = tmp_path / "s"
    grads = ["grads", "--task", "causal_lm", "--adapter", str(root / "adapter"), "--store", str(store)]
    if case == "no_chat_template":  # a model whose tokenizer has no chat template, given chat records
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                                    LoraConfig(r=2, target_modules=["q_proj"]))
        peft_model.save_pretrained(str(tmp_path / "plain-adapter"))
        argv = ["grads", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--adapter",
                str(tmp_path / "plain-adapter"), "--data", str(data), "--store", str(store)]
        expected = "no chat template"
    elif case == "bad_messages":
        bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
        argv, expected = grads + ["--model", str(chat_model_dir), "--data", str(bad)], "row 0, column 'messages'"
    elif case == "bad_completion_turns":  # a conversational prompt with a completion turn lacking its content
        bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant"}]})
                       + "\n")
        argv, expected = grads + ["--model", str(chat_model_dir), "--data", str(bad)], "row 0, column 'completion'"
    elif case == "no_columns":
        bad.write_text(json.dumps({"question": "hi", "answer": "yo"}) + "\n")
        argv, expected = grads + ["--model", str(chat_model_dir), "--data", str(bad)], "--prompt-column"
    elif case == "split_on_a_file":
        argv, expected = grads + ["--model", str(chat_model_dir), "--data", str(data), "--split", "train"], "--split"
    elif case.startswith("conversation"):
        bad.write_text(json.dumps([{"role": "user", "content": "hi"}] if case == "conversation_and_prompt"
                                  else [{"role": "user", "content": "hi"}, {"role": "assistant"}]))
        argv = ["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"), "--store",
                str(root / "store"), "--conversation", str(bad)]
        if case == "conversation_and_prompt":
            argv, expected = argv + ["--prompt", "hi"], "leave out --prompt"
        else:
            expected = "turn 1 needs a 'role' and a 'content' string"
    else:
        argv = ["explain", "--model", str(chat_model_dir), "--adapter", str(root / "adapter"), "--store",
                str(tmp_path / "cls-store"), "--prompt", "hi"]
        with GradientStore.create(tmp_path / "cls-store", blocks={"w": (2,)}, n_examples=1, fingerprints={},
                                  meta={"task": "classification"}) as cls_store:
            cls_store.write_chunk(0, {"w": torch.ones(1, 2)})
            cls_store.finalize()
        expected = "explain answers for causal LM stores"
    before = tree(tmp_path)
    code, _, err = run(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert tree(tmp_path) == before
