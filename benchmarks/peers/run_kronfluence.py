"""Kronfluence (EK-FAC and identity) on the peer benchmark, in its own process and venv:

    .peers-venv/bin/python benchmarks/peers/run_kronfluence.py --strategy ekfac [--empirical-fisher] [--heuristic-damping]

Tracked modules: the LoRA A/B linears and the classifier head, as the blocks of datainf. Padding is masked
(``get_attention_mask``). Scores are Kronfluence's pairwise scores (train x each validation example),
averaged over the validation set (= the influence on the mean validation loss), and NEGATED: Kronfluence
reports g_query^T H^-1 g_train (positive = helpful), datainf the opposite sign (positive = harmful).
Defaults are Kronfluence's (true Fisher with sampled labels, damping 1e-8); the flags switch to the
empirical Fisher (the curvature datainf's exact uses) and to its 0.1 x mean eigenvalue damping.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
import torch.nn.functional as F
from common import SETTINGS, Timer, encode, load_data, load_model, write_result
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs


class Classification(Task):
    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch.get("token_type_ids")).logits
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
        else:
            labels = batch["labels"]
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch) -> torch.Tensor:
        return batch["attention_mask"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ekfac", choices=["ekfac", "identity", "kfac", "diagonal"])
    parser.add_argument("--empirical-fisher", action="store_true")
    parser.add_argument("--heuristic-damping", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    timer = Timer()
    data = load_data()
    model, tokenizer = load_model()
    modules = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(p.requires_grad for p in m.parameters(recurse=False))]
    task = Classification(modules)
    model = prepare_model(model, task)
    collate = DataLoaderKwargs(collate_fn=lambda records: encode(tokenizer, records))
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        factor_args = FactorArguments(strategy=args.strategy, use_empirical_fisher=args.empirical_fisher)
        analyzer.fit_all_factors("factors", data["train"], per_device_batch_size=SETTINGS.grad_batch_size,
                                 factor_args=factor_args, dataloader_kwargs=collate, overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=None if args.heuristic_damping else 1e-8)
        analyzer.compute_pairwise_scores("scores", "factors", data["val"], data["train"],
                                         per_device_query_batch_size=len(data["val"]),
                                         per_device_train_batch_size=SETTINGS.grad_batch_size,
                                         score_args=score_args, dataloader_kwargs=collate, overwrite_output_dir=True)
        pairwise = analyzer.load_pairwise_scores("scores")["all_modules"]  # (n_val, n_train)
    scores = (-pairwise.double().mean(dim=0)).numpy()
    name = f"kronfluence-{args.strategy}" + ("-empirical" if args.empirical_fisher else "") + (
        "-heuristic-damping" if args.heuristic_damping else "")
    write_result(name, {name: scores}, {name: timer()}, {"modules": modules})


if __name__ == "__main__":
    main()
