"""Diffusion task: per-example gradients of the fixed-timestep denoising loss on tiny random UNets (both
diffusers UNet kinds, LoRA through PEFT), the images, the metrics and a tiny end-to-end experiment run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import datainf.gradients as gradients_module  # noqa: E402
from datainf.cli.experiment.diffusion import commands  # noqa: E402
from datainf.data.collate import DiffusionCollate  # noqa: E402
from datainf.data.images import apply_style, load_mnist, style_sets, subject_sets  # noqa: E402
from datainf.errors import DataInfError  # noqa: E402
from datainf.experiments.diffusion import (  # noqa: E402
    DiffusionSettings,
    attribution_metrics,
    run_diffusion,
)
from datainf.gradients import per_example_gradients  # noqa: E402
from datainf.models.diffusion import PromptEncoder, add_lora  # noqa: E402
from datainf.scoring import load_scores  # noqa: E402
from datainf.tasks import DiffusionLoss  # noqa: E402
from reference import FLOAT32_TOL, assert_close_to, assert_per_example_close  # noqa: E402

TIMESTEPS = (25, 925)


def _randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def tiny_text_unet(cross_dim: int = 12, size: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=4, norm_num_groups=4, cross_attention_dim=cross_dim)


def tiny_class_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=4, norm_num_groups=4, num_class_embeds=3)


def _batch(kind: str, size: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    batch = {"pixel_values": torch.randn(size, 1, 8, 8, generator=g).to(dtype),
             "seed": torch.tensor([7, 3, 11, 2][:size])}
    if kind == "text":
        batch["encoder_hidden_states"] = torch.randn(size, 5, 12, generator=g).to(dtype)
    else:
        batch["class_labels"] = torch.tensor([0, 2, 1, 1][:size])
    return batch


def _model(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = add_lora(tiny_text_unet() if kind == "text" else tiny_class_unet(), rank=2)
    _randomize_lora_b(model)
    return model.to(dtype)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_per_example_gradients_match_a_loop_of_single_example_backward_calls(kind, monkeypatch):
    """float64 UNet and batch: hooks and loop agree to rounding (tests/reference.py). A missed call of a
    LoRA module (one timestep or noise draw of the several the loss runs) is an O(1/len(TIMESTEPS)) error."""
    model = _model(kind, torch.float64)
    draws = 2 if kind == "class" else 1
    task = DiffusionLoss(DDPMScheduler(num_train_timesteps=1000), TIMESTEPS, noise_draws=draws, seed=4)
    batch = _batch(kind, size=2, dtype=torch.float64)

    def no_fallback(*args, **kwargs):
        raise AssertionError("a LoRA parameter fell back to the slow loop: hooks did not cover repeated calls")

    monkeypatch.setattr(gradients_module, "_loop_path", no_fallback)
    grads = per_example_gradients(model, batch, task)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_names = [n for n in params if "lora_" in n]
    assert len(lora_names) == len(params) > 0
    # the UNet runs once per timestep and draw: every LoRA module is called several times per loss
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for i in range(2):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        loss = task(model, example)
        assert loss.dtype == torch.float64
        for name, ref in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            rows[name].append(ref)
    assert all(g.dtype == torch.float64 for g in grads.values())
    assert_per_example_close(grads, {name: torch.stack(r) for name, r in rows.items()})


def test_loss_is_a_per_example_function_of_its_seed():
    """float64: the same example gives the same loss alone, in a batch and in another batch order (to
    rounding); another seed draws other noise, an O(1) change."""
    model = _model("class", torch.float64)
    task = DiffusionLoss(DDPMScheduler(num_train_timesteps=1000), TIMESTEPS, seed=0)
    batch = _batch("class", dtype=torch.float64)
    with torch.no_grad():
        together = task(model, batch)
        alone = torch.stack([task(model, {k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(3)])
        reversed_batch = {k: v.flip(0) for k, v in batch.items()}
        flipped = task(model, reversed_batch).flip(0)
        other_seed = task(model, dict(batch, seed=batch["seed"] + 100))
    assert_close_to(together, alone, what="batch vs alone")
    assert_close_to(together, flipped, what="batch vs reversed batch")
    assert float((together - other_seed).abs().max()) > 1e-3 * float(together.abs().max())


def test_loss_matches_the_ddpm_formula_written_out():
    """float64 model and batch; the DDPM schedule is defined in float32 (diffusers builds its betas with
    linspace in float32), so the reference rebuilds it the same way. A wrong timestep, a noise drawn from
    the wrong seed or a missing square root is an O(1e-1) error, far above float64 rounding."""
    model = _model("class", torch.float64)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    task = DiffusionLoss(scheduler, (25, 725), noise_draws=1, seed=2)
    batch = _batch("class", size=2, dtype=torch.float64)
    with torch.no_grad():
        got = task(model, batch)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
        alpha_bar = torch.cumprod(1 - betas, 0).double()
        expected = []
        for i in range(2):
            generator = torch.Generator().manual_seed(2 * 1_000_003 + int(batch["seed"][i]))
            noise = torch.randn(1, 2, 1, 8, 8, generator=generator)[0].double()
            x0 = batch["pixel_values"][i : i + 1]
            total = 0.0
            for k, t in enumerate((25, 725)):
                a = alpha_bar[t]
                noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise[k : k + 1]
                pred = model(noisy, torch.tensor([t]), class_labels=batch["class_labels"][i : i + 1]).sample
                total += float(((pred - noise[k : k + 1]) ** 2).mean())
            expected.append(total / 2)
    assert_close_to(got, torch.tensor(expected, dtype=torch.float64), what="denoising loss")


def test_bad_input_raises_datainf_error():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(DataInfError, match="outside"):
        DiffusionLoss(scheduler, (25, 1000))
    with pytest.raises(DataInfError, match="pixel_values"):
        DiffusionLoss(scheduler)(_model("class"), {"class_labels": torch.tensor([0])})
    with pytest.raises(DataInfError, match="seed"):
        DiffusionCollate()([{"image": torch.zeros(1, 8, 8), "class_label": 0}])
    with pytest.raises(DataInfError, match="style"):
        apply_style(torch.zeros(1, 1, 8, 8), "watercolour")
    with pytest.raises(DataInfError, match="experiment"):
        DiffusionSettings(experiment="colour")


def test_styles_and_subject_sets():
    images, labels = load_mnist(16)
    assert images.shape == (5000, 1, 16, 16) and labels.shape == (5000,)
    assert 0 <= images.min() and images.max() <= 1 and set(labels.tolist()) == set(range(10))
    x = images[:4]
    torch.testing.assert_close(apply_style(x, "inverted"), 1 - x)
    pixel = apply_style(x, "pixel")
    blocks = pixel.unfold(2, 4, 4).unfold(3, 4, 4)  # (N, 1, 4, 4, 4, 4): each 4x4 block constant
    assert torch.all(blocks.amax(dim=(-1, -2)) == blocks.amin(dim=(-1, -2)))
    sketch = apply_style(x, "sketch")
    assert sketch.mean() > 0.5  # mostly white paper with dark lines
    train, test = style_sets(6, 2, size=16, seed=0)
    assert len(train) == 18 and len(test) == 6
    assert [r["style"] for r in train].count("sketch") == 6
    used = [r["mnist_index"] for r in train + test]
    assert len(set(used)) == len(used)
    assert len({r["seed"] for r in train + test}) == 24
    train, test = subject_sets(5, views=3, size=16, seed=1)
    assert len(train) == 15 and len(test) == 5
    for s in range(5):
        views = [r for r in train if r["subject"] == s]
        assert len({r["prompt"] for r in views}) == 1 and len(views) == 3
        assert views[0]["prompt"] == test[s]["prompt"]
    assert len({r["word"] for r in test}) == 5


def test_attribution_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 4))
    train_groups = [i % 3 for i in range(30)]
    test_groups = [0, 1, 2, 1]
    got = attribution_metrics(scores, train_groups, test_groups)
    aucs, recalls = [], []
    for j, g in enumerate(test_groups):
        relevant = np.array(train_groups) == g
        aucs.append(roc_auc_score(relevant, -scores[:, j]))
        top = np.argsort(scores[:, j])[: relevant.sum()]
        recalls.append(relevant[top].mean())
    assert got["auc"] == pytest.approx(np.mean(aucs))
    assert got["recall"] == pytest.approx(np.mean(recalls))
    assert got["chance_recall"] == pytest.approx(1 / 3)


class _HashEncoder:
    """Stand-in prompt encoder: a fixed random embedding per prompt, (n, 4, 12)."""

    hidden_size = 12

    def __call__(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(p)))
            out.append(torch.randn(4, 12, generator=g))
        return torch.stack(out)


def test_style_experiment_end_to_end_on_a_tiny_unet(tmp_path):
    settings = DiffusionSettings(experiment="style", n_train_per_style=3, n_test_per_style=1, steps=1,
                                 batch_size=4, timesteps=(525,), grad_batch_size=9,
                                 methods=("datainf", "identity", "exact"))
    result = run_diffusion(settings, tmp_path, unet=tiny_text_unet(), encoder=_HashEncoder(), progress=False)
    assert result.n_train == 9 and result.n_test == 3
    for m in ("datainf", "identity", "exact"):
        r = result.methods[m]
        assert 0 <= r.auc <= 1 and 0 <= r.recall <= 1
    assert result.methods["exact"].pearson_with_exact == pytest.approx(1.0)
    assert json.loads((tmp_path / "results.json").read_text())["methods"] == json.loads(
        json.dumps(result.to_dict()["methods"]))
    scores = load_scores(tmp_path / "scores.safetensors").scores
    assert scores["datainf"].shape == (9, 3)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * (1 + 2 * 5)
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "diffusion-style"


def test_subject_cli_with_a_saved_base_and_the_minilm_encoder(tmp_path):
    base = tiny_text_unet(cross_dim=384, size=8)
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    args = ["--out", str(out), "--base", str(tmp_path / "base"), "--n-subjects", "2", "--views", "2",
            "--steps", "1", "--batch-size", "2", "--timesteps", "525", "--methods", "datainf,identity",
            "--device", "cpu"]
    result = CliRunner().invoke(commands["diffusion-subject"], args, obj={})
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["n_train"] == 4 and set(results["methods"]) == {"datainf", "identity"}
    bad = CliRunner().invoke(commands["diffusion-subject"], args[:-4] + ["--methods", "magic"])
    assert isinstance(bad.exception, DataInfError)


def test_prompt_encoder_caches_minilm_embeddings():
    encoder = PromptEncoder(max_length=8)
    a = encoder(["an image of seven", "an image of one", "an image of seven"])
    assert a.shape == (3, 8, 384)
    assert torch.equal(a[0], a[2])  # the second "seven" is served from the cache
    assert float((a[0] - a[1]).abs().max()) > 1e-2
    tokens = encoder.tokenizer(["an image of one"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        direct = encoder.model(**tokens).last_hidden_state[0]
    # float32: a batch of 2 and a batch of 1 may use other kernels; under FLOAT32_TOL (tests/reference.py)
    assert_close_to(a[1], direct, tol=FLOAT32_TOL, what="cached vs direct embedding")


def test_style_experiment_along_the_run_sums_its_checkpoints_and_step_0_is_the_initial_lora(tmp_path):
    """With checkpoints, '<m>+step0' equals the scores of a LoRA freshly added with the run's seed (B = 0,
    gradients taken by an independent Attributor), '<m>+run' equals the learning-rate-weighted sum of the
    saved per-checkpoint scores, and the control is minus the pixel cosine computed here."""
    import copy

    from datainf.attributor import Attributor
    from datainf.experiments.diffusion import image_records
    from datainf.models.diffusion import make_scheduler

    settings = DiffusionSettings(experiment="style", n_train_per_style=3, n_test_per_style=1, steps=4,
                                 batch_size=4, timesteps=(525,), grad_batch_size=9, methods=("identity",),
                                 checkpoints=2, control=True, seed=3)
    base = tiny_text_unet()
    encoder = _HashEncoder()
    result = run_diffusion(settings, tmp_path, unet=base, encoder=encoder, progress=False)
    assert set(result.methods) == {"identity", "identity+step0", "identity+run", "resemblance"}
    assert [row["step"] for row in result.checkpoints] == [0, 2, 4]
    saved = load_scores(tmp_path / "scores.safetensors").scores
    weights = {row["step"]: row["lr"] for row in result.checkpoints}
    by_hand = sum(weights[s] * saved[f"identity@step{s}"].double() for s in weights)
    assert_close_to(saved["identity+run"].double(), by_hand, FLOAT32_TOL)
    # step 0: the same LoRA drawn again with the run's seed, gradients by a fresh attributor, identity by hand
    train, test, _ = image_records(settings, int(base.config.sample_size))
    model = add_lora(copy.deepcopy(base), rank=settings.rank, seed=settings.seed)
    task = DiffusionLoss(make_scheduler(), settings.timesteps, settings.noise_draws, seed=settings.seed)
    at = Attributor(model, task=task, collate=DiffusionCollate(encoder), batch_size=4, progress=False)
    g, q = at.gradients(train), at.gradients(test)
    expected = -sum(g[k].double().flatten(1) @ q[k].double().flatten(1).T for k in g)
    assert_close_to(saved["identity+step0"].double(), expected, FLOAT32_TOL)
    pixels = torch.nn.functional.normalize(torch.stack([r["image"].double().flatten() for r in train]), dim=1)
    queries = torch.nn.functional.normalize(torch.stack([r["image"].double().flatten() for r in test]), dim=1)
    assert_close_to(saved["resemblance"].double(), -(pixels @ queries.T), FLOAT32_TOL)
