"""datainf on the peer benchmark: one method per process, timed end to end (model load, per-example
gradients of the 1000 training and 200 validation examples, scores on the mean validation loss).

    .venv/bin/python benchmarks/peers/run_ours.py --method ekfac  # datainf|exact|identity|kfac|ekfac|ekfac-hooks

ekfac: ``curvature_from_gradients`` -- the Kronecker basis of the per-example gradients (mean G^T G,
mean G G^T) and the corrected eigenvalues, two cheap passes over the in-memory gradients, no hooks.
ekfac-hooks / kfac: the Kronecker factors accumulated by the gradient hooks in the same forward/backward
pass (``per_example_gradients(..., factors=acc)``); ekfac-hooks then uses ``fit_curvature`` (gradient basis). Damping: the library defaults (the paper's rule per block; for ekfac 0.1 x mean
eigenvalue, which is the same number).
"""

from __future__ import annotations

import argparse

from common import SETTINGS, Timer, encode, load_data, load_model, write_result

import datainf
from datainf.attributor import length_sorted_batches
from datainf.estimators.kfac import KFACFactors, curvature_from_gradients, fit_curvature
from datainf.gradients import per_example_gradients


def gradients(model, tokenizer, records, factors=None):
    """Per-example gradients in record order, computed in length-sorted batches (as the Attributor does)."""
    import torch

    out: dict = {}
    for idx in length_sorted_batches(records, SETTINGS.grad_batch_size):
        batch = encode(tokenizer, [records[i] for i in idx])
        for k, v in per_example_gradients(model, batch, "classification", factors=factors).items():
            out.setdefault(k, torch.empty((len(records), *v.shape[1:]), dtype=v.dtype))[idx] = v
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=["datainf", "exact", "identity", "kfac", "ekfac", "ekfac-hooks"])
    method = parser.parse_args().method
    timer = Timer()
    data = load_data()
    model, tokenizer = load_model()
    factors = KFACFactors() if method in ("kfac", "ekfac-hooks") else None
    train = gradients(model, tokenizer, data["train"], factors)
    val = gradients(model, tokenizer, data["val"])
    query = {k: v.mean(dim=0, keepdim=True) for k, v in val.items()}
    grad_seconds = timer()
    options = {}
    if factors is not None:
        options["factors"] = fit_curvature(factors, train if method == "ekfac-hooks" else None)
    if method == "ekfac":
        options["factors"] = curvature_from_gradients(train)
    info: dict = {}
    scores = datainf.influence(train, query, method=method.removesuffix("-hooks"), diagnostics=info,
                               **options)[:, 0].double().numpy()
    write_result(f"ours-{method}", {f"ours-{method}": scores}, {f"ours-{method}": timer()},
                 {"gradient_seconds": grad_seconds, "damping": info.get("damping")})


if __name__ == "__main__":
    main()
