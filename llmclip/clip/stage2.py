"""Stage 2: the config and the pieces of a run (optimizer, schedule, engine, augmentation); the
loop is ``llmclip.clip.trainer`` (which imports this module, never the other way round).

Stage 2 trains the dual tower on image shards + the embedding cache, under DeepSpeed.

    deepspeed --num_gpus 2 llmclip/train.py --config configs/stage2/demo.yaml

The LLM is never loaded: each sample's report (and negated report) embedding is a cache row,
looked up by shard and key. Before any work the cache is checked against the shards (names,
counts, keys, and the encoder fingerprint when ``data.encoder`` is given). The ZeRO stage is the
DeepSpeed JSON's (``deepspeed.zero_stage`` overrides it): plain data parallelism (ZeRO-0) for the
small CPU towers, ZeRO-2/3 for the large GPU ones; a torch AdamW client optimizer with layer-wise LR
decay for ViTs, warmup + cosine, checkpoints every ``run.save_every`` steps and resume from the
latest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmclip.clip.losses import LossConfig
from llmclip.clip.model import CLIPModel, ModelConfig
from llmclip.config import (
    ConfigError,
    DeepSpeedSection,
    OptimConfig,
    RunConfig,
    lr_factor,
)
from llmclip.precision import resolve_precision


@dataclass
class DataConfig:
    shards: str = ""
    """Training image shards, a SPEC: ``DIR``, ``DIR:train`` or ``DIR:train,val``."""
    cache: str = ""
    """Embedding cache folder built from these shards by ``llmclip cache build``."""
    encoder: str = ""
    """Stage-1 encoder folder; when set, its fingerprint must equal the cache's (and eval uses it)."""
    image_size: int = 224
    """Side of the square input images (pixels are decoded at reduced size by the loader)."""
    num_workers: int = 1
    """DataLoader workers per rank for decoding images."""
    text_variant: str = "report"
    """Cache column used as the paired text."""
    check_keys: bool = True
    """At start, compare every shard's keys with the cache's, in order (reads tar headers only)."""
    augment: bool = True
    """Light random affine jitter (shift, scale) on the training images."""
    epoch_samples: int = 0
    """Samples per epoch, all ranks together (0 = every usable training sample once): each epoch is
    the first ``epoch_samples`` of that epoch's global order (``llmclip.data.order``), the same on
    any number of ranks."""

    def check_paths(self) -> None:
        """Existence of the cache and encoder folders (checked at trainer start, so that recipes
        for other machines still load and validate anywhere)."""
        if not Path(self.cache).is_dir():
            raise ConfigError(f"embedding cache folder not found: {self.cache}", "data.cache")
        if self.encoder and not Path(self.encoder).is_dir():
            raise ConfigError(f"encoder folder not found: {self.encoder}", "data.encoder")

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("required: the training image shards SPEC", "shards")
        if not self.cache:
            raise ConfigError("required: the embedding cache folder", "cache")
        if not 16 <= self.image_size <= 2048:
            raise ConfigError("must be in [16, 2048]", "image_size")
        if self.num_workers < 0:
            raise ConfigError("must be >= 0", "num_workers")
        if self.epoch_samples < 0:
            raise ConfigError("must be >= 0", "epoch_samples")


@dataclass
class Stage2OptimConfig(OptimConfig):
    layer_decay: float = 1.0
    """Layer-wise LR decay of the vision tower (ViTs; e.g. 0.75 for fine-tuning pretrained); 1 = off."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("must be in (0, 1]", "layer_decay")


@dataclass
class Stage2Config:
    stage: int = 2
    """Which trainer ``llmclip/train.py`` runs (2 = this one)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/stage2"))
    """Run folder, seed, logging, checkpoints, resume."""
    data: DataConfig = field(default_factory=DataConfig)
    """Image shards and the embedding cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Vision tower, text adapter, graph encoder, temperature."""
    loss: LossConfig = field(default_factory=LossConfig)
    """CLIP loss and the clinical additions (negation, soft labels, graph alignment)."""
    optim: Stage2OptimConfig = field(default_factory=Stage2OptimConfig)
    """AdamW, warmup + cosine, layer-wise LR decay."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed JSON, ZeRO stage, batch sizes, precision."""

    def validate(self) -> None:
        if self.stage != 2:
            raise ConfigError("must be 2 for the stage-2 trainer", "stage")
        soft = self.loss.soft_labels
        if soft.enabled and soft.graph_similarity == "embedding" and not self.model.graph.enabled:
            raise ConfigError(
                "graph_similarity 'embedding' needs model.graph.enabled: true",
                "loss.soft_labels.graph_similarity",
            )
        neg = self.loss.negation
        if neg.enabled and self.data.text_variant in neg.columns():
            raise ConfigError(
                f"{self.data.text_variant!r} is data.text_variant, the positive itself: every row "
                "would be masked as identical",
                "loss.negation.variant"
                if neg.variant == self.data.text_variant
                else "loss.negation.hard_negatives",
            )


