"""LoRA-tuned diffusion models: the per-example denoising loss, a small pre-trained base and LoRA fine-tuning.

The task (what a training image's and a query image's gradient is taken of) follows the paper's notebook:
the noise-prediction MSE at fixed timesteps (25, 225, 425, 525, 725, 925), averaged over them, with noise
drawn from a per-example seed, so the same example always gets the same loss::

    loss = DiffusionLoss(DDPMScheduler(num_train_timesteps=1000))
    model = add_lora(unet)                             # LoRA on to_q, to_k, to_v, to_out.0
    attributor = Attributor(model, task=loss, store="runs/x", collate=DiffusionCollate(PromptEncoder()))

It works for ``UNet2DConditionModel`` (batch ``pixel_values`` or VAE ``latents`` (B, C, H, W),
``encoder_hidden_states`` (B, L, D), optional ``encoder_attention_mask`` (B, L)) and for ``UNet2DModel``
with class conditioning (``class_labels`` (B,)). The UNet is called once per timestep and noise draw, so
each LoRA module runs several times in one loss evaluation; ``per_example_gradients`` sums the calls.

The base here is a small text-conditional UNet2DConditionModel pre-trained on MNIST with prompts
"an image of {class name}" embedded by all-MiniLM-L6-v2, cached under ``$DATAINF_CACHE`` (default
``~/.cache/datainf``); ``base_model(rebuild=True)`` or ``datainf experiment diffusion-style --rebuild-base``
rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datainf.errors import DataInfError

log = logging.getLogger("datainf.diffusion")

PAPER_TIMESTEPS = (25, 225, 425, 525, 725, 925)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ----------------------------------------------------------------------------------------------- the task
class DiffusionLoss:
    """Per-example denoising loss ``loss(model, batch) -> (B,)``, deterministic per example.

    Args:
        scheduler: a diffusers noise scheduler with ``add_noise`` (DDPMScheduler, DDIMScheduler, ...);
            its ``prediction_type`` ("epsilon", "v_prediction" or "sample") sets the target.
        timesteps: the fixed timesteps the loss is averaged over.
        noise_draws: noise samples per timestep (averaged).
        seed: global seed; example noise is drawn from ``seed`` and the example's ``batch["seed"]`` (or
            ``batch["index"]``), a (B,) integer tensor. Without either, example i of the batch uses i
            (then the loss depends on the batch order: pass seeds).

    The batch: ``pixel_values`` or ``latents`` (B, C, H, W), plus ``encoder_hidden_states`` (B, L, D) and
    optional ``encoder_attention_mask`` (B, L) for a UNet2DConditionModel, or ``class_labels`` (B,) for a
    class-conditional UNet2DModel. Returns the MSE between the model's prediction and the target,
    averaged over pixels, timesteps and draws: (B,), float32 (float64 for a float64 model and batch).
    """

    def __init__(self, scheduler: Any, timesteps: Sequence[int] = PAPER_TIMESTEPS, noise_draws: int = 1,
                 seed: int = 0):
        total = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000))
        timesteps = tuple(int(t) for t in timesteps)
        if not timesteps:
            raise DataInfError("DiffusionLoss needs at least one timestep")
        bad = [t for t in timesteps if not 0 <= t < total]
        if bad:
            raise DataInfError(f"timesteps {bad} are outside the scheduler's range 0..{total - 1}")
        if noise_draws < 1:
            raise DataInfError(f"noise_draws must be >= 1, got {noise_draws}")
        if not hasattr(scheduler, "add_noise"):
            raise DataInfError("the scheduler has no add_noise method: pass a diffusers DDPMScheduler or alike")
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.noise_draws = int(noise_draws)
        self.seed = int(seed)
        self.__qualname__ = f"DiffusionLoss(t={list(timesteps)}, draws={noise_draws}, seed={seed})"

    def noise(self, seeds: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Noise (B, draws, T, *shape) on the CPU, example b's drawn from its own generator."""
        out = []
        for s in seeds.tolist():
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(s))
            out.append(torch.randn(self.noise_draws, len(self.timesteps), *shape, generator=generator))
        return torch.stack(out)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        if not isinstance(batch, Mapping):
            raise DataInfError("the diffusion task needs the batch as a mapping with 'pixel_values' or 'latents'")
        x0 = batch.get("latents", batch.get("pixel_values"))
        if not isinstance(x0, Tensor) or x0.dim() != 4:
            raise DataInfError("the diffusion batch needs 'pixel_values' (or 'latents') of shape (B, C, H, W)")
        size = x0.shape[0]
        seeds = batch.get("seed", batch.get("index"))
        if seeds is None:
            seeds = torch.arange(size)
        seeds = torch.as_tensor(seeds).reshape(-1)
        if seeds.shape[0] != size:
            raise DataInfError(f"batch['seed'] has {seeds.shape[0]} entries for {size} images; give one per image")
        kwargs: dict[str, Any] = {}
        for key in ("encoder_hidden_states", "encoder_attention_mask", "class_labels"):
            if batch.get(key) is not None:
                kwargs[key] = batch[key]
        noise = self.noise(seeds, tuple(x0.shape[1:])).to(device=x0.device, dtype=x0.dtype)
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        total = torch.zeros(size, device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
        for d in range(self.noise_draws):
            for k, t in enumerate(self.timesteps):
                eps = noise[:, d, k]
                steps = torch.full((size,), t, dtype=torch.long, device=x0.device)
                noisy = self.scheduler.add_noise(x0, eps, steps)
                pred = model(noisy, steps, **kwargs, return_dict=False)[0]
                if prediction_type == "epsilon":
                    target = eps
                elif prediction_type == "v_prediction":
                    target = self.scheduler.get_velocity(x0, eps, steps)
                elif prediction_type == "sample":
                    target = x0
                else:
                    raise DataInfError(f"unsupported scheduler prediction_type {prediction_type!r}")
                total = total + (pred.to(total.dtype) - target.to(total.dtype)).pow(2).flatten(1).mean(dim=1)
        return total / (self.noise_draws * len(self.timesteps))


def training_loss(model: nn.Module, batch: Mapping[str, Tensor], scheduler: Any,
                  generator: torch.Generator | None = None) -> Tensor:
    """The usual diffusion training loss: one random timestep and noise per example, MSE averaged over the
    batch (a scalar). Same batch keys as DiffusionLoss."""
    x0 = batch.get("latents", batch.get("pixel_values"))
    size = x0.shape[0]
    total = int(scheduler.config.num_train_timesteps)
    steps = torch.randint(0, total, (size,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    kwargs = {k: batch[k] for k in ("encoder_hidden_states", "encoder_attention_mask", "class_labels")
              if batch.get(k) is not None}
    pred = model(scheduler.add_noise(x0, eps, steps), steps, **kwargs, return_dict=False)[0]
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    target = scheduler.get_velocity(x0, eps, steps) if prediction_type == "v_prediction" else (
        x0 if prediction_type == "sample" else eps)
    return F.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------------------------- prompts, batches
class PromptEncoder:
    """Frozen text encoder for prompts: ``encoder(prompts) -> (n, max_length, hidden)`` token embeddings.

    Default: all-MiniLM-L6-v2 (hidden 384) from ``datainf.data.assets.minilm_dir()``. Embeddings are cached
    per prompt string (prompts repeat a lot). Padding positions are included, as in Stable Diffusion.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, max_length: int = 16):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            from datainf.data.assets import minilm_dir

            model_dir = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.max_length = max_length
        self.hidden_size = int(self.model.config.hidden_size)
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tensor:
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            tokens = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            hidden = self.model(**tokens).last_hidden_state
            for p, h in zip(new, hidden):
                self._cache[p] = h.clone()
        return torch.stack([self._cache[p] for p in prompts])


class DiffusionCollate:
    """``collate(records) -> batch``: records hold ``image`` (C, H, W) in [-1, 1] (or precomputed ``latents``),
    ``seed`` (int) and ``prompt`` (str, needs an encoder: a PromptEncoder or any ``encoder(prompts) -> (n, L, D)``)
    or ``class_label`` (int).

    Returns {"pixel_values" (B, C, H, W), "seed" (B,), and "encoder_hidden_states" (B, L, D) or
    "class_labels" (B,)}.
    """

    def __init__(self, encoder: Callable[[Sequence[str]], Tensor] | None = None):
        self.encoder = encoder
        self.__qualname__ = "DiffusionCollate"

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not records:
            raise DataInfError("cannot collate an empty list of records")
        out: dict[str, Tensor] = {}
        for n, r in enumerate(records):
            if "image" not in r and "latents" not in r:
                raise DataInfError(f"record {n} has no 'image' (or 'latents') tensor")
            if "seed" not in r:
                raise DataInfError(f"record {n} has no 'seed': give each example a unique integer seed")
        key = "latents" if "latents" in records[0] else "image"
        out["latents" if key == "latents" else "pixel_values"] = torch.stack(
            [torch.as_tensor(r[key], dtype=torch.float32) for r in records])
        out["seed"] = torch.tensor([int(r["seed"]) for r in records], dtype=torch.long)
        if "prompt" in records[0]:
            if self.encoder is None:
                raise DataInfError("records have prompts but DiffusionCollate has no PromptEncoder")
            out["encoder_hidden_states"] = self.encoder([str(r["prompt"]) for r in records])
        elif "class_label" in records[0]:
            out["class_labels"] = torch.tensor([int(r["class_label"]) for r in records], dtype=torch.long)
        return out


# ------------------------------------------------------------------------------------------- the base model
@dataclass
class BaseSettings:
    """The small text-conditional base UNet and its pre-training on MNIST (672 s measured on 2 cores shared with other jobs)."""

    image_size: int = 16
    block_out_channels: tuple[int, ...] = (16, 32)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 384
    prompt_length: int = 16
    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        """A short hash naming the cache folder of these settings."""
        text = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """``$DATAINF_CACHE`` or ``~/.cache/datainf``."""
    return Path(os.environ.get("DATAINF_CACHE", Path.home() / ".cache" / "datainf"))


def build_unet(settings: BaseSettings, seed: int | None = None) -> nn.Module:
    """A randomly initialised UNet2DConditionModel for 1-channel images of ``settings.image_size``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(settings.seed if seed is None else seed)
    return UNet2DConditionModel(
        sample_size=settings.image_size, in_channels=1, out_channels=1,
        block_out_channels=tuple(settings.block_out_channels), down_block_types=tuple(settings.down_block_types),
        up_block_types=tuple(settings.up_block_types), layers_per_block=settings.layers_per_block,
        attention_head_dim=settings.attention_head_dim, norm_num_groups=settings.norm_num_groups,
        cross_attention_dim=settings.cross_attention_dim,
    )


def make_scheduler() -> Any:
    """The DDPM noise schedule used throughout (1000 steps, linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def train_denoiser(model: nn.Module, records: Sequence[Mapping[str, Any]], collate: DiffusionCollate, *,
                   steps: int, batch_size: int, learning_rate: float, seed: int = 0,
                   device: str | torch.device = "cpu", progress: bool = True, log_every: int = 10) -> list[float]:
    """Train the trainable parameters of ``model`` with the usual diffusion loss (random timestep and noise)
    for ``steps`` steps of ``batch_size`` records sampled without replacement per epoch.

    Returns the loss of every step. The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise DataInfError("steps and batch_size must be >= 1")
    if not records:
        raise DataInfError("no training records")
    scheduler = make_scheduler()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataInfError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.05, 1 - s / steps))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="training", disable=not progress, unit="step")
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(records), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([records[i] for i in picked]).items()}
        loss = training_loss(model, batch, scheduler, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    model.eval()
    return losses


def pretrain_base(settings: BaseSettings, out_dir: str | os.PathLike, *, encoder: PromptEncoder | None = None,
                  device: str = "cpu", progress: bool = True) -> Path:
    """Pre-train the base UNet on MNIST and save it to ``out_dir`` (atomically: a temporary folder, then a
    rename). Writes the diffusers ``save_pretrained`` files and ``datainf_base.json`` (settings, losses)."""
    from datainf.data.images import pretraining_set

    out = Path(out_dir)
    encoder = encoder or PromptEncoder(max_length=settings.prompt_length)
    if encoder.hidden_size != settings.cross_attention_dim:
        raise DataInfError(f"the prompt encoder's hidden size {encoder.hidden_size} differs from "
                           f"cross_attention_dim {settings.cross_attention_dim}")
    records = pretraining_set(settings.image_size)
    unet = build_unet(settings).to(device)
    t0 = time.perf_counter()
    losses = train_denoiser(unet, records, DiffusionCollate(encoder), steps=settings.steps,
                            batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                            seed=settings.seed, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.to("cpu").save_pretrained(tmp, safe_serialization=True)
        meta = {"settings": asdict(settings), "train_seconds": seconds, "first_losses": losses[:10],
                "last_losses": losses[-10:], "n_images": len(records),
                "torch_threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "datainf_base.json").write_text(json.dumps(meta, indent=2, default=list))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_unet(path: str | os.PathLike) -> nn.Module:
    """A UNet2DConditionModel saved by ``pretrain_base`` (or any diffusers UNet folder), frozen, in eval mode."""
    from diffusers import UNet2DConditionModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DataInfError(f"{folder} holds no UNet (config.json missing): pass a folder made by pretrain_base")
    unet = UNet2DConditionModel.from_pretrained(str(folder))
    unet.requires_grad_(False)
    return unet.eval()


def base_model(path: str | os.PathLike | None = None, *, settings: BaseSettings | None = None, rebuild: bool = False,
               device: str = "cpu", progress: bool = True) -> tuple[nn.Module, Path]:
    """The pre-trained base UNet: from ``path`` if given, else from the cache (built first if missing or if
    ``rebuild``). Returns (frozen UNet in eval mode, its folder)."""
    if path is not None and not rebuild:
        return load_unet(path), Path(path)
    settings = settings or BaseSettings()
    folder = Path(path) if path is not None else cache_dir() / f"diffusion-base-{settings.key()}"
    if rebuild or not (folder / "datainf_base.json").is_file():
        log.info("pre-training the diffusion base into %s", folder)
        pretrain_base(settings, folder, device=device, progress=progress)
    return load_unet(folder), folder


# ---------------------------------------------------------------------------------------------------- LoRA
def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = LORA_TARGETS, seed: int = 0) -> nn.Module:
    """Wrap a (frozen) UNet with a PEFT LoRA adapter on its attention projections; returns the PeftModel
    (call it like the UNet). LoRA B starts at zero, as in PEFT."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise DataInfError(f"LoRA rank must be >= 1, got {rank}")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=list(target_modules), init_lora_weights=True)
    unet.requires_grad_(False)
    try:
        model = get_peft_model(unet, config)
    except ValueError as e:
        raise DataInfError(f"no module of the UNet matches target_modules {list(target_modules)}: {e}") from None
    return model.eval()


@torch.no_grad()
def generate(model: nn.Module, encoder_hidden_states: Tensor, *, image_size: int, steps: int = 50,
             seed: int = 0) -> Tensor:
    """Sample images (B, 1, S, S) in [-1, 1] with DDIM from prompt embeddings (B, L, D)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(encoder_hidden_states.shape[0], 1, image_size, image_size, generator=generator)
    for t in scheduler.timesteps:
        eps = model(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


__all__ = [
    "LORA_TARGETS",
    "PAPER_TIMESTEPS",
    "BaseSettings",
    "DiffusionCollate",
    "DiffusionLoss",
    "PromptEncoder",
    "add_lora",
    "base_model",
    "build_unet",
    "cache_dir",
    "generate",
    "load_unet",
    "make_scheduler",
    "pretrain_base",
    "train_denoiser",
    "training_loss",
]
