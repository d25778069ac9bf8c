"""Shared pieces of the peer benchmark: the demo's data, model and fine-tuned adapter, timing and memory.

Imported by every script here (each runs in its own process, ours in .venv, the peers in .peers-venv).
Only datainf's data/finetune helpers and torch/transformers/peft are used, which both venvs have.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))  # the peers venv sees datainf's data helpers without installing it

from datainf.experiments.mislabeled import MislabeledSettings  # noqa: E402

WORK = Path(os.environ.get("PEERS_WORK", ROOT / "runs" / "peers"))
SETTINGS = MislabeledSettings()  # the demo's settings: 1000 Rotten Tomatoes sentences, 20% flipped, r=4 on value


def peak_memory_mb() -> float:
    """Peak resident memory of this process (getrusage maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_data() -> dict[str, Any]:
    """The prepared data (train records with noisy labels and the flipped flag, validation records)."""
    path = WORK / "data.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/peers/prepare.py first")
    return json.loads(path.read_text())


def load_model() -> tuple[Any, Any]:
    """The fine-tuned LoRA MiniLM (eval mode) and its tokenizer, from the saved adapter."""
    from datainf.data.assets import minilm_dir
    from datainf.models.finetune import load_adapter

    data = load_data()
    return load_adapter(minilm_dir(), WORK / "adapter", data["num_labels"], is_trainable=True)


def encode(tokenizer: Any, records: list[dict]) -> dict[str, torch.Tensor]:
    """Tokenised batch as the demo's collator makes it (max_length 64, padded to the longest)."""
    enc = tokenizer([r["text"] for r in records], padding=True, truncation=True,
                    max_length=SETTINGS.max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        batch["token_type_ids"] = enc["token_type_ids"]
    batch["labels"] = torch.tensor([int(r["label"]) for r in records])
    return batch


def auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of ranking by score (higher = more harmful) against the flipped labels (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = flipped.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def write_result(name: str, scores: dict[str, np.ndarray], seconds: dict[str, float], extra: dict | None = None) -> None:
    """Save scores (positive = harmful, influence on the mean validation loss) and timings of one script."""
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(WORK / f"scores-{name}.npz", **scores)
    flipped = np.array(load_data()["flipped"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"script": name, "peak_memory_mb": peak_memory_mb(), "torch_threads": torch.get_num_threads(),
           "cpu_seconds": usage.ru_utime + usage.ru_stime,  # whole process, imports included
           "methods": {m: {"seconds": seconds[m], "auc": auc(s, flipped)} for m, s in scores.items()}}
    out.update(extra or {})
    path = WORK / f"result-{name}.json"
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    out["history"] = history + [{"seconds": max(seconds.values()), "peak_memory_mb": out["peak_memory_mb"],
                                 "cpu_seconds": out["cpu_seconds"],
                                 "finished": time.strftime("%H:%M:%S")}]
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class TensorClassifier(torch.nn.Module):
    """The classifier as ``forward(x) -> logits`` with x (B, 2, T) = stacked input_ids and attention_mask, for
    peers whose per-example gradients take a single input tensor (torch.func.vmap over examples)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers builds its mask with a `padding_mask.all()` test that torch.func.vmap refuses
        # (data-dependent control flow); a ready 4-D additive mask (B, 1, T, T) is used as is
        keep = x[:, 1].bool()[:, None, None, :].expand(-1, 1, x.shape[-1], -1)
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        return self.model(input_ids=x[:, 0], attention_mask=mask).logits


def padded_tensors(tokenizer: Any, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 2, max_length) long, y (n,) long): every example padded to the demo's max_length."""
    enc = tokenizer([r["text"] for r in records], padding="max_length", truncation=True,
                    max_length=SETTINGS.max_length, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
    return x, torch.tensor([int(r["label"]) for r in records])


def our_damping() -> dict[str, float]:
    """The paper-rule damping per block that run_ours.py --method datainf used (name -> lambda)."""
    path = WORK / "result-ours-datainf.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run run_ours.py --method datainf first")
    return json.loads(path.read_text())["damping"]
