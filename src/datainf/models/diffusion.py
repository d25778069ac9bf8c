"""LoRA-tuned diffusion models: a small pre-trained base, LoRA on its attention, fine-tuning and sampling.

The per-example loss (what a training image's and a query image's gradient is taken of) is
:class:`datainf.tasks.DiffusionLoss`, the paper notebook's noise-prediction MSE at fixed timesteps with
per-example seeded noise; batches come from :class:`datainf.data.collate.DiffusionCollate`::

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datainf import atomic
from datainf.data.assets import build_once, cache_root
from datainf.data.collate import DiffusionCollate
from datainf.errors import DataInfError
from datainf.tasks import PAPER_TIMESTEPS

log = logging.getLogger("datainf.models.diffusion")


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            from datainf.data.assets import minilm_dir

            model_dir = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
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
                   device: str | torch.device = "cpu", progress: bool = True, log_every: int = 10,
                   on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the trainable parameters of ``model`` with the usual diffusion loss (random timestep and noise)
    for ``steps`` steps of ``batch_size`` records sampled without replacement per epoch. ``on_step(step,
    lr)`` is called after each optimizer step (counted from 1) with the learning rate that step used
    (:class:`datainf.models.checkpoints.Snapshots`' hook).

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
        if on_step is not None:
            on_step(step + 1, float(optimizer.param_groups[0]["lr"]))
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
    meta = {"settings": asdict(settings), "train_seconds": seconds, "first_losses": losses[:10],
            "last_losses": losses[-10:], "n_images": len(records),
            "torch_threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic.new_directory(out, replace=True) as tmp:
        unet.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / "datainf_base.json").write_text(json.dumps(meta, indent=2, default=list))
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
    if path is not None:
        pretrain_base(settings, path, device=device, progress=progress)
        return load_unet(path), Path(path)
    folder = cache_root() / f"diffusion-base-{settings.key()}"

    def build() -> None:
        log.info("pre-training the diffusion base into %s", folder)
        pretrain_base(settings, folder, device=device, progress=progress)

    build_once(folder.name, lambda: not rebuild and (folder / "datainf_base.json").is_file(), build)
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
    "PromptEncoder",
    "add_lora",
    "base_model",
    "build_unet",
    "generate",
    "load_unet",
    "make_scheduler",
    "pretrain_base",
    "train_denoiser",
    "training_loss",
]
