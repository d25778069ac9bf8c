"""Shared fixtures: a tiny random BERT saved like a real model folder (with the real MiniLM tokenizer), and a
tiny random Llama with a word tokenizer covering the generated LLM tasks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
from pathlib import Path

import pytest
import torch

# DATAINF_TEST_THREADS=N runs the suite with torch.set_num_threads(N): the tolerances (tests/reference.py) must
# hold whatever the reduction order, so the suite is run with 1 and 2 threads (and OMP_NUM_THREADS=1) too
if os.environ.get("DATAINF_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["DATAINF_TEST_THREADS"]))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A random 2-layer BERT (vocab 30522) saved with save_pretrained, plus the real MiniLM tokenizer files."""
    from transformers import BertConfig, BertModel

    from datainf.data.assets import minilm_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        src = minilm_dir() / name
        if src.exists():
            shutil.copy(src, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def other_tiny_bert_dir(tmp_path_factory) -> Path:
    """A second tiny BERT of another width: adapters of the first do not fit it."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-48"), hidden=48, seed=1)


SENTENCES = [
    ("a gorgeous, witty and moving film", 1), ("dull, lifeless and far too long", 0),
    ("one of the best films of the year", 1), ("a tedious mess with no heart", 0),
    ("sharp writing and a great cast", 1), ("the plot makes no sense at all", 0),
    ("funny, warm and beautifully shot", 1), ("boring from start to finish", 0),
    ("an absolute delight to watch", 1), ("clumsy, loud and forgettable", 0),
    ("smart and surprising", 1), ("painfully bad acting", 0),
]


@pytest.fixture()
def sentence_records() -> list[dict]:
    return [{"text": t, "label": y} for t, y in SENTENCES]


def _word_tokenizer(texts: list[str]):
    """A word-level fast tokenizer built offline from ``texts`` (whitespace + punctuation split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved random tiny LlamaForCausalLM + word tokenizer covering the three tasks' texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from datainf.data.generation import make_task

    texts = [r["prompt"] + r["response"] for t in ("sentences", "math", "math-reasoning")
             for r in make_task(t, classes=3, per_class=6)]
    tok = _word_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
