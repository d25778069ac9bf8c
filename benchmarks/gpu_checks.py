"""The GPU checks, as one prepared script for the few minutes a GPU machine is lent (it also runs on a CPU).

    python benchmarks/gpu_checks.py --device cuda --out "$OUT"           # the real run (about 3-5 minutes)
    python benchmarks/gpu_checks.py --device cpu --quick --out /tmp/gc   # smoke run, what the tests do

1. estimators: scores of datainf, exact, identity and lissa computed on ``--device`` in float32 from
   float32, float16 and bfloat16 gradients, against the same scores in float64 on the CPU (independent:
   another device, another precision). LoRA-shaped random blocks with a decaying spectrum.
2. gradients: per-example gradients on ``--device`` of the real MiniLM classifier and SmolLM2 causal LM
   (both offline assets) against a loop of single-example backward calls on the same device; then the
   model in bfloat16 against the float32 result (cosine similarity per example and block).
3. projection: per-example gradients projected inside the hooks (``ProjectionSettings``, k = 16) on
   ``--device`` in float32 against an explicit projection of float64 CPU gradients (a single-example
   backward loop on a float64 copy of the model): the projected path on the device, independently checked.
4. stores: float32, float16 and bfloat16 gradient stores (projected SmolLM2 block shapes) scored on
   ``--device`` (rows streamed from the store to the device chunk by chunk) against float64 CPU scores of
   the same stored values, for datainf, exact, identity and ekfac.
5. timings (printed as ratios measured in the same process): datainf / identity (one matmul pass is the
   floor; datainf needs three), exact's time; per-example gradients against a plain batched
   forward + backward (target <= 1.5x) and against the batch-size-1 loop (target >= 5x); the projected
   gradient pass against the unprojected one; a float16 store scored on the device (GB/s of stored bytes).

Writes ``gpu_checks.json`` into ``--out`` and prints a summary; exits 1 when a correctness check misses its
tolerance (the timings never fail the run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gradients as bg  # noqa: E402
import datainf  # noqa: E402
from datainf.gradients import per_example_gradients  # noqa: E402

METHODS = ("datainf", "exact", "identity", "lissa")
TOLERANCE = {"float32": 2e-3, "float16": 2e-3, "bfloat16": 2e-3}  # relative to max |reference score|
LISSA = {"iterations": 30, "scale": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _blocks(n: int, m: int, shapes: list[tuple[int, int]], seed: int = 0) -> tuple[dict, dict]:
    """Training (n) and query (m) gradients per block with a decaying spectrum, like real LoRA gradients."""
    g = torch.Generator().manual_seed(seed)
    train, query = {}, {}
    for i, (a, b) in enumerate(shapes):
        d = a * b
        rank = min(64, d)
        basis = torch.randn(rank, d, generator=g, dtype=torch.float64) / d**0.5
        spectrum = torch.logspace(0, -3, rank, dtype=torch.float64)
        train[f"block{i}"] = (torch.randn(n, rank, generator=g, dtype=torch.float64) * spectrum) @ basis
        query[f"block{i}"] = (torch.randn(m, rank, generator=g, dtype=torch.float64) * spectrum) @ basis
        train[f"block{i}"] += 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return train, query


def check_estimators(device: torch.device, quick: bool) -> dict[str, Any]:
    shapes = [(8, 64), (64, 8)] if quick else [(8, 1024), (1024, 8)] * 2
    n, m = (120, 6) if quick else (1000, 16)
    train, query = _blocks(n, m, shapes)
    out: dict[str, Any] = {"n_train": n, "n_query": m, "block_shapes": shapes, "methods": {}}
    for method in METHODS:
        opts = LISSA if method == "lissa" else {}
        res: dict[str, Any] = {}
        for dtype_name, dtype in (("float32", torch.float32), ("float16", torch.float16),
                                  ("bfloat16", torch.bfloat16)):
            stored = {k: v.to(dtype) for k, v in train.items()}  # what a float16/bfloat16 store holds
            stored_q = {k: v.to(dtype) for k, v in query.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lissa at 30 iterations warns that it has not converged
                ref = datainf.influence({k: v.double() for k, v in stored.items()},
                                        {k: v.double() for k, v in stored_q.items()}, method, dtype=torch.float64,
                                        **opts)
                got = datainf.influence({k: v.to(device) for k, v in stored.items()},
                                        {k: v.to(device) for k, v in stored_q.items()}, method,
                                        dtype=torch.float32, **opts)
            got = got.double().cpu()
            rel = float((got - ref).abs().max() / ref.abs().max())
            corr = float(torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1])
            res[dtype_name] = {"max_rel_error": rel, "pearson": corr, "ok": rel <= TOLERANCE[dtype_name]}
        out["methods"][method] = res
    return out


def _loop_grads(model: torch.nn.Module, batch: dict, task: str) -> dict[str, torch.Tensor]:
    """Per-example gradients by one backward call per example, padding removed (the independent reference),
    in the model's own dtype (float32 on the device; float64 for the CPU reference of the projection check)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    fn = bg.resolve_task(task)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k, _ in named}
    for i in range(batch["input_ids"].shape[0]):
        grads = torch.autograd.grad(fn(model, bg.one_example(batch, i)).sum(), [p for _, p in named])
        for (k, _), gr in zip(named, grads):
            rows[k].append(gr)
    return {k: torch.stack(v) for k, v in rows.items()}


