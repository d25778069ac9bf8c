"""Shared fixtures: a tiny random BERT saved like a real model folder, paired with the real MiniLM tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
from pathlib import Path

import pytest
import torch

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
