"""The public gradient collector and the streaming store writer (issue 30, first item).

GradientCollector: the caller runs its own forward and ``loss.backward()`` (as a Trainer's step does) inside
the collector; ``take()`` must equal a loop of single-example backward calls on the UNPADDED examples
(tests/test_gradients.py's independent reference losses), projected by hand with the projection's matrices
where a projection is asked (tests/test_projection.py's ``explicit_projection``). Models run in float64, so the
bound is tests/reference.py's FLOAT64_TOL; a leaked padding position, a missed call or a wrong side of the
projection is O(1e-2) of the largest entry or more.

StreamingWriter: a store written from rows in ragged batches (1, 3, 7, ...; in row order and shuffled) must be
byte-identical, file by file, to the same rows written the old way (``GradientStore.create`` +
``write_chunk`` per whole chunk); a writer killed (SIGKILL) half-way keeps the chunks it committed, untouched,
and a resumed writer finishes the same store.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import datainf  # noqa: E402
from datainf.collector import GradientCollector, ProjectionSettings  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.store import GradientStore, StreamingWriter  # noqa: E402
from datainf.tasks import per_example_loss  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to, assert_per_example_close  # noqa: E402
from test_gradients import reference_gradients  # noqa: E402
from test_projection import explicit_projection  # noqa: E402
from tiny_models import (  # noqa: E402
    random_causal_lm_batch,
    random_classification_batch,
    tiny_bert_classifier,
    tiny_llama_causal_lm,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------------------------ collector


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_classifier(num_labels=3).double()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_causal_lm().double()


def caller_step(model, batch, task):
    """What a training loop does: one forward of the padded batch, its SUMMED per-example loss, backward()."""
    model.zero_grad(set_to_none=True)
    per_example_loss(task, model, batch).sum().backward()


@pytest.mark.parametrize("project", [False, True], ids=["full", "projected"])
@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_collector_equals_a_loop_of_single_example_backwards(bert, llama, task, project):
    model = bert if task == "classification" else llama
    batch = (random_classification_batch(5, num_labels=3, seed=21) if task == "classification"
             else random_causal_lm_batch(5, padding="left", seed=22))
    projection = ProjectionSettings(dim=8, seed=3) if project else None
    expected = reference_gradients(model, batch, task)
    with GradientCollector(model, projection=projection) as collector:
        caller_step(model, batch, task)
        actual = collector.take()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert all(a.dtype == torch.float64 for a in actual.values())
    if projection is not None:
        # the hooks never form the full gradient: compare with the full loop gradients projected by hand
        assert any(tuple(a.shape[1:]) != tuple(e.shape[1:]) for a, e in zip(actual.values(), expected.values()))
        expected = explicit_projection(expected, projection)
    assert_per_example_close(actual, expected)
    # the caller's own backward is untouched: its .grad is the batch sum of the loop's gradients
    full = reference_gradients(model, batch, task)
    for name, g in grads.items():
        assert_close_to(g, full[name].sum(dim=0), what=name)


def test_float32_collector_is_within_float32_rounding_of_the_float64_loop():
    """The float32 path a training loop runs: float32 rows within FLOAT32_TOL (tests/reference.py: under 1e4
    accumulated terms at 6e-8 each) of the float64 loop on the same weights; a leaked pad is O(1e-1) off."""
    model = tiny_llama_causal_lm()
    batch = random_causal_lm_batch(4, padding="right", seed=23)
    with GradientCollector(model) as collector:
        caller_step(model, batch, "causal_lm")
        actual = collector.take()
    assert all(a.dtype == torch.float32 for a in actual.values())
    expected = reference_gradients(tiny_llama_causal_lm().double(), batch, "causal_lm")
    assert_per_example_close(actual, expected, tol=FLOAT32_TOL)


def test_collector_under_bfloat16_autocast_as_a_mixed_precision_step_runs():
    """A Trainer's bf16 step: float32 weights, Linear layers run in bfloat16 under autocast. The rows come back
    in float32, within bfloat16's rounding of the float64 loop (8-bit mantissa, 4e-3 per operation over a few
    dozen accumulated terms: 5e-2 of the largest entry), and the batch-gradient check accepts them."""
    model = tiny_bert_classifier(num_labels=3)
    batch = random_classification_batch(4, num_labels=3, seed=24)
    with GradientCollector(model) as collector:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").backward()
        actual = collector.take()
    assert all(a.dtype == torch.float32 for a in actual.values())
    expected = reference_gradients(tiny_bert_classifier(num_labels=3).double(), batch, "classification")
    assert_per_example_close(actual, expected, tol=5e-2)


def test_collector_gives_each_batch_of_a_loop_its_own_gradients(llama):
    """Several steps inside one collector (a training loop): each take() is that batch's rows only."""
    batches = [random_causal_lm_batch(b, padding="right", seed=30 + b) for b in (3, 1, 4)]
    with GradientCollector(llama, group_lora=True) as collector:
        taken = []
        for batch in batches:
            caller_step(llama, batch, "causal_lm")
            taken.append(collector.take())
        with torch.no_grad():  # an evaluation forward is not recorded
            per_example_loss("causal_lm", llama, batches[0])
    llama.zero_grad(set_to_none=True)
    for batch, actual in zip(batches, taken):
        expected = datainf.per_example_gradients(llama, batch, "causal_lm", group_lora=True)
        reference = reference_gradients(llama, batch, "causal_lm")
        assert list(actual) == list(expected) and all(name.endswith(".lora") for name in actual)
        for name in actual:  # the grouped block of the loop's A and B
            module = name[: -len(".lora")]
            parts = [g.flatten(1) for n, g in reference.items() if n.startswith(module + ".lora_")]
            assert_close_to(actual[name], torch.cat(parts, dim=1), what=name)