# ------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ------------------------------------------------------------------------------------------------


def param_groups(model: CLIPModel, optim: Stage2OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: vision tower by timm (layer decay when < 1), the rest decay / no-decay.

    No weight decay on biases, norms, embeddings of 1-D shape and the logit scale.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if optim.layer_decay < 1.0:
        vis = param_groups_layer_decay(
            model.visual, optim.weight_decay, layer_decay=optim.layer_decay
        )
    else:
        vis = param_groups_weight_decay(model.visual, optim.weight_decay)
    groups = [dict(g, lr_scale=g.get("lr_scale", 1.0)) for g in vis]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.startswith("visual.") or not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name == "logit_scale" else decay).append(p)
    groups.append({"params": decay, "weight_decay": optim.weight_decay, "lr_scale": 1.0})
    groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = optim.lr * g["lr_scale"]
    return groups


# Devices where torch's fused AdamW kernel exists and DeepSpeed runs stage 2 here (CPU hosts, GPUs).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(
    model: CLIPModel, optim: Stage2OptimConfig, device_type: str
) -> torch.optim.AdamW:
    """torch AdamW on ``param_groups``; on ``FUSED_ADAMW_DEVICES`` with torch's fused kernel, one
    pass over each tensor per step. The default kernel makes a dozen passes with temporaries, which
    on the flat multi-megabyte partitions that ZeRO hands the optimizer is memory traffic, not
    arithmetic (measured, ViT-Tiny on one CPU core under ZeRO-2: 37 ms -> 9 ms per update). Same
    update rule and state (``exp_avg``, ``exp_avg_sq``, ``step``): either kind's checkpoint loads."""
    return torch.optim.AdamW(
        param_groups(model, optim),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=device_type in FUSED_ADAMW_DEVICES,
    )


def build_ds_config(cfg: Stage2Config, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON with batch sizes, clipping, precision, ZeRO stage and monitors filled in."""
    from llmclip.ds_config import build_deepspeed_config

    d = cfg.deepspeed
    bf16 = stage2_precision(cfg) == "bf16"
    return build_deepspeed_config(d, cfg.run, cfg.optim.grad_clip, world, "stage2", bf16)


def stage2_precision(cfg: Stage2Config) -> str:
    """``bf16`` (DeepSpeed bf16), ``fp32``, or ``bf16-autocast``: fp32 weights, AdamW and losses, with
    only the vision tower's forward under bf16 ``torch.autocast`` (``CLIPModel.autocast_vision``).

    ``auto`` takes bf16-autocast on a CPU with bf16 matrix instructions: the tower is ~95% of the step
    and its convolutions and matmuls gain most from bf16 (the demo's LeViT step at 128 px, batch 32, one
    thread: 1.9x faster in one interleaved one-off run), while the contrastive logits, soft labels and
    graph alignment keep fp32 -- at a temperature of 0.07, bf16's 8-bit mantissa would move logits by
    ~0.05."""
    return resolve_precision(cfg.deepspeed.precision, torch.cuda.is_available())


def make_engine(model: CLIPModel, cfg: Stage2Config, world: int, device: str) -> tuple[Any, ...]:
    """``(engine, optimizer, scheduler, ds_config)``: the DeepSpeed engine of a stage-2 run, with the
    model's vision tower set to run under autocast where the run's precision says so.

    With ZeRO-0 on one rank the engine's gradient all-reduce is switched off: averaging over one
    rank changes nothing, yet DeepSpeed would still flatten every gradient into a bucket, "reduce"
    it and copy it back (~4% of a small tower's step on a CPU).
    """
    import deepspeed

    model.autocast_vision = stage2_precision(cfg) == "bf16-autocast"
    opt = make_optimizer(model, cfg.optim, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
    ds = build_ds_config(cfg, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds
    )
    if world == 1 and ds["zero_optimization"].get("stage", 0) == 0:
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler, ds


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (up to 4%) and scale (0.95-1.05) per image, on normalised pixels."""
    b = pixels.shape[0]
    scale = 1.0 + (torch.rand(b, generator=gen) - 0.5) * 0.1
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.08
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(
        theta.to(pixels), list(pixels.shape), align_corners=False
    )
    fill = pixels.amin(dim=(1, 2, 3), keepdim=True)
    out = torch.nn.functional.grid_sample(
        pixels - fill, grid, align_corners=False, padding_mode="zeros"
    )
    return out + fill


def _now() -> float:
    return time.perf_counter()


def _env_threads() -> None:
    # Ranks on one CPU host share its cores: give each rank its share instead of all of them. An
    # exported OMP_NUM_THREADS wins (torch already took it; slurm/launch.sh sets it per node), as in
    # the cache builder: the same thread count wherever a rank runs keeps its steps bit-identical.
    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
