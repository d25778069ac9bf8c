"""Batch `explain` and `datainf.explain(...)` (issue 31 item 3, issue 30's library explain).

Many queries at once, with or without responses (a missing one is the model's own, generated), against one
(adapter, store) pair or a whole run (`finetune --checkpoints`, `grads --run`). Every score is checked
against an independent computation: per-example gradients from single-example backward calls on a float64
model loaded afresh from each saved adapter, scored by the method's dense float64 formula (identity:
-G V^T; DataInf: -G mean_i (g_i g_i^T + lambda I)^-1 V^T, solved densely, the paper's lambda) and summed
over checkpoints with the learning rates their own datainf_checkpoint.json files give. A method's fitted
state is fitted once per store and read back from the store's cache afterwards (counted, mtime and sha256
unchanged). Bad query files: one `error:` line naming the file and row, exit 2, before the model is loaded,
nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import datainf  # noqa: E402
from cli_helpers import hashes, refused, write_jsonl  # noqa: E402
from cli_helpers import run_cli as run  # noqa: E402
from datainf.data.generation import chat_records, make_task  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from reference import FLOAT64_TOL, assert_close_to  # noqa: E402

PROMPT, RESPONSE = "the old fox finds the book", "book the finds fox old the"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 1-layer Llama over SmolLM2's vocabulary with its chat template; `finetune --checkpoints 1` on
    6 chat examples (checkpoint-0 and the final adapter at step 2), `grads --run` of them (float64)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from datainf.cli import main
    from datainf.models.llm import smollm2_tokenizer_dir

    root = tmp_path_factory.mktemp("explain-batch")
    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = root / "model"
    LlamaForCausalLM(config).save_pretrained(str(model))
    tok.save_pretrained(str(model))
    records = chat_records(make_task("sentences", classes=2, per_class=3, seed=0))
    data = write_jsonl(root / "chat.jsonl", records)

    def cli(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as e:
            main(["--quiet", *argv])
        assert e.value.code == 0, argv

    out = root / "run"
    cli(["finetune", "--task", "causal_lm", "--model", str(model), "--train", str(data), "--out", str(out),
         "--epochs", "1", "--batch-size", "3", "--rank", "2", "--lr", "5e-2", "--checkpoints", "1", "--device", "cpu"])
    cli(["grads", "--task", "causal_lm", "--model", str(model), "--run", str(out), "--data", str(data), "--store",
         str(root / "stores"), "--dtype", "float64", "--model-dtype", "float64", "--chunk-size", "4"])
    checkpoints = {"checkpoint-0": out / "checkpoint-0", "checkpoint-2": out}
    assert sorted(p.name for p in (root / "stores").iterdir() if p.is_dir()) == sorted(checkpoints)
    return {"root": root, "model": model, "run": out, "stores": root / "stores", "records": records,
            "checkpoints": checkpoints}


# ------------------------------------------------------------------------------------------- the reference


def backward_gradients(model_dir: Path, adapter: Path, records: list[dict], *, last_turn: bool
                       ) -> dict[str, torch.Tensor]:
    """{parameter name: (n, d)}: one loss.backward() per record on a float64 model loaded afresh from
    ``adapter``, the loss written out (summed next-token NLL of the tokens the collator marks), no datainf
    gradient code. ``last_turn``: the loss on the last assistant turn only (a query), else on every one
    (the training examples, as `grads` takes them)."""
    from datainf.data.collate import TextCollator
    from datainf.models.llm import load_causal_lm_adapter

    model, tok = load_causal_lm_adapter(model_dir, adapter, dtype=torch.float64)
    collate = TextCollator(tok, task="causal_lm", assistant_turns="last" if last_turn else "all")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for record in records:
        ids, labels = collate.tokenize(record)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            rows[n].append(p.grad.detach().flatten().clone() if p.grad is not None else torch.zeros(p.numel()))
    return {n: torch.stack(r).double() for n, r in rows.items()}


def dense_scores(method: str, train: dict[str, torch.Tensor], queries: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n_train, n_query) scores by the method's dense float64 formula, summed over blocks; a block whose
    training gradients are all zero (LoRA's A blocks at step 0) adds nothing."""
    total = 0
    for name, G in train.items():
        V = queries[name]
        n, d = G.shape
        if float(G.abs().max()) == 0:
            continue
        if method == "identity":
            total = total - G @ V.T
        elif method == "datainf":
            lam = 0.1 * float((G * G).sum()) / (n * d)  # the paper's damping
            eye = torch.eye(d, dtype=torch.float64)
            inverse = sum(torch.linalg.inv(torch.outer(G[i], G[i]) + lam * eye) for i in range(n)) / n
            total = total - G @ inverse @ V.T
        else:
            raise AssertionError(method)
    return total


