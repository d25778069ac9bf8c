"""`datainf assets` and `datainf example-data`: the offline model folders, and generated data to try things on."""

from __future__ import annotations

import json

import click

from datainf.cli.options import option
from datainf.outputs import check_output


@click.command("assets")
@click.argument("name", type=click.Choice(["smollm2", "smollm2-tokenizer", "minilm"]))
def command(name: str) -> None:
    """Print the folder of an offline model (SmolLM2-135M-Instruct is converted from its package once)."""
    if name == "minilm":
        from datainf.data.assets import minilm_dir

        click.echo(str(minilm_dir()))
        return
    from datainf.models.llm import smollm2_dir, smollm2_tokenizer_dir

    click.echo(str(smollm2_dir() if name == "smollm2" else smollm2_tokenizer_dir()))


@click.command("example-data")
@click.option("--task", type=click.Choice(["sentences", "math", "math-reasoning"]), default="sentences",
              help="The generated task (the paper's section 4.3): ten named chatbots or ten math templates.")
@click.option("--format", "data_format", type=click.Choice(["messages", "prompt-response"]), default="messages",
              help="Chat records (TRL's conversational format) or prompt/response records.")
@click.option("--classes", type=click.IntRange(2, 10), default=10)
@click.option("--per-class", type=click.IntRange(1, 2000), default=20)
@option("--seed", help="Seed of the generated examples.")
@option("--out", "out_path", required=True, help="JSONL file to write; an existing file is refused unless --overwrite.")
@option("--overwrite", help="Replace an existing --out file.")
def example_data(task: str, data_format: str, classes: int, per_class: int, seed: int, out_path: str,
                 overwrite: bool) -> None:
    """Write a generated training set as JSONL (with each example's class as `label` and `class_name`)."""
    from datainf import atomic
    from datainf.data.generation import chat_records, make_task

    check_output(out_path, inputs={}, kind="example-data", overwrite=overwrite)
    records = make_task(task, classes, per_class, seed=seed)
    if data_format == "messages":
        records = chat_records(records)
    else:
        records = [{k: r[k] for k in ("prompt", "response", "label", "class_name")} for r in records]
    atomic.write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    click.echo(f"wrote {len(records)} {task} examples ({classes} classes) to {out_path}")
