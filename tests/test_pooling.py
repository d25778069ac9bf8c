"""The mean-pooling classifier head (load_classifier(pooling="mean")), its adapter round trip, the head's own
learning rate, and the grid's refusal of a cached run made with other settings.

References are independent of the code under test: the mean of the UNPADDED example's last hidden states
fed to the classifier by hand, and a loop of single-example backward calls, in float64 (tests/reference.py's
FLOAT64_TOL bounds the rounding). What they catch: padding tokens leaking into the mean, the head reading
[CLS] or the pooler instead of the mean, a missed module in the gradient hooks (all O(1e-2) of the largest
entry or more).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from datainf.errors import DataInfError  # noqa: E402
from datainf.gradients import per_example_gradients  # noqa: E402
from datainf.models.finetune import (  # noqa: E402
    HEAD_FILE,
    LoraSettings,
    TrainSettings,
    encode,
    finetune_classifier,
    load_adapter,
    load_classifier,
    save_adapter,
)
from reference import FLOAT64_TOL, assert_close_to, assert_per_example_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXTS = ["a gorgeous, witty and moving film", "dull", "one of the best films of the year, truly", "a mess"]


def _mean_model(folder, seed=0):
    model, tok = load_classifier(folder, num_labels=3, lora=LoraSettings(rank=2), seed=seed, pooling="mean")
    for name, p in model.named_parameters():       # LoRA B starts at zero: give it weight so LoRA matters
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.double().eval(), tok


def _batch(tok, texts, labels):
    return encode(tok, [{"text": t, "label": y} for t, y in zip(texts, labels)], 32)


def test_mean_pooling_logits_are_the_head_of_the_mean_unpadded_token_state(tiny_bert_dir):
    model, tok = _mean_model(tiny_bert_dir)
    base = model.get_base_model()
    assert type(base).__name__ == "MeanPoolingBertForSequenceClassification" and base.bert.pooler is None
    batch = _batch(tok, TEXTS, [0, 1, 2, 0])
    assert batch["attention_mask"].sum(1).unique().numel() > 1            # padded: uneven lengths
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, text in enumerate(TEXTS):
            alone = tok(text, return_tensors="pt")                          # no padding at all
            states = base.bert(**alone).last_hidden_state[0]                # (T, H)
            expected = base.classifier(states.mean(0, keepdim=True))[0]     # by hand: mean, then the head
            assert_close_to(logits[i], expected, tol=FLOAT64_TOL)
            cls_only = base.classifier(states[:1])[0]
            assert (cls_only - expected).abs().max() > 1e-3                 # the [CLS] state would differ


def test_mean_pooling_per_example_gradients_match_a_loop_of_single_example_backward_calls(tiny_bert_dir):
    model, tok = _mean_model(tiny_bert_dir)
    labels = [0, 1, 2, 1]
    batch = _batch(tok, TEXTS, labels)
    actual = per_example_gradients(model, batch, "classification")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: [] for n in params}
    for text, y in zip(TEXTS, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(**tok(text, return_tensors="pt")).logits, torch.tensor([y])).backward()
        for n, p in params.items():
            rows[n].append(p.grad.detach().clone())
    expected = {n: torch.stack(r) for n, r in rows.items()}
    assert set(actual) == set(expected) and any("classifier" in n for n in actual)
    assert_per_example_close(actual, expected)


def test_adapter_round_trip_keeps_the_pooling_and_an_adapter_without_the_head_file_loads_the_stock_head(
        tiny_bert_dir, tmp_path):
    model, tok = load_classifier(tiny_bert_dir, num_labels=2, lora=LoraSettings(rank=2), seed=0, pooling="mean")
    records = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS * 4)]
    finetune_classifier(model, tok, records, TrainSettings(epochs=1, learning_rate=1e-2, batch_size=4),
                        progress=False)
    folder = save_adapter(model, tmp_path / "adapter")
    assert json.loads((folder / HEAD_FILE).read_text()) == {"pooling": "mean"}
    inputs = {k: v for k, v in _batch(tok, TEXTS, [0, 1, 0, 1]).items() if k != "labels"}
    with torch.no_grad():
        before = model.eval()(**inputs).logits
        for trainable in (False, True):
            again, _ = load_adapter(tiny_bert_dir, folder, 2, is_trainable=trainable)
            # the same weights through the same kernels: equal up to float32 rounding of one forward pass
            assert_close_to(again.eval()(**inputs).logits, before, tol=1e-5)
        (folder / HEAD_FILE).unlink()                       # an adapter of transformers' stock head
        stock, _ = load_adapter(tiny_bert_dir, folder, 2)
        assert stock.get_base_model().bert.pooler is not None
        assert (stock.eval()(**inputs).logits - before).abs().max() > 1e-3


def test_unknown_pooling_is_refused(tiny_bert_dir):
    with pytest.raises(DataInfError, match="pooling must be one of mean, pooler"):
        load_classifier(tiny_bert_dir, num_labels=2, pooling="cls")


def test_head_learning_rate_moves_only_the_head(tiny_bert_dir):
    """A LoRA rate of 1e-12 and a head rate of 1e-2: after a few AdamW steps (each moves a parameter by about
    its rate) the LoRA matrices are where they started to 1e-9 and the head has moved by far more."""
    model, tok = load_classifier(tiny_bert_dir, num_labels=2, lora=LoraSettings(rank=2), seed=0, pooling="mean")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    records = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS * 2)]
    finetune_classifier(model, tok, records, TrainSettings(epochs=2, learning_rate=1e-12, batch_size=4,
                                                           head_learning_rate=1e-2, warmup_ratio=0.0),
                        progress=False)
    moved = {n: float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    assert all(v < 1e-9 for n, v in moved.items() if "lora_" in n), moved
    assert max(v for n, v in moved.items() if "lora_" not in n) > 1e-3, moved


def test_grid_refuses_a_cached_run_made_with_other_settings(tmp_path):
    from datainf.experiments.classification import run_grid
    from datainf.experiments.mislabeled import MislabeledSettings

    run_dir = tmp_path / "runs" / "rotten_tomatoes-r4-value-s0"
    run_dir.mkdir(parents=True)
    saved = {"settings": {"dataset": "rotten_tomatoes", "rank": 4, "target_modules": ["value"], "seed": 0,
                          "pooling": "pooler", "methods": ["identity"]}}
    (run_dir / "results.json").write_text(json.dumps(saved))
    before = (run_dir / "results.json").read_bytes()
    base = MislabeledSettings(pooling="mean", methods=("identity",))
    with pytest.raises(DataInfError, match="pooling='pooler', this grid asks for 'mean'"):
        run_grid(base, ["rotten_tomatoes"], [4], [0], tmp_path, progress=False)
    assert (run_dir / "results.json").read_bytes() == before
    # the same settings are reused as they are (a run saved before `pooling` existed is at its default)
    del saved["settings"]["pooling"]
    (run_dir / "results.json").write_text(json.dumps(saved))
    runs = run_grid(MislabeledSettings(methods=("identity",)), ["rotten_tomatoes"], [4], [0], tmp_path,
                    progress=False)
    assert runs == [saved]