def check_gradients(device: torch.device, quick: bool, models: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    batch_size = 4 if quick else 16
    for name in models:
        model, batches, task = {"minilm": bg._minilm, "smollm2": bg._smollm2}[name](batch_size, 1)
        model.to(device).eval()
        batch = {k: v.to(device) for k, v in batches[0].items()}
        ours = per_example_gradients(model, batch, task)
        ref = _loop_grads(model, batch, task)
        # each example's error against its own largest gradient entry over all blocks: a block that is zero in
        # exact arithmetic is then held to rounding relative to the example, not to its own noise
        scale = torch.stack([r.flatten(1).abs().max(dim=1).values for r in ref.values()]).max(dim=0).values
        errors = {}
        for k, r in ref.items():
            per_example = (ours[k] - r).flatten(1).abs().max(dim=1).values / scale.clamp_min(1e-30)
            errors[k] = float(per_example.max())
        worst = max(errors.values())
        entry: dict[str, Any] = {"task": task, "batch_size": batch_size, "blocks": len(errors),
                                 "max_rel_error_vs_loop": worst, "ok": worst <= 1e-3}
        try:  # the model in bfloat16: how far are its per-example gradients from float32's?
            model.to(torch.bfloat16)
            low = per_example_gradients(model, batch, task)
            cos = []
            for k, v in ours.items():
                a, b = v.flatten(1).double(), low[k].flatten(1).double()
                keep = a.norm(dim=1) > 0
                cos.append(torch.nn.functional.cosine_similarity(a[keep], b[keep], dim=1))
            cos_all = torch.cat(cos)
            entry["bfloat16_min_cosine"] = float(cos_all.min())
            entry["bfloat16_median_cosine"] = float(cos_all.median())
        except Exception as error:  # a finding, not a crash: say what bfloat16 did
            entry["bfloat16_error"] = f"{type(error).__name__}: {error}"
        finally:
            model.to(torch.float32)
        out[name] = entry
    return out


PROJECTION_DIM = 16
STORE_METHODS = ("datainf", "exact", "identity", "ekfac")


def check_projection(device: torch.device, quick: bool, models: list[str]) -> dict[str, Any]:
    """Projected per-example gradients on the device (float32) against the float64 CPU reference: the loop's
    full gradients of a float64 copy of the model, projected explicitly with the same matrices."""
    import copy

    from datainf.gradients import ProjectionSettings, project_gradient

    projection = ProjectionSettings(dim=PROJECTION_DIM, seed=0)
    out: dict[str, Any] = {"dim": PROJECTION_DIM}
    batch_size = 4 if quick else 8
    for name in models:
        model, batches, task = {"minilm": bg._minilm, "smollm2": bg._smollm2}[name](batch_size, 1)
        model.eval()
        reference_model = copy.deepcopy(model).double()
        batch = batches[0]
        full = _loop_grads(reference_model, batch, task)
        expected = {k: project_gradient(k, g, projection) for k, g in full.items()}
        del reference_model
        model.to(device)
        got = per_example_gradients(model, {k: v.to(device) for k, v in batch.items()}, task, projection=projection)
        scale = torch.stack([e.flatten(1).abs().max(dim=1).values for e in expected.values()]).max(dim=0).values
        worst = max(float(((got[k].double().cpu() - e).flatten(1).abs().max(dim=1).values
                           / scale.clamp_min(1e-30)).max()) for k, e in expected.items())
        shapes_ok = all(tuple(got[k].shape) == tuple(e.shape) for k, e in expected.items())
        out[name] = {"task": task, "blocks": len(expected), "max_rel_error_vs_float64": worst,
                     "numbers_per_example": sum(e[0].numel() for e in expected.values()),
                     "ok": worst <= 1e-3 and shapes_ok}
        model.to("cpu")
    return out


def _store_blocks(quick: bool) -> dict[str, tuple[int, ...]]:
    """SmolLM2's LoRA blocks (r=8, q_proj/v_proj), projected to k=64: A 8 x 64, B 64 x 8."""
    layers = 1 if quick else 4
    return {f"l{i}.{p}.{ab}": ((8, 64) if ab == "A" else (64, 8)) for i in range(layers) for p in ("q", "v")
            for ab in ("A", "B")}


def check_stores(device: torch.device, quick: bool, folder: Path) -> dict[str, Any]:
    """float32 / float16 / bfloat16 stores scored on the device against float64 CPU scores of the stored values."""
    from datainf.estimators import ScoreArguments
    from datainf.scoring import score_store
    from datainf.store import GradientStore

    shapes = _store_blocks(quick)
    n, m = (300, 4) if quick else (4000, 16)
    flat = [(a * b) for a, b in shapes.values()]
    train, query = _blocks(n, m, [(1, d) for d in flat], seed=2)
    train = {name: t.reshape(n, *shapes[name]) * 1e-2 for name, t in zip(shapes, train.values())}
    query = {name: t.reshape(m, *shapes[name]) * 1e-2 for name, t in zip(shapes, query.values())}
    out: dict[str, Any] = {"n_train": n, "n_query": m, "blocks": len(shapes), "dtypes": {}}
    for dtype in ("float32", "float16", "bfloat16"):
        path = folder / f"store-{dtype}"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        with GradientStore.create(path, blocks=shapes, n_examples=n, fingerprints={"model": "gpu-check"},
                                  chunk_size=max(n // 4, 1), dtype=dtype) as store:
            for c in range(store.num_chunks):
                rows = store.chunk_rows(c)
                store.write_chunk(c, {k: v[rows.start : rows.stop].float() for k, v in train.items()})
            store.finalize()
        store = GradientStore.open(path)
        stored = {k: store.load(k, dtype=torch.float64) for k in shapes}  # the rounded values, in float64
        res = {}
        for method in STORE_METHODS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extra = {}
                if method == "ekfac":
                    from datainf.estimators.kfac import curvature_from_gradients

                    extra["factors"] = curvature_from_gradients(stored)
                ref = datainf.influence(stored, {k: v.double() for k, v in query.items()}, method,
                                        dtype=torch.float64, **extra)
                got = score_store(store, {k: v.float() for k, v in query.items()},
                                  ScoreArguments(method=method, device=str(device), dtype="float32")).scores
            got = got.double().cpu()
            rel = float((got - ref).abs().max() / ref.abs().max())
            res[method] = {"max_rel_error": rel, "ok": rel <= TOLERANCE[dtype]}
        out["dtypes"][dtype] = res
    return out


def _time(fn, device: torch.device, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def timings(device: torch.device, quick: bool, models: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shapes = [(8, 64), (64, 8)] if quick else [(8, 1024), (1024, 8)] * 6  # 12 RoBERTa-large r=8 blocks
    n, m = (200, 8) if quick else (4000, 100)
    train, query = _blocks(n, m, shapes, seed=1)
    train = {k: v.float().to(device) for k, v in train.items()}
    query = {k: v.float().to(device) for k, v in query.items()}
    est = {meth: _time(lambda meth=meth: datainf.influence(train, query, meth), device) for meth in
           ("identity", "datainf", "exact")}
    out["estimators"] = {"n_train": n, "n_query": m, "blocks": len(shapes), "seconds": est,
                         "datainf_over_identity": est["datainf"] / est["identity"]}
    batch_size = 4 if quick else 32
    for name in models:
        model, batches, task = {"minilm": bg._minilm, "smollm2": bg._smollm2}[name](batch_size, 2)
        out[name] = {"batch_size": batch_size, **_time_gradients(model, batches, task, device)}
        out[name]["projection"] = _time_projection(model, batches, task, device)
    out["store_scoring"] = _time_store_scoring(device, quick)
    return out


def _time_projection(model: torch.nn.Module, batches: list[dict], task: str, device: torch.device) -> dict:
    """The hooks with and without a k = 64 projection (same model, same batches)."""
    from datainf.gradients import ProjectionSettings

    projection = ProjectionSettings(dim=64, seed=0)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    t_full = _time(lambda: [per_example_gradients(model, b, task) for b in batches], device)
    t_proj = _time(lambda: [per_example_gradients(model, b, task, projection=projection) for b in batches], device)
    return {"full_s": t_full, "projected_s": t_proj, "projected_over_full": t_proj / t_full}


def _time_store_scoring(device: torch.device, quick: bool) -> dict:
    """A float16 store of projected SmolLM2 blocks scored on the device: seconds and stored GB/s, 1 and 100
    queries (rows read from the page cache, streamed to the device chunk by chunk)."""
    import tempfile

    from datainf.estimators import ScoreArguments
    from datainf.scoring import score_store
    from datainf.store import GradientStore

    shapes = {f"l{i}.{p}.{ab}": ((8, 64) if ab == "A" else (64, 8)) for i in range(30) for p in ("q", "v")
              for ab in ("A", "B")}
    n = 2000 if quick else 50_000
    out = {"n_train": n, "blocks": len(shapes)}
    with tempfile.TemporaryDirectory() as tmp:
        gen = torch.Generator().manual_seed(0)
        with GradientStore.create(Path(tmp) / "s", blocks=shapes, n_examples=n, fingerprints={"model": "t"},
                                  chunk_size=2048, dtype="float16") as store:
            for c in range(store.num_chunks):
                rows = len(store.chunk_rows(c))
                store.write_chunk(c, {k: torch.randn(rows, *s, generator=gen) * 1e-2 for k, s in shapes.items()})
            store.finalize()
        store = GradientStore.open(Path(tmp) / "s")
        size = sum(p.stat().st_size for p in (Path(tmp) / "s" / "chunks").rglob("*.npy"))
        for m in (1, 100):
            queries = {k: torch.randn(m, *s, generator=gen) * 1e-2 for k, s in shapes.items()}
            for method in ("identity", "datainf"):
                args = ScoreArguments(method=method, device=str(device), chunk_size=8192)
                seconds = _time(lambda q=queries, a=args: score_store(store, q, a), device, repeats=1)
                out[f"{method}_{m}q_s"] = seconds
                out[f"{method}_{m}q_gb_s"] = size / seconds / 1e9
    return out


def _time_gradients(model: torch.nn.Module, batches: list[dict], task: str, device: torch.device) -> dict:
    model.to(device).eval()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    t_floor = _time(lambda: [bg._floor(model, b, task) for b in batches], device)
    t_ours = _time(lambda: [per_example_gradients(model, b, task) for b in batches], device)
    t_loop = _time(lambda: bg._loop(model, batches[0], task), device, repeats=1) * len(batches)
    return {"examples": sum(b["input_ids"].shape[0] for b in batches), "floor_s": t_floor, "ours_s": t_ours,
            "loop_s": t_loop, "ours_over_floor": t_ours / t_floor, "loop_over_ours": t_loop / t_ours}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="runs/gpu_checks")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke run)")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--skip-timings", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    models = [m for m in args.models.split(",") if m]
    result: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    t0 = time.perf_counter()
    result["estimators"] = check_estimators(device, args.quick)
    result["gradients"] = check_gradients(device, args.quick, models)
    result["projection"] = check_projection(device, args.quick, models)
    result["stores"] = check_stores(device, args.quick, Path(args.out))
    if not args.skip_timings:
        result["timings"] = timings(device, args.quick, models)
    result["seconds"] = time.perf_counter() - t0
    failed = [f"estimator {m} {d}" for m, r in result["estimators"]["methods"].items() for d, e in r.items()
              if not e["ok"]] + [f"gradients {k}" for k, e in result["gradients"].items() if not e["ok"]]
    failed += [f"projection {k}" for k, e in result["projection"].items() if isinstance(e, dict) and not e["ok"]]
    failed += [f"store {d} {m}" for d, r in result["stores"]["dtypes"].items() for m, e in r.items() if not e["ok"]]
    result["failed"] = failed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=2))
    print(f"{result['device_name']} ({device}), torch {torch.__version__}, {result['seconds']:.0f} s")
    for m, r in result["estimators"]["methods"].items():
        print(f"  {m:<9} " + "  ".join(f"{d}: rel err {e['max_rel_error']:.1e}" for d, e in r.items()))
    for k, e in result["gradients"].items():
        bf16 = e.get("bfloat16_error") or f"bf16 cosine min {e['bfloat16_min_cosine']:.4f}"
        print(f"  grads {k:<8} rel err vs loop {e['max_rel_error_vs_loop']:.1e}; {bf16}")
    for k in models:
        e = result["projection"][k]
        print(f"  projected grads {k:<8} (k={PROJECTION_DIM}) rel err vs float64 CPU {e['max_rel_error_vs_float64']:.1e}")
    for d, r in result["stores"]["dtypes"].items():
        print(f"  {d:<8} store " + "  ".join(f"{m}: {e['max_rel_error']:.1e}" for m, e in r.items()))
    if "timings" in result:
        t = result["timings"]
        print(f"  datainf / identity = {t['estimators']['datainf_over_identity']:.2f}x "
              f"({t['estimators']['seconds']})")
        for k in models:
            print(f"  {k}: ours / floor = {t[k]['ours_over_floor']:.2f}x, loop / ours = {t[k]['loop_over_ours']:.1f}x, "
                  f"projected (k=64) / full = {t[k]['projection']['projected_over_full']:.2f}x")
        st = t["store_scoring"]
        print(f"  float16 store, {st['n_train']} x {st['blocks']} blocks: identity 1 query {st['identity_1q_gb_s']:.2f} "
              f"GB/s, datainf 100 queries {st['datainf_100q_s']:.2f} s")
    print("FAILED: " + "; ".join(failed) if failed else "all correctness checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