def test_collector_refuses_what_it_cannot_give(bert):
    batch = random_classification_batch(3, num_labels=3, seed=40)
    with GradientCollector(bert) as collector:
        with pytest.raises(DataInfError, match="no backward pass"):
            collector.take()
        caller_step(bert, batch, "classification")
        caller_step(bert, batch, "classification")  # two backward passes, no take() between them
        with pytest.raises(DataInfError, match="several backward passes"):
            collector.take()
    with pytest.raises(DataInfError, match="outside"):
        collector.take()
    bert.zero_grad(set_to_none=True)
    lora_a = next(p for n, p in bert.named_parameters() if "lora_A" in n)
    lora_a.requires_grad_(False)
    try:
        with pytest.raises(DataInfError, match="does not require a gradient"):
            GradientCollector(bert, params={"a": lora_a}).__enter__()
    finally:
        lora_a.requires_grad_(True)


class ScaledLinear(torch.nn.Module):
    """An nn.Linear (hooked) times a raw parameter (no hook can see it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2).double()
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_collector_refuses_a_parameter_no_hook_sees_unless_partial():
    model = ScaledLinear()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with GradientCollector(model) as collector:
        assert collector.uncovered == ["scale"]
        model(x).pow(2).sum().backward()
        with pytest.raises(DataInfError, match="per-example gradients of scale cannot be collected"):
            collector.take()
        model(x).pow(2).sum().backward()
        partial = collector.take(partial=True)
    assert list(partial) == ["linear.weight", "linear.bias"]
    for i in range(4):  # each row: the gradient of example i's own loss
        w, b = torch.autograd.grad(model(x[i:i + 1]).pow(2).sum(), [model.linear.weight, model.linear.bias])
        assert_close_to(partial["linear.weight"][i], w, what=f"weight {i}")
        assert_close_to(partial["linear.bias"][i], b, what=f"bias {i}")


def test_per_example_gradients_runs_inside_the_collector(bert, monkeypatch):
    """One implementation: per_example_gradients' fast path is the collector's take()."""
    calls = []
    take = GradientCollector.take

    def spy(self, **kwargs):
        calls.append(kwargs)
        return take(self, **kwargs)

    monkeypatch.setattr(GradientCollector, "take", spy)
    datainf.per_example_gradients(bert, random_classification_batch(4, num_labels=3, seed=41))
    assert len(calls) == 1 and calls[0]["batch_size"] == 4 and calls[0]["partial"] is True


# ------------------------------------------------------------------------------------------------ streaming writer

N, CHUNK = 23, 5
BLOCKS = {"a": (2, 3), "b": (4,)}
FINGERPRINTS = {"model": "m", "adapter": "a", "task": "t", "dataset": "d"}


def rows_of(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The gradients of all N rows, reproducible (the killed child process draws the same)."""
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(N, *shape, generator=generator, dtype=torch.float64).to(dtype)
            for name, shape in BLOCKS.items()}