def chat_query(q, response: str) -> dict:
    turns = list(q.context) if q.context is not None else (
        ([{"role": "system", "content": q.system}] if q.system else []) + [{"role": "user", "content": q.prompt}])
    return {"messages": [*turns, {"role": "assistant", "content": response}]}


def reference(setup, queries: list, responses: list[str], method: str, checkpoints: list[str]) -> torch.Tensor:
    """sum over ``checkpoints`` of (its learning rate, from its own datainf_checkpoint.json, when several) x
    the dense scores of the training examples' and the queries' backward gradients at that checkpoint."""
    total = 0
    for name in checkpoints:
        adapter = setup["checkpoints"][name]
        weight = json.loads((adapter / "datainf_checkpoint.json").read_text())["learning_rate"] if len(
            checkpoints) > 1 else 1.0
        train = backward_gradients(setup["model"], adapter, setup["records"], last_turn=False)
        query = backward_gradients(setup["model"], adapter, [chat_query(q, r) for q, r in zip(queries, responses)],
                                   last_turn=True)
        total = total + weight * dense_scores(method, train, query)
    return total


def greedy(setup, adapter: Path, turns: list[dict], tokens: int) -> str:
    """The model's greedy reply to ``turns`` (transformers' generate on a fresh model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(setup["model"]),
                                                                           dtype=torch.float64), str(adapter)).eval()
    ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def check_rows(rows: list[dict], method: str, want: torch.Tensor, k: int) -> None:
    """Each list holds the k most extreme examples of its sign, in order, with the reference's scores."""
    mine = [r for r in rows if r["method"] == method]
    helpful = [i for i in torch.argsort(want).tolist() if want[i] < 0][:k]
    harmful = [i for i in torch.argsort(want, descending=True).tolist() if want[i] > 0][:k]
    assert [r["train_index"] for r in mine if r["kind"] == "helpful"] == helpful
    assert [r["train_index"] for r in mine if r["kind"] == "harmful"] == harmful
    scale = float(want.abs().max())
    for r in mine:
        assert abs(r["score"] - float(want[r["train_index"]])) <= 1e-8 * scale, (r, float(want[r["train_index"]]))


# ------------------------------------------------------------------------------------------- the library


def test_library_explain_answers_many_queries_against_backward_gradients(setup):
    """datainf.explain with four queries (a system turn, a conversation's last turn, a generated reply) at
    one (adapter, store) pair: every answer's scores for every training example equal the dense float64
    reference of single-example backward gradients; the generated reply is the model's greedy one."""
    from datainf.explaining import Explanation, Query, conversation_query

    records = setup["records"]
    conversation = records[1]["messages"] + [{"role": "user", "content": PROMPT},
                                             {"role": "assistant", "content": RESPONSE}]
    queries = [Query(PROMPT, RESPONSE), Query("a cat sat", "sat cat a", system=records[0]["messages"][0]["content"]),
               conversation_query(conversation, "the conversation"), Query("the lake is blue")]
    got = datainf.explain(queries, model=setup["model"], adapter=setup["run"],
                          store=setup["stores"] / "checkpoint-2", methods=["datainf", "identity"], k=2,
                          max_new_tokens=3, model_dtype="float64")
    assert isinstance(got, Explanation) and len(got.answers) == 4
    assert got.methods == ["datainf", "identity"] and got.arguments["datainf"].method == "datainf"
    assert [a.generated for a in got.answers] == [False, False, False, True]
    assert [a.prompt for a in got.answers] == [PROMPT, "a cat sat", PROMPT, "the lake is blue"]
    assert got.answers[2].response == RESPONSE and got.answers[2].conversation == conversation[:-1]
    generated = got.answers[3].response
    assert generated == greedy(setup, setup["run"], [{"role": "user", "content": "the lake is blue"}], 3)
    responses = [a.response for a in got.answers]
    for method in ("datainf", "identity"):
        want = reference(setup, queries, responses, method, ["checkpoint-2"])
        for j, answer in enumerate(got.answers):
            assert_close_to(answer.scores[method], want[:, j], tol=1e-8 if method == "datainf" else FLOAT64_TOL,
                            what=f"{method}, query {j}")
            check_rows(answer.rows, method, want[:, j], 2)


