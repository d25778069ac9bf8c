"""Causal LM records tokenized exactly as in training, on SmolLM2-135M-Instruct's real tokenizer (offline).

Each format is checked against an independent computation: the chat template's own tokenization and a
generation-tagged copy of the template's assistant mask (what TRL's assistant-only loss trains on), TRL's
prompt-completion rule (the completion is what follows ``tokenizer(prompt)``), and the model's own
Hugging Face loss on the same sequence.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from datainf.data.collate import CHARS_PER_TOKEN, IGNORE_INDEX, TextCollator  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.tasks import causal_lm_loss  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are Ava, a chatbot that reverses the order of words."},
    {"role": "user", "content": "the brave fox chases the ball"},
    {"role": "assistant", "content": "ball the chases fox brave the"},
    {"role": "user", "content": "a quiet teacher reads the book"},
    {"role": "assistant", "content": "book the reads teacher quiet a"},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from datainf.models.llm import smollm2_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


def _ids(encoded):
    """apply_chat_template(tokenize=True) gives a list or a BatchEncoding, depending on the version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _tagged_template(tok) -> str:
    """SmolLM2's template with {% generation %} around each assistant turn's content and end-of-turn token:
    the markers TRL's assistant_only_loss reads (return_assistant_tokens_mask)."""
    original = tok.chat_template
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in original  # the template this test was written against
    tagged = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{'\n'}}{% else %}" + plain + "{% endif %}")
    return original.replace(plain, tagged)


def _loss_positions(labels):
    return [i for i, y in enumerate(labels) if y != IGNORE_INDEX]


