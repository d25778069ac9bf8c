"""One query's pass over an existing store, timed N times in one process: the whole ``score_store`` call and
the one sweep over the rows inside it (``stream_dots``). For A/B comparisons of the pass between two checkouts
on the same warm store (run each with ``PYTHONPATH=CHECKOUT/src``, alternating, on an otherwise idle machine):

    OMP_NUM_THREADS=2 python benchmarks/pass_probe.py STORE --method identity --repeats 6 --threads 2

Prints the seconds of each call and a checksum of the scores (equal between checkouts when the scores are)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--method", default="identity")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import datainf.estimators as estimators
    from bench_store import query_grads
    from datainf.estimators import ScoreArguments
    from datainf.scoring import score_store
    from datainf.store import GradientStore

    torch.set_num_threads(args.threads)
    swept = [0.0]
    sweep = estimators.stream_dots

    def timed(*a, **k):  # the scoring path calls the sweep through the estimators package
        t0 = time.perf_counter()
        try:
            return sweep(*a, **k)
        finally:
            swept[0] += time.perf_counter() - t0

    estimators.stream_dots = timed
    queries = query_grads(GradientStore.open(args.store).block_shapes, 1)
    calls, sweeps, checksum = [], [], 0.0
    for _ in range(args.repeats):
        swept[0] = 0.0
        t0 = time.perf_counter()
        result = score_store(GradientStore.open(args.store), queries, ScoreArguments(method=args.method))
        calls.append(time.perf_counter() - t0)
        sweeps.append(swept[0])
        checksum = float(result.scores.double().abs().sum())
    print(f"{args.method}, {args.threads} thread(s): score_store {' '.join(f'{t:.3f}' for t in calls)} s (best "
          f"{min(calls):.3f}); the sweep {' '.join(f'{t:.3f}' for t in sweeps)} s (best {min(sweeps):.3f}); "
          f"checksum {checksum:.9g}")


if __name__ == "__main__":
    main()
