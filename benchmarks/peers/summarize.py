"""Collect runs/peers/result-*.json into the table of docs/benchmarks.md (printed; --write to save).

Correlations are with datainf's exact scores of the same run (same adapter, same data); AUC ranks the
training examples most harmful first against the flipped labels.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import ROOT, WORK
from scipy.stats import pearsonr, spearmanr

ORDER = ["ours-exact", "ours-ekfac", "ours-ekfac-hooks", "ours-ekfac-activations", "kronfluence-ekfac", "kronfluence-ekfac-empirical-heuristic-damping",
         "ours-kfac", "ours-datainf", "dattri-datainf", "pydvl-datainf", "ours-identity", "kronfluence-identity"]


def table() -> str:
    exact = np.load(WORK / "scores-ours-exact.npz")["ours-exact"]
    rows = []
    results = {p.stem.removeprefix("result-"): json.loads(p.read_text()) for p in WORK.glob("result-*.json")}
    names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
    for name in names:
        r = results[name]
        s = np.load(WORK / f"scores-{name}.npz")[name]
        m = r["methods"][name]
        runs = r.get("history", [{"seconds": m["seconds"], "peak_memory_mb": r["peak_memory_mb"]}])
        seconds = " / ".join(f"{h['seconds']:.1f}" for h in runs)
        cpu = " / ".join(f"{h['cpu_seconds']:.0f}" if "cpu_seconds" in h else "-" for h in runs)
        memory = max(h["peak_memory_mb"] for h in runs) / 1024
        rows.append(f"| {name} | {m['auc']:.3f} | {pearsonr(s, exact)[0]:.3f} | {spearmanr(s, exact)[0]:.3f} | "
                    f"{seconds} | {cpu} | {memory:.2f} |")
    head = ("| method | mislabel AUC | pearson with exact | spearman with exact | seconds end to end (each run) | CPU seconds (each run) | peak RSS (GiB) |\n"
            "|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="replace the table in docs/benchmarks.md")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        body = doc.read_text()
        start, end = "<!-- table -->", "<!-- /table -->"
        doc.write_text(body.split(start)[0] + start + "\n" + text + "\n" + end + body.split(end)[1])


if __name__ == "__main__":
    main()