def spec(dtype: str = "float32") -> dict:
    return {"blocks": BLOCKS, "n_examples": N, "fingerprints": FINGERPRINTS, "chunk_size": CHUNK, "dtype": dtype,
            "meta": {"task": "t"}}


def old_way(path: Path, dtype: str = "float32") -> GradientStore:
    """The store written as before: whole chunks in row order, then records and finalize."""
    grads = rows_of()
    store = GradientStore.create(path, **spec(dtype))
    for c in range(store.num_chunks):
        rows = store.chunk_rows(c)
        store.write_chunk(c, {name: g[rows.start:rows.stop] for name, g in grads.items()})
    store.write_records(records())
    store.finalize()
    store.close()
    return GradientStore.open(path)


def records() -> list[dict]:
    return [{"text": f"example {i}"} for i in range(N)]


def ragged(order: list[int]) -> list[list[int]]:
    """``order`` cut into batches of 1, 3, 7, 1, 3, 7, ..."""
    out, start, sizes = [], 0, [1, 3, 7]
    while start < len(order):
        size = sizes[len(out) % 3]
        out.append(order[start:start + size])
        start += size
    return out


def files(path: Path) -> dict[str, str]:
    """sha256 of every file of a store, by path inside it (the writer's lock file aside)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name not in ("lock", ".writer.lock")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "shuffled"])
def test_ragged_batches_write_the_same_store(tmp_path, dtype, shuffled):
    reference = old_way(tmp_path / "old", dtype)
    order = list(range(N))
    if shuffled:
        order = torch.randperm(N, generator=torch.Generator().manual_seed(3)).tolist()
    grads = rows_of()
    with StreamingWriter.create(tmp_path / "new", **spec(dtype)) as writer:
        assert writer.pending() == [range(0, N)]
        for batch in ragged(order):
            writer.add(batch, {name: g[batch] for name, g in grads.items()})
        store = writer.finish(records())
    expected, actual = files(tmp_path / "old"), files(tmp_path / "new")
    assert len(expected) == 2 + 4 * reference.num_chunks  # manifest, records; per chunk: 2 blocks, norms, chunk.json
    assert actual == expected
    for name in BLOCKS:
        assert torch.equal(store.load(name), reference.load(name))
    GradientStore.open(tmp_path / "new").verify()


def test_streaming_writer_refuses_bad_rows_and_keeps_nothing_of_them(tmp_path):
    grads = rows_of()
    with StreamingWriter.create(tmp_path / "s", **spec()) as writer:
        writer.add(range(0, 3), {name: g[0:3] for name, g in grads.items()})
        bad = {name: g[3:5].clone() for name, g in grads.items()}
        bad["b"][1, 2] = float("nan")
        with pytest.raises(DataInfError, match="block 'b', example 4 has a NaN"):
            writer.add(range(3, 5), bad)
        with pytest.raises(DataInfError, match="row 2 was given already"):
            writer.add([2, 3], {name: g[2:4] for name, g in grads.items()})
        with pytest.raises(DataInfError, match="expected blocks"):
            writer.add(range(3, 5), {"a": grads["a"][3:5]})
        with pytest.raises(DataInfError, match="outside the store"):
            writer.add([N], {name: g[:1] for name, g in grads.items()})
        with pytest.raises(DataInfError, match="has shape"):
            writer.add(range(3, 5), {"a": grads["a"][3:5], "b": grads["b"][3:6]})
        assert writer.pending()[0] == range(3, N) and writer.buffered_rows == 3
        with pytest.raises(DataInfError, match="chunk 0 lacks rows"):
            writer.finish()
        assert writer.add(range(3, 5), {name: g[3:5] for name, g in grads.items()}) == [0]
        assert writer.store.missing_chunks() == list(range(1, 5))


def test_a_new_store_refused_before_its_first_chunk_leaves_nothing(tmp_path):
    grads = rows_of()
    grads["a"][1, 0, 0] = float("inf")
    with pytest.raises(DataInfError, match="block 'a', example 1 has a NaN or infinite"):
        with StreamingWriter.create(tmp_path / "s", **spec()) as writer:
            writer.add(range(0, 3), {name: g[0:3] for name, g in grads.items()})
    assert not (tmp_path / "s").exists()


CHILD = """
import os, signal, sys
sys.path.insert(0, {src!r})
import torch
from datainf.store import StreamingWriter
grads = torch.load({rows!r})
writer = StreamingWriter.create({path!r}, **{spec!r})
given = 0
for batch in {batches!r}:
    if given >= {stop}:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-chunk: no finish, no close, the lock left behind
    writer.add(batch, {{name: g[batch] for name, g in grads.items()}})
    given += len(batch)
