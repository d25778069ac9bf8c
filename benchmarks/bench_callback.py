"""What DatainfCallback costs a TRL SFTTrainer run: the same training with and without it, in one process.

A random Llama over SmolLM2-135M-Instruct's vocabulary with SmolLM2's real tokenizer and chat template
(``--hidden``, ``--layers``), LoRA r=8 on q_proj and v_proj, trained by TRL's ``SFTTrainer`` on the chat
task of ``datainf example-data`` (``--examples`` conversations, ``--epochs`` epochs, batch ``--batch-size``)
three ways, each from the same initial weights and seed:

* ``base``: no callback;
* ``callback``: ``DatainfCallback(checkpoints=K)`` (step 0 and K steps: adapter, tokenizer, learning rate,
  Adam's exp_avg_sq, the run's record);
* ``callback+gradients``: the same with ``gradients=True``: each of the K + 1 checkpoints also writes the
  per-example gradients of every training example (``datainf grads``' Attributor, batch ``--batch-size``).

Each variant runs ``--repeats`` times in turn (base, callback, callback+gradients, base, ...) and its best
wall time of ``trainer.train()`` is kept (the machine is shared: the least disturbed run), with the seconds
spent inside the callback's own events (less disturbed by the load than a difference of two runs). Prints
the times and the two ratios against the base, with their goals (1.3x and 2x)::

    python benchmarks/bench_callback.py                     # the default size (under 3 min on 2 shared cores)
    python benchmarks/bench_callback.py --quick             # a smoke run (seconds)

The gradient pass costs about one forward and backward per training example per checkpoint, against
``epochs`` of them per example for the training itself, so its ratio grows with (K + 1) / epochs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model_dir(folder: Path, hidden: int, layers: int) -> Path:
    """A saved random Llama with SmolLM2's tokenizer (vocabulary 49,152, chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from datainf.models.llm import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 64, 2),
                         intermediate_size=4 * hidden, max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


class TimedCallback:
    """A DatainfCallback whose event methods add up the seconds they take (the callback's own time, which the
    machine's load disturbs far less than the difference of two training runs)."""

    def __new__(cls, *args, **kwargs):
        from datainf.integrations import DatainfCallback

        callback = DatainfCallback(*args, **kwargs)
        callback.own_seconds = 0.0
        for name in ("on_train_begin", "on_optimizer_step", "on_train_end"):
            method = getattr(callback, name)

            def timed(*a, _method=method, **k):
                t0 = time.perf_counter()
                try:
                    return _method(*a, **k)
                finally:
                    callback.own_seconds += time.perf_counter() - t0
            setattr(callback, name, timed)
        return callback


def train_once(model_dir: Path, rows: list[dict], work: Path, variant: str, args: argparse.Namespace
               ) -> tuple[float, float]:
    """Seconds of ``trainer.train()`` for one variant ("base", "callback", "callback+gradients"), and the
    seconds spent inside the callback's events."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    shutil.rmtree(work, ignore_errors=True)
    callbacks = []
    if variant != "base":
        callbacks.append(TimedCallback(work / "run", checkpoints=args.checkpoints, train_data=rows,
                                         gradients=variant == "callback+gradients", store=work / "stores",
                                         batch_size=args.batch_size))
    config = SFTConfig(output_dir=str(work / "trainer"), num_train_epochs=args.epochs,
                       per_device_train_batch_size=args.batch_size, learning_rate=1e-3, warmup_steps=0.1,
                       save_strategy="no", report_to=[], use_cpu=True, max_length=128, disable_tqdm=True,
                       logging_strategy="no", seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, sum(c.own_seconds for c in callbacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="A smoke run: hidden 32, 1 layer, 8 examples, 1 epoch.")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.examples, args.epochs, args.repeats = 32, 1, 8, 1, 1
    import torch
    import transformers

    from datainf.data.generation import chat_records, make_task

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    classes = 3
    rows = [{"messages": r["messages"]} for r in chat_records(make_task("sentences", classes=classes,
                                                                         per_class=-(-args.examples // classes)))]
    rows = rows[: args.examples]
    steps = args.epochs * -(-len(rows) // args.batch_size)
    print(f"SFTTrainer: random Llama hidden {args.hidden}, {args.layers} layers, SmolLM2 tokenizer; LoRA r=8 q,v; "
          f"{len(rows)} chat examples x {args.epochs} epochs, batch {args.batch_size} = {steps} steps; callback "
          f"checkpoints={args.checkpoints} (+ step 0); torch threads {args.threads}; load average before "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    best: dict[str, float] = {}
    own: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-callback-") as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.hidden, args.layers)
        train_once(model_dir, rows[: args.batch_size], Path(tmp) / "warm", "callback",
                   argparse.Namespace(**{**vars(args), "epochs": 1}))  # imports and first-call costs, untimed
        for repeat in range(args.repeats):
            for variant in ("base", "callback", "callback+gradients"):
                seconds, inside = train_once(model_dir, rows, Path(tmp) / variant.replace("+", "_"), variant, args)
                best[variant] = min(seconds, best.get(variant, float("inf")))
                own[variant] = min(inside, own.get(variant, float("inf")))
                print(f"  repeat {repeat + 1}: {variant:<19} {seconds:7.2f} s (in the callback's events "
                      f"{inside:.2f} s)", flush=True)
    print(f"best of {args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items())
          + f"; load average after {os.getloadavg()[0]:.2f}")
    for variant, goal in (("callback", 1.3), ("callback+gradients", 2.0)):
        ratio = best[variant] / best["base"]
        added = (best["base"] + own[variant]) / best["base"]
        print(f"{variant}: base + the callback's own time = {added:.2f}x the base")
        print(f"target {variant} overhead: {ratio:.2f}x (goal {goal:g}x) {'PASS' if ratio <= goal else 'MISS'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