# ------------------------------------------------------------------------------------------- the command


def test_the_explainer_takes_each_methods_arguments_one_way(setup):
    """Explainer has one way in for how each method scores: one ScoreArguments per method (the CLI's scoring
    flags, or score_arguments from names and remedies, which datainf.explain uses); the old methods= and
    remedies= keywords are gone, and a method given twice or something not a ScoreArguments is refused
    before the model loads."""
    from datainf.estimators import ScoreArguments
    from datainf.explaining import Explainer, score_arguments

    where = {"store": setup["stores"] / "checkpoint-2", "adapter": setup["run"]}
    made = score_arguments("datainf, identity", {"damping_scale": 0.5, "remove_top": 1})
    assert made == [ScoreArguments("datainf", damping_scale=0.5, remove_top=1),
                    ScoreArguments("identity", damping_scale=0.5, remove_top=1)]
    explainer = Explainer(setup["model"], **where, arguments=made)
    assert explainer.arguments == {a.method: a for a in made}
    assert Explainer(setup["model"], **where).arguments == {"ekfac": ScoreArguments("ekfac")}  # the causal-LM default
    for old in ({"methods": ["identity"]}, {"remedies": {"remove_top": 1}}):
        with pytest.raises(TypeError):
            Explainer(setup["model"], **where, **old)
    for bad, words in (([ScoreArguments("identity"), ScoreArguments("identity", damping=0.1)], "given twice"),
                       (["identity"], "ScoreArguments"), ([], "no method given")):
        with pytest.raises(DataInfError, match=words):
            Explainer(setup["model"], **where, arguments=bad)
    with pytest.raises(DataInfError, match="unknown method 'nope'"):
        score_arguments(["nope"])


def test_explain_queries_file_over_a_run_writes_json_and_csv(setup, tmp_path, capsys):
    """`explain --run RUN --store STORES --queries FILE --json --csv`: a JSONL file with and without
    responses (chat rows: one ends on the user's turn); each answer equals sum_c lr_c x the dense scores of
    the backward gradients at checkpoint c; JSON {"answers": [{"prompt", "response", "rows"}]}, CSV one row
    per query x example shown, a table per query on the terminal."""
    records = setup["records"]
    system = records[0]["messages"][0]["content"]
    rows = [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]},
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "a cat sat"}]},
            {"messages": records[4]["messages"]}]
    queries_file = write_jsonl(tmp_path / "queries.jsonl", rows)
    out_json, out_csv = tmp_path / "answers.json", tmp_path / "answers.csv"
    code, text, err = run(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store",
                           str(setup["stores"]), "--queries", str(queries_file), "--method", "identity,datainf",
                           "--k", "2", "--max-new-tokens", "3", "--model-dtype", "float64", "--json", str(out_json),
                           "--csv", str(out_csv)], capsys)
    assert code == 0, err
    assert "scores summed over 2 checkpoints" in text and text.count("response: ") == 3
    assert text.count("identity: the ") == 6 and text.count("datainf: the ") == 6  # 2 lists x 3 queries
    document = json.loads(out_json.read_text())
    answers = document["answers"]
    assert document["format"] == "datainf-explain" and document["run"] == str(setup["run"])
    assert [(a["prompt"], a["generated"]) for a in answers] == [
        (PROMPT, False), ("a cat sat", True), (records[4]["messages"][1]["content"], False)]
    assert answers[0]["response"] == RESPONSE and answers[2]["response"] == records[4]["messages"][2]["content"]
    final_turns = [{"role": "system", "content": system}, {"role": "user", "content": "a cat sat"}]
    assert answers[1]["response"] == greedy(setup, setup["run"], final_turns, 3)  # the final adapter answers
    from datainf.explaining import read_queries

    queries = read_queries(queries_file)
    responses = [a["response"] for a in answers]
    for method in ("identity", "datainf"):
        want = reference(setup, queries, responses, method, ["checkpoint-0", "checkpoint-2"])
        for j, answer in enumerate(answers):
            check_rows(answer["rows"], method, want[:, j], 2)
    table = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(table) == sum(len(a["rows"]) for a in answers) > 0
    assert set(table[0]) >= {"query_index", "prompt", "response", "method", "kind", "rank", "train_index", "score"}
    for line in table:
        j = int(line["query_index"])
        match = [r for r in answers[j]["rows"] if (r["method"], r["kind"], r["rank"]) == (
            line["method"], line["kind"], int(line["rank"]))]
        assert len(match) == 1 and int(line["train_index"]) == match[0]["train_index"]
        assert float(line["score"]) == match[0]["score"] and line["prompt"] == answers[j]["prompt"]
    # a second run replaces its own two files; a CSV it did not write is refused
    code, _, err = run(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store",
                        str(setup["stores"]), "--queries", str(queries_file), "--method", "identity", "--k", "1",
                        "--max-new-tokens", "3", "--model-dtype", "float64", "--json", str(out_json), "--csv",
                        str(out_csv)], capsys)
    assert code == 0, err
    other = tmp_path / "mine.csv"
    other.write_text("a,b\n1,2\n")
    refused(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store", str(setup["stores"]),
             "--queries", str(queries_file), "--csv", str(other)], capsys, "--csv", str(other), "--overwrite")
    assert other.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("method", ["datainf", "ekfac"])