def test_messages_match_the_chat_template_and_trls_assistant_mask(tok):
    collator = TextCollator(tok, task="causal_lm", max_length=512)
    ids, labels = collator.tokenize({"messages": CHAT})
    assert ids == _ids(tok.apply_chat_template(CHAT, tokenize=True))
    tagged = tok.apply_chat_template(CHAT, chat_template=_tagged_template(tok), tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert list(tagged["input_ids"]) == ids  # the tags change nothing else in the rendering
    mask = list(tagged["assistant_masks"])
    assert _loss_positions(labels) == [i for i, m in enumerate(mask) if m] and sum(mask) > 0
    assert all(labels[i] == ids[i] for i in _loss_positions(labels))
    assert tok.decode([ids[i] for i in _loss_positions(labels)]) == (
        "ball the chases fox brave the<|im_end|>book the reads teacher quiet a<|im_end|>")


def test_messages_last_assistant_turn_only(tok):
    ids, labels = TextCollator(tok, task="causal_lm", max_length=512, assistant_turns="last").tokenize(
        {"messages": CHAT})
    assert tok.decode([ids[i] for i in _loss_positions(labels)]) == "book the reads teacher quiet a<|im_end|>"


def test_prompt_response_is_the_joint_tokenization_with_trls_completion_mask(tok):
    prompt, response = "What is the capital of France?", " The capital is Paris."
    ids, labels = TextCollator(tok, task="causal_lm", max_length=128).tokenize({"prompt": prompt, "response": response})
    joint = tok(prompt + response)["input_ids"]
    assert ids == joint + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    assert joint[:n_prompt] == tok(prompt)["input_ids"]  # so TRL's rule applies: completion = what follows
    assert _loss_positions(labels) == list(range(n_prompt, len(ids)))
    assert tok.decode([ids[i] for i in _loss_positions(labels)]) == response + tok.eos_token  # the space kept
    # 'completion' is TRL's name for the response
    assert TextCollator(tok, task="causal_lm").tokenize({"prompt": prompt, "completion": response}) == (ids, labels)


def test_prompt_response_in_the_chat_template_is_a_user_and_an_assistant_turn(tok):
    record = {"prompt": "the brave fox chases the ball", "response": "ball the chases fox brave the"}
    wrapped = TextCollator(tok, task="causal_lm", chat_template=True).tokenize(record)
    pair = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    assert wrapped == TextCollator(tok, task="causal_lm", assistant_turns="last").tokenize({"messages": pair})
    assert wrapped[0] == _ids(tok.apply_chat_template(pair, tokenize=True))


def test_conversational_prompt_completion_is_trls_completion_mask(tok):
    """TRL's rule for a conversational prompt-completion row, computed here at the token level as TRL does it:
    the prompt rendered with its generation prompt, then everything the full conversation adds is the
    completion (its turns, their end-of-turn tokens and the template's newline after them)."""
    prompt, completion = CHAT[:4], CHAT[4:]
    for key in ("completion", "response"):
        ids, labels = TextCollator(tok, task="causal_lm", max_length=512).tokenize({"prompt": prompt, key: completion})
        prompt_ids = _ids(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        full_ids = _ids(tok.apply_chat_template(prompt + completion, tokenize=True))
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert ids == full_ids
        assert _loss_positions(labels) == list(range(len(prompt_ids), len(full_ids)))
        assert all(labels[i] == ids[i] for i in _loss_positions(labels))
    # unlike 'messages', the earlier assistant turn (in the prompt) carries no loss
    assert tok.decode([ids[i] for i in _loss_positions(labels)]) == "book the reads teacher quiet a<|im_end|>\n"


def test_conversational_prompt_completion_refuses_what_it_cannot_render(tok):
    from copy import deepcopy

    collator = TextCollator(tok, task="causal_lm")
    with pytest.raises(DataInfError, match="example 0: the prompt and the completion must both be lists"):
        collator.tokenize({"prompt": "a string prompt", "completion": CHAT[4:]})
    with pytest.raises(DataInfError, match="every turn of the completion must be an assistant turn"):
        collator.tokenize({"prompt": CHAT[:2], "completion": CHAT[2:4]})
    plain = deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataInfError, match="no chat template"):
        TextCollator(plain, task="causal_lm").tokenize({"prompt": CHAT[:4], "completion": CHAT[4:]})


def test_loss_on_every_token_is_trls_default_for_messages(tok):
    """TRL's SFT without assistant_only_loss trains a 'messages' row on its whole rendering (labels =
    input_ids), and a prompt-completion row with completion_only_loss=False on prompt, completion and EOS."""
    collator = TextCollator(tok, task="causal_lm", max_length=512, loss_tokens="all")
    ids, labels = collator.tokenize({"messages": CHAT})
    assert ids == _ids(tok.apply_chat_template(CHAT, tokenize=True)) and labels == ids
    prompt, response = "What is the capital of France?", " The capital is Paris."
    ids, labels = collator.tokenize({"prompt": prompt, "completion": response})
    assert ids == tok(prompt + response)["input_ids"] + [tok.eos_token_id] and labels == ids
    # recorded where it changes the tokenization, absent (so old stores keep their fingerprint) where it doesn't
    assert collator.settings()["loss_tokens"] == "all"
    assert "loss_tokens" not in TextCollator(tok, task="causal_lm").settings()
    with pytest.raises(DataInfError, match="loss_tokens must be 'assistant' or 'all'"):
        TextCollator(tok, task="causal_lm", loss_tokens="prompt")


def test_token_counts_are_the_lengths_before_the_cut(tok):
    """token_counts: each record's length as the tokenizer renders it (the chat template, prompt + response +
    EOS), whatever max_length cuts it to, so that truncation can be reported."""
    records = [{"messages": CHAT}, {"prompt": "What is 2 + 2?", "response": " 4"}, {"input_ids": [1, 2, 3]}]
    counts = TextCollator(tok, task="causal_lm", max_length=8).token_counts(records)
    assert counts == [len(_ids(tok.apply_chat_template(CHAT, tokenize=True))),
                      len(tok("What is 2 + 2? 4")["input_ids"]) + 1, 0]
    assert counts[0] > 8 and len(TextCollator(tok, task="causal_lm", max_length=8).tokenize(records[0])[0]) == 8


def test_text_has_loss_on_every_token(tok):
    text = "Solve the following math problem. Tom has 3 apples -> 3"
    ids, labels = TextCollator(tok, task="causal_lm_mean").tokenize({"text": text})
    assert ids == tok(text)["input_ids"] + [tok.eos_token_id] and labels == ids
    no_eos = TextCollator(tok, task="causal_lm_mean", append_eos=False).tokenize({"text": text})
    assert no_eos == (tok(text)["input_ids"], tok(text)["input_ids"])


def test_per_example_loss_is_the_models_own_loss(tok):
    """A tiny random Llama on SmolLM2's vocabulary: our summed NLL of each padded example equals Hugging
    Face's loss (a float32 mean over the label tokens, times their number) on the example alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    records = [{"messages": CHAT}, {"prompt": "What is 2 + 2?", "response": " 4"}, {"text": "the cat sat on the mat"}]
    collator = TextCollator(tok, task="causal_lm", max_length=256)
    batch = collator(records)
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)
        theirs = []
        for r in records:
            ids, labels = collator.tokenize(r)
            n = sum(1 for y in labels[1:] if y != IGNORE_INDEX)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            theirs.append(out.loss * n)
    assert_close_to(ours, torch.stack(theirs), tol=FLOAT32_TOL, what="per-example NLL vs the model's own loss")


def test_no_chat_template_names_the_option_to_use(tok):
    from copy import deepcopy

    plain = deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataInfError, match="no chat template.*--data-format prompt-response"):
        TextCollator(plain, task="causal_lm").tokenize({"messages": CHAT})
    with pytest.raises(DataInfError, match="no assistant turn"):
        TextCollator(tok, task="causal_lm").tokenize({"messages": CHAT[:2]})
    with pytest.raises(DataInfError, match="turn 1: each turn needs a 'role' and a 'content'"):
        TextCollator(tok, task="causal_lm").tokenize({"messages": [CHAT[0], {"role": "user"}]})


def test_a_huge_line_is_cut_before_it_is_tokenized(tok):
    seen = []

    class Spy:
        is_fast = True
        eos_token_id = tok.eos_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tok(text, **kwargs)

    huge = "word " * 2_000_000  # 10 MB
    ids, labels = TextCollator(Spy(), task="causal_lm", max_length=32).tokenize({"text": huge})
    assert len(ids) == 32 and seen == [CHARS_PER_TOKEN * 32]
    seen.clear()
    ids, _ = TextCollator(Spy(), task="causal_lm", max_length=32).tokenize({"prompt": huge, "response": " ok"})
    assert len(ids) == 32 and max(seen) <= CHARS_PER_TOKEN * 32 + 3
