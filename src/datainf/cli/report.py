"""`datainf report`: a self-contained HTML report from a scores file and the training data."""

from __future__ import annotations

from typing import Any

import click

from datainf.cli.common import check_output
from datainf.errors import DataInfError


@click.command("report")
@click.option("--scores", "scores_path", required=True, type=click.Path(dir_okay=False),
              help="A scores file from `datainf score` (.safetensors; an old .npz is still read).")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="The training data the store was made from (for the texts and labels).")
@click.option("--text-column", default="text")
@click.option("--label-column", default="label")
@click.option("--flipped-column", default="flipped", help="Optional boolean column marking known-bad labels.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", type=int, default=10)
def command(scores_path: str, data_path: str, text_column: str, label_column: str, flipped_column: str,
            out_path: str, top_k: int) -> None:
    """An HTML report (self-contained) from a scores file."""
    import numpy as np

    from datainf.cli.common import scored_training_data
    from datainf.metrics import method_summary
    from datainf.report import write_report
    from datainf.scoring import load_scores

    check_output(out_path, inputs={"scores file": scores_path, "data file": data_path})
    loaded = load_scores(scores_path)
    arrays = {k: v.double().numpy() for k, v in loaded.scores.items()}
    records = [dict(r) for r in scored_training_data(loaded, data_path, text_column=text_column,
                                                      label_column=label_column, extra_columns=(flipped_column,))]
    if any(flipped_column in r for r in records):
        for r in records:
            r["flipped"] = str(r.pop(flipped_column, False)).lower() in ("1", "true", "yes")
    n = len(records)
    for k, a in arrays.items():
        if a.shape[0] != n:
            raise DataInfError(f"scores '{k}' have {a.shape[0]} training rows but {data_path} has {n} examples; "
                               "pass the data the store was made from")
    per_example = {k: (a if a.ndim == 1 else a.mean(axis=1)) for k, a in arrays.items()}
    flagged = np.array([r["flipped"] for r in records]) if "flipped" in records[0] else None
    summary = method_summary(per_example, flagged)
    methods: dict[str, dict[str, Any]] = {}
    for k in per_example:
        settings = loaded.settings.get(k, {})
        methods[k] = {"seconds": settings.get("seconds"), "damping": settings.get("damping"), **summary[k]}
    results = {"settings": {k: v for k, v in loaded.meta.items() if k not in ("format", "version")},
               "methods": methods, "task": "classification"}
    multi = {k: a for k, a in arrays.items() if a.ndim == 2 and a.shape[1] > 1}
    write_report(out_path, results=results, train=records, scores=per_example, query_scores=multi or None,
                 queries=[{"text": f"query {j}"} for j in range(next(iter(multi.values())).shape[1])] if multi else None,
                 top_k=top_k)
    click.echo(f"wrote {out_path}")
