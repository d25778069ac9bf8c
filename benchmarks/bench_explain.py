"""`datainf explain` end to end at scale (issue 32): the model loaded, the query's gradient, the top k, as the user
runs it (one `datainf explain` process, timed from outside), warm (the store and the index in the page cache).

A store of --n real gradients would take hours to compute here, so the training rows are synthetic: the chunk
files of a synthetic projected store of the same layout (`bench_store.py --pass --n N --keep`: SmolLM2's 120
LoRA blocks, k=64) are hard-linked into a new store whose manifest says what a real one made with this script's
adapter says (model and adapter fingerprints, task, tokenization, projection), copied from a real store of a few
examples computed here with `datainf grads`. explain checks the store against the model as it would any
store, computes the real query gradient and reads the synthetic rows; the top-k rows it prints mean nothing,
their time is what is measured.

    python benchmarks/bench_explain.py --rows-from OUT/store-k64-pass-100000 --out OUT/explain

Ends with ``target explain end to end ...: <seconds> (goal <= 10 s) PASS|MISS`` lines: with the compact index
(`datainf index build --kind compact`) and with the full warm pass (no index). Load and card in the lines above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 10.0
PROMPT = "What is 17 times 23?"
RESPONSE = "17 times 23 is 391."


def run(argv: list[str], threads: int) -> tuple[float, str]:
    """Run `datainf ARGV` in a fresh process; (wall seconds, stdout). Refuses loudly on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "datainf", *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"datainf {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def adapter(out: Path) -> Path:
    """A SmolLM2-135M-Instruct LoRA adapter (r=8, alpha=32, q_proj and v_proj; B drawn small so that every block
    has a gradient), saved as a PEFT folder."""
    import torch

    from datainf.models.finetune import LoraSettings
    from datainf.models.llm import load_causal_lm, smollm2_dir

    path = out / "adapter"
    if (path / "adapter_config.json").exists():
        return path
    model, tokenizer = load_causal_lm(str(smollm2_dir()), LoraSettings(rank=8, alpha=32, target_modules=("q_proj", "v_proj"),
                                                                       modules_to_save=()), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def real_store(out: Path, adapter_dir: Path, model_dir: str, threads: int) -> Path:
    """A real projected store of 8 examples made with `datainf grads` (what the big store's manifest copies)."""
    path = out / "real-store"
    if (path / "manifest.json").exists():
        return path
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} times {b}?", "response": f"{a * b}."}) + "\n"
                            for a, b in zip(range(3, 11), range(7, 15))))
    run(["grads", "--model", model_dir, "--adapter", str(adapter_dir), "--data", str(data), "--store", str(path),
         "--task", "causal_lm", "--project", "64", "--dtype", "float16", "--device", "cpu"], threads)
    return path


def big_store(out: Path, rows_from: Path, real: Path) -> Path:
    """A store with ``rows_from``'s chunk files (hard links) and ``real``'s provenance; one record per row."""
    from datainf.store import GradientStore

    source, model = GradientStore.open(rows_from), GradientStore.open(real)
    if source.block_shapes != model.block_shapes:
        raise SystemExit(f"{rows_from} has blocks {list(source.block_shapes)[:2]}..., not the model's")
    path = out / f"store-{source.n_examples}"
    try:
        if GradientStore.open(path).n_examples == source.n_examples:
            return path
    except Exception:  # noqa: BLE001  (absent or unfinished: made again)
        shutil.rmtree(path, ignore_errors=True)
    manifest = json.loads((real / "manifest.json").read_text())
    with GradientStore.create(path, blocks=source.block_shapes, n_examples=source.n_examples,
                              fingerprints=manifest["fingerprints"], chunk_size=source.chunk_size,
                              dtype=source.storage_dtype, meta=manifest.get("meta"),
                              projection=manifest.get("projection")) as store:
        for chunk in sorted((rows_from / "chunks").iterdir()):
            if not chunk.is_dir() or chunk.name.startswith("."):
                continue
            (path / "chunks" / chunk.name).mkdir(parents=True)
            for f in chunk.iterdir():
                os.link(f, path / "chunks" / chunk.name / f.name)
        store.write_records({"prompt": f"synthetic training example {i}", "response": "(synthetic gradient row)"}
                            for i in range(source.n_examples))
        store.finalize()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-from", type=Path, required=True,
                        help="a synthetic projected store of SmolLM2's blocks (bench_store.py --pass --keep)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from datainf.models.llm import smollm2_dir

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = str(smollm2_dir())
    t0 = time.perf_counter()
    adapter_dir = adapter(args.out)
    real = real_store(args.out, adapter_dir, model_dir, args.threads)
    store = big_store(args.out, args.rows_from, real)
    index = args.out / f"{store.name}.index"
    if not (index / "manifest.json").exists() and not index.exists():
        build_s, _ = run(["index", "build", str(store), "--kind", "compact", "--out", str(index)], args.threads)
        print(f"index build (compact, first read of the store: every file hashed once): {build_s:.1f} s", flush=True)
    print(f"set-up {time.perf_counter() - t0:.0f} s; torch threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    base = ["explain", "--model", model_dir, "--adapter", str(adapter_dir), "--store", str(store),
            "--prompt", PROMPT, "--response", RESPONSE, "--k", "50", "--device", "cpu"]
    result = {}
    for label, extra in (("with the compact index", ["--method", "identity", "--index", str(index)]),
                         ("full warm pass, identity", ["--method", "identity"]),
                         ("full warm pass, ekfac (the default)", [])):
        run(base + extra, args.threads)  # warms the page cache (and fits EK-FAC's curvature once)
        times = [run(base + extra, args.threads)[0] for _ in range(args.repeats)]
        result[label] = times
        print(f"  explain, {label}: {min(times):.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}, each a fresh "
              "process)", flush=True)
    (args.out / "bench_explain.json").write_text(json.dumps(result, indent=1))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    for label, times in result.items():
        print(f"target explain end to end, {label}: {min(times):.2f} s (goal <= {GOAL_S:.0f} s) "
              f"{'PASS' if min(times) <= GOAL_S else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
