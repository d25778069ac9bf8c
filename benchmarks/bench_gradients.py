"""Per-example gradient extraction speed on real small models, as ratios measured in one process.

For each model it times, on the same padded batches:
  floor  a plain batched forward + backward of the summed loss (what we cannot beat),
  ours   datainf.per_example_gradients (hooks: one forward + one backward per batch),
  loop   a batch-size-1 loop of forward + backward (what the paper's research code does),
and prints examples per second and the ratios ours/floor (target <= 1.5x) and loop/ours (target >= 5x at
batch size 32).

Models (both ship inside PyPI packages; nothing is downloaded from a hub):
  minilm   all-MiniLM-L6-v2 sequence classifier, LoRA r=4 on the value matrices + classifier head,
           Rotten Tomatoes sentences;
  smollm2  SmolLM2-135M-Instruct causal LM, LoRA r=8 (alpha 32) on q_proj and v_proj, response-only NLL.

Usage: python benchmarks/bench_gradients.py [--batch-size 32] [--batches 3] [--models minilm,smollm2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from datainf.data.collate import TextCollator
from datainf.gradients import per_example_gradients
from datainf.tasks import resolve_task


def _minilm(batch_size: int, batches: int):
    from datainf.data.assets import minilm_dir
    from datainf.data.text import load_text_dataset
    from datainf.models.finetune import LoraSettings, load_classifier

    model, tok = load_classifier(minilm_dir(), 2, LoraSettings(rank=4, target_modules=("value",)))
    records = load_text_dataset("rotten_tomatoes")[: batch_size * batches]
    collate = TextCollator(tokenizer=tok, task="classification", max_length=64)
    _randomize_b(model)
    return model, [collate(records[i : i + batch_size]) for i in range(0, len(records), batch_size)], "classification"


def _smollm2(batch_size: int, batches: int):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.data.generation import make_task
    from datainf.models.llm import smollm2_dir

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32,
                                            target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    _randomize_b(model)
    records = make_task("sentences", classes=10, per_class=max(1, batch_size * batches // 10 + 1), seed=0)
    records = records[: batch_size * batches]
    collate = TextCollator(tokenizer=tok, task="causal_lm", max_length=96)
    return model, [collate(records[i : i + batch_size]) for i in range(0, len(records), batch_size)], "causal_lm"


def _randomize_b(model: torch.nn.Module) -> None:
    """LoRA B starts at zero; give it values so the timing is that of a trained adapter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _floor(model, batch, task) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = resolve_task(task)(model, batch).sum()
    torch.autograd.grad(loss, params)


def one_example(batch: dict, i: int) -> dict:
    """Example ``i`` of a padded batch alone, its padding removed (a batch of size 1)."""
    mask = batch["attention_mask"][i].bool()
    return {k: v[i : i + 1][:, mask] if v.ndim == 2 else v[i : i + 1] for k, v in batch.items()}


def _loop(model, batch, task) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    fn = resolve_task(task)
    for i in range(batch["input_ids"].shape[0]):
        torch.autograd.grad(fn(model, one_example(batch, i)).sum(), params)


def _time(fn, batches, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--loop-batches", type=int, default=1, help="batches timed for the slow loop")
    ap.add_argument("--models", default="minilm,smollm2")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    for name in args.models.split(","):
        model, batches, task = {"minilm": _minilm, "smollm2": _smollm2}[name](args.batch_size, args.batches)
        _report(name, model, batches, task, args.loop_batches)


def _report(name: str, model, batches, task: str, loop_batches: int) -> None:
    """Time the three ways on the same batches and print examples per second and the ratios."""
    model.eval()
    n = sum(b["input_ids"].shape[0] for b in batches)
    n_loop = sum(b["input_ids"].shape[0] for b in batches[:loop_batches])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _floor(model, batches[0], task)  # warm-up
    per_example_gradients(model, batches[0], task)
    t_floor = _time(lambda b: _floor(model, b, task), batches, repeats=2)
    t_ours = _time(lambda b: per_example_gradients(model, b, task), batches, repeats=2)
    t_loop = _time(lambda b: _loop(model, b, task), batches[:loop_batches]) * n / n_loop
    print(f"\n{name}: {trainable:,} trainable parameters, {n} examples, mean length "
          f"{float(torch.cat([b['attention_mask'].sum(1) for b in batches]).float().mean()):.1f} tokens")
    print(f"  floor (batched fwd+bwd)     {n / t_floor:8.1f} ex/s")
    print(f"  ours  (per-example, hooks)  {n / t_ours:8.1f} ex/s")
    print(f"  loop  (batch size 1)        {n / t_loop:8.1f} ex/s   (timed on {n_loop} examples)")
    r1, r2 = t_ours / t_floor, t_loop / t_ours
    print(f"  ours / floor = {r1:.2f}x  (target <= 1.5x: {'PASS' if r1 <= 1.5 else 'MISS'})")
    print(f"  loop / ours  = {r2:.1f}x  (target >= 5x: {'PASS' if r2 >= 5 else 'MISS'})")

if __name__ == "__main__":
    main()