"""


def test_killed_writer_keeps_its_chunks_and_resumes_to_the_same_store(tmp_path):
    path = tmp_path / "s"
    torch.save(rows_of(), tmp_path / "rows.pt")
    code = CHILD.format(src=str(SRC), rows=str(tmp_path / "rows.pt"), path=str(path), spec=spec(),
                        batches=ragged(list(range(N))), stop=12)  # rows 0..11 given: chunks 0 and 1 complete
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    committed = files(path)
    assert sorted({Path(p).parts[1] for p in committed if p.startswith("chunks/")}) == ["00000", "00001"]
    grads = rows_of()
    with StreamingWriter.create(path, **spec()) as writer:
        assert writer.kept == [0, 1]
        assert writer.pending() == [range(10, N)]  # rows 10 and 11 were held in memory: lost, given again
        for batch in ragged(list(range(N))):  # the whole data again: rows of the kept chunks are skipped
            writer.add(batch, {name: g[batch] for name, g in grads.items()})
        writer.finish(records())
    resumed = files(path)
    assert {p: h for p, h in resumed.items() if p in committed and p.startswith("chunks/")} == {
        p: h for p, h in committed.items() if p.startswith("chunks/")}
    assert resumed == files(old_way(tmp_path / "old").path)


def test_grads_command_writes_through_the_streaming_writer(tmp_path, sentence_records, monkeypatch):
    """`datainf grads` -> Attributor.fit -> distributed.write_store -> StreamingWriter.add (a spy counts the
    rows), and the store equals the per-example gradients computed directly."""
    from datainf.store import streaming

    added = []
    add = streaming.StreamingWriter.add

    def spy(self, rows, grads):
        added.extend(rows)
        return add(self, rows, grads)

    monkeypatch.setattr(streaming.StreamingWriter, "add", spy)
    model = tiny_bert_classifier(num_labels=2).double()
    batch = random_classification_batch(7, num_labels=2, seed=50)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(7)]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    attributor = datainf.Attributor(model, store=tmp_path / "s", collate=collate, batch_size=3, chunk_size=4,
                                    store_dtype="float64", progress=False)
    store = attributor.fit(examples)
    assert sorted(added) == list(range(7))
    expected = datainf.per_example_gradients(model, batch)
    for name in store.block_names:
        assert_close_to(store.load(name).reshape(7, -1), expected[name].reshape(7, -1), what=name)
