"""Issue 29's identification over seeds: one table per task, every row (method x final / step 0 / run, and the
resemblance control) as mean +- sd over the seeds' ``results.json`` of ``datainf experiment llm-identification``.

Usage: python scripts/issue29_seeds.py TASK RESULTS.json [RESULTS.json ...] [--extra SEED0.json]

``--extra`` adds a seed whose run folder was not kept, as {"seed": S, "auc": {row: value}, "recall": {row:
value}} transcribed from docs/results.md (the table says which seeds came from files). Prints a Markdown table:
AUC and recall@10 (chance 0.5 / 0.1), mean +- sd over seeds (sd with n - 1), and each seed's AUC.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

UNITS = (("", "final adapter"), ("+step0", "step 0"), ("+run", "run"))


def load(paths: list[str], extra: str | None) -> tuple[list[int], dict[str, dict[int, tuple[float, float]]]]:
    """(seeds, row -> seed -> (auc, recall))."""
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    seeds = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        seed = int(r["settings"]["seed"])
        seeds.append(seed)
        for name, m in r["methods"].items():
            rows.setdefault(name, {})[seed] = (float(m["auc"]), float(m["recall"]))
    if extra:
        e = json.loads(Path(extra).read_text())
        seed = int(e["seed"])
        seeds.append(seed)
        for name, auc in e["auc"].items():
            rows.setdefault(name, {})[seed] = (float(auc), float(e["recall"][name]))
    return sorted(seeds), rows


def cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def table(task: str, seeds: list[int], rows: dict[str, dict[int, tuple[float, float]]]) -> str:
    methods = [m for m in rows if "+" not in m and m != "resemblance"]
    head = (f"| {task}: AUC / recall@10, mean +- sd over seeds {', '.join(map(str, seeds))} | "
            + " | ".join(label for _, label in UNITS) + " | AUC per seed (final; step 0; run) |")
    out = [head, "|" + "---|" * (len(UNITS) + 2)]
    for m in [*methods, "resemblance"]:
        if m not in rows:
            continue
        cells, per_seed = [], []
        for suffix, _ in UNITS:
            by_seed = rows.get(m + suffix) if m != "resemblance" or not suffix else None
            if not by_seed:
                cells.append("")
                continue
            auc = [by_seed[s][0] for s in seeds if s in by_seed]
            rec = [by_seed[s][1] for s in seeds if s in by_seed]
            cells.append(f"{cell(auc)} / {cell(rec)}")
            per_seed.append(", ".join(f"{by_seed[s][0]:.3f}" for s in seeds if s in by_seed))
        label = "control: resemblance" if m == "resemblance" else m
        out.append(f"| {label} | " + " | ".join(cells) + f" | {'; '.join(per_seed)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task")
    ap.add_argument("results", nargs="+")
    ap.add_argument("--extra", default=None)
    args = ap.parse_args()
    seeds, rows = load(args.results, args.extra)
    print(table(args.task, seeds, rows))


if __name__ == "__main__":
    main()
