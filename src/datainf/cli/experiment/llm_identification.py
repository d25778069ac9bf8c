"""`datainf experiment llm-identification` (datainf.experiments.llm_identification)."""

from __future__ import annotations

from pathlib import Path

import click

from datainf.cli.common import setup
from datainf.cli.options import declared, method_option, option
from datainf.data.generation import TASKS
from datainf.errors import DataInfError
from datainf.experiments.llm_identification import LLM_LORA, LLMIdentificationSettings, format_table, run
from datainf.models.finetune import LoraSettings, TrainSettings
from datainf.outputs import check_run_folder


def split_list(value: str, what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise DataInfError(f"{what} needs at least one name")
    return items


@click.command("llm-identification")
@click.option("--task", type=click.Choice(list(TASKS)), default="sentences", help="Synthetic generation task.")
@option("--out", "out_dir", type=click.Path(file_okay=False), default="llm-identification-out",
        help="Output folder: results.json, scores.safetensors, train/test.jsonl, report.html, store/.")
@option("--model", type=click.Path(), default=None,
        help="Local Hugging Face causal LM folder; default SmolLM2-135M-Instruct (converted once).")
@option("--classes")
@click.option("--train-per-class", type=int, default=90)
@click.option("--test-per-class", type=int, default=10)
@option("--epochs", default=2)
@option("--lr", help="Fine-tuning learning rate (AdamW, linear warm-up).")
@option("--batch-size", default=8, help="Fine-tuning batch size.")
@option("--max-length", type=int, help="Token limit of prompt + response.")
@option("--rank", default=8)
@option("--alpha", default=32.0)
@option("--target-modules", default="q_proj,v_proj")
@method_option(declared("LLM_IDENTIFICATION_METHODS"), "Influence methods, comma-separated or repeated.")
@click.option("--protocol", type=click.Choice(["paper", "response"]), default="response",
              help="paper: fine-tune on prompt + response, gradients of the mean LM loss over the prompt's tokens "
                   "(the research code); response: fine-tune on and attribute the response's NLL.")
@option("--normalize",
        help="Also score every method but lissa with unit-normalized preconditioned gradients.")
@option("--checkpoints",
        help="Also score at step 0 (the initial adapter, B = 0; rows <method>+step0) and at this many evenly "
             "spaced steps of fine-tuning (the last the final model), and sum each method's scores over step 0 "
             "and them, each weighted by the mean learning rate of the steps from it to the next (as finetune "
             "--checkpoints records it; rows <method>+run).")
@click.option("--control/--no-control", default=False,
              help="Also score the resemblance control (row 'resemblance'): minus the cosine of the base model's "
                   "mean last hidden states of prompt + response, training example vs test example.")
@option("--variant")
@option("--damping")
@option("--lissa-iterations", default=100, help="LiSSA's recursion steps.")
@option("--seed")
@click.option("--load-in-8bit/--no-load-in-8bit", default=False, help="8-bit base model (bitsandbytes + GPU).")
@click.option("--load-in-4bit/--no-load-in-4bit", default=False, help="4-bit base model (bitsandbytes + GPU).")
@click.option("--keep-store/--no-keep-store", default=True, help="Keep out/store (the training gradients).")
@option("--device")
@click.pass_context
def llm_identification_command(ctx: click.Context, task: str, out_dir: str, model_dir: str | None, classes: int,
                               train_per_class: int, test_per_class: int, epochs: int, lr: float, batch_size: int,
                               max_length: int, rank: int, alpha: float, target_modules: str, methods: tuple[str, ...],
                               protocol: str, normalize: bool, checkpoints: int, control: bool,
                               variants: tuple[str, ...], damping: float | None,
                               lissa_iterations: int,
                               seed: int, load_in_8bit: bool, load_in_4bit: bool, keep_store: bool,
                               device: str | None) -> None:
    """Which training examples does a LoRA-tuned causal LM use for each test prompt? (paper section 4.3)

    Fine-tunes LoRA on a synthetic task of `--classes` classes, scores every training example's influence
    on each test example with each method, and measures how well the most helpful training examples of a
    test prompt come from its own class (AUC and recall, averaged over test prompts).
    """
    check_run_folder(out_dir, {"model folder": model_dir})
    progress, device = setup(ctx, device)
    if (load_in_8bit or load_in_4bit) and not device.startswith("cuda"):
        raise DataInfError("--load-in-8bit/--load-in-4bit need bitsandbytes and a CUDA GPU (--device cuda); "
                           "drop the flag on a CPU")
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        raise DataInfError(f"--model {model_dir} is not a transformers model folder (no config.json)")
    settings = LLMIdentificationSettings(
        task=task, model_dir=model_dir, classes=classes, train_per_class=train_per_class,
        test_per_class=test_per_class,
        train=TrainSettings(epochs=epochs, learning_rate=lr, batch_size=batch_size, max_length=max_length, seed=seed),
        lora=LoraSettings(**(LLM_LORA | {"rank": rank, "alpha": alpha,
                                         "target_modules": split_list(target_modules, "--target-modules")})),
        methods=methods, protocol=protocol, normalize=normalize, checkpoints=checkpoints,
        control=control, variants=variants, damping=damping,
        lissa_iterations=lissa_iterations, seed=seed,
        load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, keep_store=keep_store, device=device)
    result = run(settings, out_dir, progress=progress)
    click.echo(f"\n{settings.task} ({settings.protocol} protocol): {result.n_train} training / {result.n_test} test "
               f"examples; test loss {result.test_loss_before:.3f} -> {result.test_loss_after:.3f} per token "
               f"(response loss {result.test_response_loss_after:.3f}, "
               f"{result.test_response_loss_after_without_eos:.3f} without the EOS)")
    click.echo(format_table(result))
    click.echo(f"\nwall time {result.wall_seconds:.0f} s; wrote {out_dir}/results.json, {out_dir}/scores.safetensors, "
               f"{out_dir}/report.html")


commands = {"llm-identification": llm_identification_command}