def test_the_fitted_state_comes_from_the_stores_cache(method, setup, tmp_path, capsys, monkeypatch):
    """Three queries explained twice over a run of two checkpoints: the first call fits the method's state
    (DataInf's matrices, EK-FAC's curvature) once per store (2 fits, not one per query), the second fits
    nothing, and the cache files keep their bytes and mtimes."""
    from datainf.estimators import get_method

    stores = shutil.copytree(setup["stores"], tmp_path / "stores")
    cls = get_method(method)
    for cache in stores.rglob(cls.state_file):
        cache.unlink()
    fits = []
    original = cls.fit

    def counting(blocks, arguments):
        fits.append(arguments.method)
        return original(blocks, arguments)

    monkeypatch.setattr(cls, "fit", staticmethod(counting))
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPT, "response": RESPONSE},
                                                 {"prompt": "a cat sat", "response": "sat cat a"},
                                                 {"prompt": "the lake", "response": "lake the"}])
    argv = ["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store", str(stores),
            "--queries", str(queries), "--method", method, "--k", "1", "--model-dtype", "float64"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert fits == [method, method]
    caches = sorted(stores.rglob(cls.state_file))
    assert [c.parent.name for c in caches] == ["checkpoint-0", "checkpoint-2"]
    before = {c: (c.stat().st_mtime_ns, hashes(c)) for c in caches}
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert fits == [method, method]  # nothing refitted
    assert {c: (c.stat().st_mtime_ns, hashes(c)) for c in caches} == before


# ------------------------------------------------------------------------------------------- query files


def test_query_files_read_alike_in_every_format(tmp_path):
    """The same prompt/response queries from JSONL, a JSON array and CSV (an empty cell: no response) read as
    the same Query objects; a text column is a prompt to answer."""
    from datainf.explaining import read_queries

    rows = [{"prompt": PROMPT, "response": RESPONSE, "system": "be brief"}, {"prompt": "a, \"quoted\"\nline"}]
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    array = tmp_path / "q.json"
    array.write_text(json.dumps(rows))
    table = tmp_path / "q.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "response", "system"])
    writer.writeheader()
    writer.writerows(rows)
    table.write_text(buffer.getvalue())
    want = [(PROMPT, RESPONSE, "be brief", None), ("a, \"quoted\"\nline", None, None, None)]
    for path in (jsonl, array, table):
        assert [(q.prompt, q.response, q.system, q.context) for q in read_queries(path)] == want, path
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the old fox"}])
    assert [(q.prompt, q.response) for q in read_queries(text)] == [("the old fox", None)]


BAD_ROWS = {
    "prompt not text": ("q.jsonl", [{"prompt": PROMPT, "response": RESPONSE}, {"prompt": PROMPT},
                                    {"prompt": 7, "response": "x"}], ("row 2", "'prompt'")),
    "response not text": ("q.jsonl", [{"prompt": PROMPT, "response": ["not", "turns"]}], ("row 0", "'response'")),
    "turn without content": ("q.jsonl", [{"messages": [{"role": "user", "content": PROMPT}]},
                                         {"messages": [{"role": "user"}]}], ("row 1", "'messages'", "turn 0")),
    "no user turn": ("q.jsonl", [{"messages": [{"role": "assistant", "content": RESPONSE}]}],
                     ("row 0", "no user turn")),
    "no usable column": ("q.csv", "question,answer\nwhy,because\n", ("'prompt'", "'messages'", "question")),
    "empty prompt cell": ("q.csv", "prompt,response\nhello,world\n,lonely\n", ("row 1", "'prompt'")),
    "not JSON": ("q.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": \n", ("line 2",)),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_query_file_is_one_error_line_before_the_model_loads(case, setup, tmp_path, capsys, monkeypatch):
    """One `error:` line naming the file and the row (or line, or the columns found), exit 2, no output
    written, the inputs unchanged, and the model never loaded."""
    import datainf.models.llm

    name, content, words = BAD_ROWS[case]
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the query file was checked")

    monkeypatch.setattr(datainf.models.llm, "load_causal_lm_adapter", no_load)
    before = hashes(path, setup["stores"], setup["run"])
    out_json, out_csv = tmp_path / "e.json", tmp_path / "e.csv"
    refused(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store", str(setup["stores"]),
             "--queries", str(path), "--json", str(out_json), "--csv", str(out_csv)], capsys, str(path), *words)
    assert not out_json.exists() and not out_csv.exists()
    assert hashes(path, setup["stores"], setup["run"]) == before


def test_queries_beside_a_prompt_are_refused(setup, tmp_path, capsys):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": PROMPT}])
    refused(["explain", "--model", str(setup["model"]), "--run", str(setup["run"]), "--store", str(setup["stores"]),
             "--queries", str(queries), "--prompt", PROMPT], capsys, "--queries", "--prompt")


# ------------------------------------------------------------------------------------------- issue 31's friction


def test_finetune_keeps_a_loss_log_and_names_the_loss_it_prints(tiny_llama_dir, tmp_path, capsys):
    """`finetune` keeps every optimizer step's batch loss in datainf_finetune.json (old: none) and says the
    loss it prints is the final adapter's on the training set (old: "training loss"). Step 1 runs with B = 0,
    so its loss is the base model's mean NLL per loss token over the one batch of all six examples, written
    out here with a plain forward pass (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.data.collate import TextCollator

    records = [{"prompt": r["prompt"], "response": r["response"]}
               for r in make_task("sentences", classes=2, per_class=3)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "adapter"
    code, text, err = run(["finetune", "--task", "causal_lm", "--model", str(tiny_llama_dir), "--train", str(data),
                           "--out", str(out), "--epochs", "3", "--batch-size", "6", "--rank", "2", "--device", "cpu"],
                          capsys)
    assert code == 0, err
    assert "the final adapter's loss on the training set" in text and "training loss" not in text, text
    losses = json.loads((out / "datainf_finetune.json").read_text())["losses"]
    assert len(losses) == 3  # one batch per epoch
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    collate = TextCollator(tok, task="causal_lm", max_length=128)
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids, labels = collate.tokenize(record)
            logits = base(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            targets = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    assert losses[0] == pytest.approx(total / count, rel=1e-5)
    assert f"{losses[0]:.3f} at step 1" in text and f"{losses[-1]:.3f} at step 3" in text


def test_score_mismatch_names_each_store_beside_its_fingerprint(setup, tmp_path, capsys):
    """A query store of the final adapter against checkpoint-0's training store: the message gives each
    fingerprint next to the store it belongs to (old: "fingerprint TRAIN vs QUERY" after naming the query
    store first); a query store whose loss is on every token says that the loss tokens differ (old: only
    "different task ... to compare across checkpoints")."""
    from datainf.store import GradientStore

    queries = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": PROMPT},
                                                               {"role": "assistant", "content": RESPONSE}]}])
    made = {}
    for name, extra in (("q", []), ("q-all", ["--loss-tokens", "all"])):
        made[name] = tmp_path / name
        code, _, err = run(["grads", "--task", "causal_lm", "--model", str(setup["model"]), "--adapter",
                            str(setup["run"]), "--data", str(queries), "--store", str(made[name]), "--dtype", "float64",
                            "--model-dtype", "float64", *extra], capsys)
        assert code == 0, err
    train_dir, out = setup["stores"] / "checkpoint-0", tmp_path / "s.safetensors"
    train, query = GradientStore.open(train_dir), GradientStore.open(made["q"])
    refused(["score", "--store", str(train_dir), "--queries", str(made["q"]), "--out", str(out)], capsys,
            f"fingerprint {query.fingerprints['adapter']} in {made['q']}, {train.fingerprints['adapter']} in {train_dir}")
    final = setup["stores"] / "checkpoint-2"
    refused(["score", "--store", str(final), "--queries", str(made["q-all"]), "--out", str(out)], capsys,
            "different task", "loss_tokens 'all' in the query store, 'assistant' in the training store",
            "query loss other than the training loss")
    assert not out.exists()


def test_explain_mismatch_names_the_store_and_the_adapter_beside_their_fingerprints(setup, capsys):
    """checkpoint-0's adapter with the final checkpoint's store: the store's fingerprint, then the loaded
    adapter's, each named (old: "fingerprint X vs this one's Y")."""
    from datainf.store import GradientStore

    store, adapter = setup["stores"] / "checkpoint-2", setup["checkpoints"]["checkpoint-0"]
    theirs = GradientStore.open(store).fingerprints["adapter"]
    refused(["explain", "--model", str(setup["model"]), "--adapter", str(adapter), "--store", str(store), "--prompt",
             PROMPT, "--response", RESPONSE, "--model-dtype", "float64"], capsys,
            f"store {store} was made with a different adapter (fingerprint {theirs} in the store, ",
            f" for {adapter} on {setup['model']} as float64)", "--model-dtype")


@pytest.mark.parametrize("damage", ["other rank", "no weights"])
def test_a_checkpoint_that_cannot_be_swapped_in_is_refused_before_the_model_loads(damage, setup, tmp_path, capsys,
                                                                                   monkeypatch):
    """A second (adapter, store) pair whose adapter has another LoRA rank, or no weights file, is refused
    before the model is loaded (old: after the load, when its weights were swapped in)."""
    import datainf.models.llm

    early = shutil.copytree(setup["checkpoints"]["checkpoint-0"], tmp_path / "early")
    if damage == "other rank":
        config = json.loads((early / "adapter_config.json").read_text())
        (early / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
        words = (str(early), "not a checkpoint of the same adapter", "r is 4", str(setup["run"]))
    else:
        (early / "adapter_model.safetensors").unlink()
        words = (str(early), "adapter_model.safetensors")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapters were checked")

    monkeypatch.setattr(datainf.models.llm, "load_causal_lm_adapter", no_load)
    refused(["explain", "--model", str(setup["model"]), "--adapter", str(setup["run"]), "--store",
             str(setup["stores"] / "checkpoint-2"), "--adapter", str(early), "--store",
             str(setup["stores"] / "checkpoint-0"), "--prompt", PROMPT, "--response", RESPONSE], capsys, *words)


def test_interactive_keeps_the_model_and_answers_each_typed_prompt(setup, tmp_path, capsys, monkeypatch):
    """--interactive through the same Explainer: each typed prompt answered by the model (greedy, as
    transformers' generate gives it), the model loaded once, an empty line stops; --json holds both."""
    import sys

    import datainf.models.llm

    loads = []
    original = datainf.models.llm.load_causal_lm_adapter

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(datainf.models.llm, "load_causal_lm_adapter", counting)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the lake is blue\na cat sat\n\n"))
    out = tmp_path / "e.json"
    code, text, err = run(["explain", "--model", str(setup["model"]), "--adapter", str(setup["run"]), "--store",
                           str(setup["stores"] / "checkpoint-2"), "--interactive", "--max-new-tokens", "2",
                           "--method", "identity", "--k", "1", "--model-dtype", "float64", "--json", str(out)], capsys)
    assert code == 0, err
    answers = json.loads(out.read_text())["answers"]
    assert [a["prompt"] for a in answers] == ["the lake is blue", "a cat sat"] and len(loads) == 1
    for a in answers:
        assert a["generated"] and a["response"] == greedy(setup, setup["run"], [{"role": "user", "content": a["prompt"]}], 2)


def test_explain_says_when_the_store_holds_a_loss_on_every_token(setup, tmp_path, capsys):
    """A store of `grads --loss-tokens all` (TRL's default for 'messages' data) with response-loss queries:
    explain says so (old: silently)."""
    store = tmp_path / "all-tokens"
    code, _, err = run(["grads", "--task", "causal_lm", "--model", str(setup["model"]), "--adapter", str(setup["run"]),
                        "--data", str(setup["root"] / "chat.jsonl"), "--store", str(store), "--loss-tokens", "all"],
                       capsys)
    assert code == 0, err
    code, text, err = run(["explain", "--model", str(setup["model"]), "--adapter", str(setup["run"]), "--store",
                           str(store), "--prompt", PROMPT, "--response", RESPONSE, "--method", "identity", "--k", "1"],
                          capsys)
    assert code == 0, err
    assert f"note: the training store {store} holds gradients of the loss on every token" in text, text
