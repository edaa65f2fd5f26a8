"""The stage-2 dual tower: a timm vision tower, an adapter on cached LLM report embeddings, a
learnable temperature and an optional report-graph encoder (a small relational GCN).

The LLM is never part of this module: text enters as the frozen stage-1 embedding read from the
cache (training) or produced online by the encoder (``llmclip.api``). Every output is
L2-normalised in the shared ``embed_dim`` space, so similarities are cosines times ``logit_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmclip.clinical.graph import GRAPH_VOCAB
from llmclip.config import ConfigError

# Rows of the node-name embedding: row 0 is the report node, row 1 + i the GRAPH_VOCAB word i.
NODE_NAME_ROWS = 1 + len(GRAPH_VOCAB)


@dataclass
class VisionConfig:
    name: str = "vit_tiny_patch16_224"
    """Any timm model name; the classifier head is removed (``num_classes=0``)."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs the hub or a local cache; off in tests and the demo)."""
    in_chans: int = 3
    """Input channels; grayscale inputs are repeated to 3 so pretrained RGB weights stay usable."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate (ViTs)."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (timm ``set_grad_checkpointing``); for large ViTs."""
    attention: Literal["auto", "fused", "eager"] = "auto"
    """Attention of timm towers that have both paths: ``fused`` (PyTorch SDPA) or ``eager`` (q k^T,
    softmax, v); ``auto`` = fused on CUDA, eager on a CPU (see ``set_tower_attention``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. depth, patch_size, embed_dim)."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel standard deviation divided after subtracting the mean."""
    stats: Literal["auto", "config"] = "auto"
    """Normalisation statistics. ``auto``: with ``pretrained`` weights, the tower's own (timm's
    ``resolve_model_data_config``: OpenAI-CLIP statistics for EVA02, ImageNet ones for most CNNs),
    which those weights need; without, ``mean``/``std`` (a tower trained from scratch learns
    from whatever they are). ``config``: always ``mean``/``std``. The model writes the statistics
    it uses back into ``mean``/``std``, so ``clip.json`` records them and inference repeats them."""

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("must name a timm model", "name")
        if self.in_chans not in (1, 3):
            raise ConfigError("must be 1 or 3", "in_chans")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError("mean and std need one value per input channel", "mean")
        if any(s <= 0 for s in self.std):
            raise ConfigError("must be > 0", "std")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError("must be in [0, 1)", "drop_path_rate")


@dataclass
class TextAdapterConfig:
    kind: Literal["linear", "mlp"] = "linear"
    """``linear``: LayerNorm then Linear (paper A); ``mlp``: LLM2CLIP's residual MLP blocks."""
    blocks: int = 4
    """Residual MLP blocks for ``kind: mlp``."""
    hidden_dim: int = 0
    """Width of the MLP blocks (0 = ``embed_dim``)."""
    dropout: float = 0.0
    """Dropout inside the MLP blocks."""
    standardize: bool = True
    """Subtract the training cache's mean embedding and divide by its per-feature std first (fixed
    statistics, saved with the model): LLM embeddings share one dominant direction (mean cosine
    ~0.9 between reports), which otherwise makes every report look alike to a fresh adapter."""

    def validate(self) -> None:
        if self.blocks < 1:
            raise ConfigError("must be >= 1", "blocks")
        if self.hidden_dim < 0:
            raise ConfigError("must be >= 0", "hidden_dim")
        if not 0 <= self.dropout < 1:
            raise ConfigError("must be in [0, 1)", "dropout")


@dataclass
class GraphConfig:
    enabled: bool = False
    """Add the report-graph stream (GCN over ``ReportGraph``), aligned with the image embedding."""
    dim: int = 128
    """Hidden width of the GCN."""
    layers: int = 2
    """Message-passing layers."""
    vocab_size: int = 4096
    """Rows of the node-name embedding table: row 0 is the report node, row 1 + i the
    ``GRAPH_VOCAB`` word i (unknown names use the "<unk>" row), so it must be at least
    ``len(GRAPH_VOCAB) + 1``; rows past that stay unused."""
    max_nodes: int = 32
    """Nodes kept per report (the report node first, then entities in report order)."""

    def validate(self) -> None:
        for name in ("dim", "layers", "vocab_size", "max_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name)
        if self.vocab_size < NODE_NAME_ROWS:
            raise ConfigError(
                f"must be >= {NODE_NAME_ROWS} (the report node plus the {len(GRAPH_VOCAB)} "
                f"GRAPH_VOCAB names), got {self.vocab_size}",
                "vocab_size",
            )
        if self.max_nodes < 2:
            raise ConfigError(
                "must be >= 2 (the report node plus at least one entity)", "max_nodes"
            )


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower."""
    text: TextAdapterConfig = field(default_factory=TextAdapterConfig)
    """Adapter on the cached report embedding."""
    graph: GraphConfig = field(default_factory=GraphConfig)
    """Optional report-graph encoder."""
    embed_dim: int = 256
    """Shared embedding width."""
    init_temperature: float = 0.07
    """Initial softmax temperature; ``logit_scale`` starts at log(1 / this)."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit_scale) (CLIP's 100)."""
    learn_temperature: bool = True
    """Train the logit scale."""

    def validate(self) -> None:
        if self.embed_dim < 1:
            raise ConfigError("must be >= 1", "embed_dim")
        if not 0 < self.init_temperature < 1:
            raise ConfigError("must be in (0, 1)", "init_temperature")
        if self.max_logit_scale < 1 / self.init_temperature:
            raise ConfigError("must be >= 1 / init_temperature", "max_logit_scale")


# Relation kinds of ReportGraph edges. Unknown kinds share the last slot; self loops are separate.
RELATIONS = ("located_at", "modify", "suggestive_of", "other")
STATUSES = ("none", "positive", "negative", "uncertain")
NODE_TYPES = ("report", "finding", "device", "anatomy", "modifier", "other")


class GraphEncoder(nn.Module):
    """A relational GCN over a padded batch of report graphs, mean-pooled over real nodes.

    h <- h + GELU(LN(W_self h + sum_r A_r h W_r)), with A_r the row-normalised adjacency of relation r
    (both directions). Node input = embedding(node name) + embedding(status) + embedding(type).
    """

    def __init__(self, cfg: GraphConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.label = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.status = nn.Embedding(len(STATUSES), cfg.dim)
        self.node_type = nn.Embedding(len(NODE_TYPES), cfg.dim)
        self.self_lin = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim) for _ in range(cfg.layers))
        self.rel_lin = nn.ModuleList(
            nn.Linear(cfg.dim, cfg.dim * len(RELATIONS), bias=False) for _ in range(cfg.layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, embed_dim, bias=False)

    def forward(self, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        labels, status, types = graph["labels"], graph["status"], graph["types"]
        mask = graph["mask"].to(self.proj.weight.dtype)  # [B, N]
        # Padding nodes neither send nor receive messages.
        pair = (mask.unsqueeze(-1) * mask.unsqueeze(-2)).unsqueeze(1)
        adj = graph["adj"].to(self.proj.weight.dtype) * pair  # [B, R, N, N]
        adj = adj / adj.sum(-1, keepdim=True).clamp(min=1.0)
        h = (self.label(labels) + self.status(status) + self.node_type(types)) * mask.unsqueeze(-1)
        b, n, d = h.shape
        r = len(RELATIONS)
        for lin_s, lin_r, norm in zip(self.self_lin, self.rel_lin, self.norms, strict=True):
            msg = lin_r(h).view(b, n, r, d).permute(0, 2, 1, 3)  # [B, R, N, D]
            agg = torch.einsum("brij,brjd->bid", adj, msg)
            h = h + F.gelu(norm(lin_s(h) + agg))
            h = h * mask.unsqueeze(-1)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.proj(self.out_norm(pooled))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class TextAdapter(nn.Module):
    """Maps a frozen LLM report embedding to the shared space (the only trainable text part)."""

    def __init__(self, cfg: TextAdapterConfig, text_dim: int, embed_dim: int):
        super().__init__()
        self.standardize = cfg.standardize
        if cfg.standardize:
            # Fixed statistics of the training cache (set by the trainer, stored in the weights).
            self.register_buffer("mean", torch.zeros(text_dim))
            self.register_buffer("std", torch.ones(text_dim))
        if cfg.kind == "linear":
            self.net = nn.Sequential(
                nn.LayerNorm(text_dim), nn.Linear(text_dim, embed_dim, bias=False)
            )
        else:
            hidden = cfg.hidden_dim or embed_dim
            layers: list[nn.Module] = [nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden)]
            layers += [ResidualMLP(hidden, cfg.dropout) for _ in range(cfg.blocks)]
            layers += [nn.LayerNorm(hidden), nn.Linear(hidden, embed_dim, bias=False)]
            self.net = nn.Sequential(*layers)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            # DeepSpeed's bf16/fp16 engines cast parameters only and keep buffers fp32, so the
            # statistics would promote a bf16 input back to fp32: keep the input's dtype.
            x = ((x - self.mean) / self.std).to(x.dtype)
        return self.net(x)


def create_vision_tower(cfg: VisionConfig, image_size: int) -> nn.Module:
    """A timm model without its classifier; ``img_size`` is passed to models that take it (ViTs)."""
    import timm

    kwargs = dict(cfg.kwargs)
    if cfg.drop_path_rate:
        kwargs.setdefault("drop_path_rate", cfg.drop_path_rate)
    try:
        tower = timm.create_model(
            cfg.name,
            pretrained=cfg.pretrained,
            num_classes=0,
            in_chans=cfg.in_chans,
            img_size=image_size,
            **kwargs,
        )
    except TypeError:
        # Convolutional towers take any input size and have no img_size argument.
        try:
            tower = timm.create_model(
                cfg.name, pretrained=cfg.pretrained, num_classes=0, in_chans=cfg.in_chans, **kwargs
            )
        except TypeError as e:
            raise ConfigError(
                f"timm rejected the arguments for {cfg.name!r}: {e}", "model.vision.kwargs"
            ) from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model {cfg.name!r}", "model.vision.name") from None
        raise
    if cfg.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    set_tower_attention(tower, cfg.attention)
    return tower


def set_tower_attention(tower: nn.Module, attention: str) -> int:
    """Switch the tower's timm attention blocks (those with a ``fused_attn`` flag) to the fused
    SDPA kernel or the eager path; returns how many blocks there are.

    ``auto`` takes eager on a CPU: at a ViT's short sequences PyTorch's fused CPU kernel, forward
    plus backward, was 4.0-5.5x slower than eager in bf16 and 1.0-1.35x in fp32 at 37-80 tokens
    (ViT-Tiny at 96 px, 37 tokens, batch 32, one thread: 26.1 vs 4.7 ms in bf16; one-off
    microbenchmark). On CUDA the
    fused kernels (flash / memory-efficient) win and keep memory linear in the sequence."""
    fused = torch.cuda.is_available() if attention == "auto" else attention == "fused"
    blocks = [m for m in tower.modules() if hasattr(m, "fused_attn")]
    for m in blocks:
        m.fused_attn = fused
    return len(blocks)


def tower_stats(cfg: VisionConfig, tower: nn.Module) -> tuple[list[float], list[float]]:
    """(mean, std) the tower's inputs are normalised with (see ``VisionConfig.stats``)."""
    if cfg.stats == "config" or not cfg.pretrained:
        return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(tower)
    mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
    if cfg.in_chans == 1 and len(mean) == 3:
        # timm folds the RGB stem of pretrained weights into one grey channel by summing it, so the
        # grey input is best normalised with the channels' average statistics.
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std


def normalize_pixels(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, in_chans: int, size: int
) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3) -> normalised float [B, in_chans, size, size].

    Shared by training (``CLIPModel.preprocess``) and ``llmclip.load``'s ``preprocess``, so both
    compute the same floats from the same pixels. ``mean``/``std``: [1, in_chans, 1, 1].
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != in_chans:
        x = x.repeat(1, in_chans, 1, 1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - mean) / std


class CLIPModel(nn.Module):
    """Vision tower + image projection, text adapter, logit scale, optional graph encoder."""

    def __init__(self, cfg: ModelConfig, text_dim: int, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.image_size = image_size
        self.visual = create_vision_tower(cfg.vision, image_size)
        self.image_proj = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
        self.text_adapter = TextAdapter(cfg.text, text_dim, cfg.embed_dim)
        # Shape [1], not a scalar: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        scale = torch.full((1,), math.log(1.0 / cfg.init_temperature))
        self.logit_scale = nn.Parameter(scale, requires_grad=cfg.learn_temperature)
        self.graph_encoder = GraphEncoder(cfg.graph, cfg.embed_dim) if cfg.graph.enabled else None
        # Set by the trainer (stage2.make_engine) for deepspeed.precision bf16-autocast; not part of the
        # model: a loaded model runs its tower in the dtype of its weights.
        self.autocast_vision = False
        # Written back into the config: the trainer's clip.json then records the statistics used,
        # and a loaded model (built without the pretrained weights) normalises the same way.
        cfg.vision.mean, cfg.vision.std = tower_stats(cfg.vision, self.visual)
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.vision.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.vision.std).view(1, -1, 1, 1), persistent=False
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] (C = 1 or 3) -> normalised float, resized to ``image_size`` if needed."""
        return normalize_pixels(
            images.to(self.pixel_mean.device),
            self.pixel_mean,
            self.pixel_std,
            self.cfg.vision.in_chans,
            self.image_size,
        )

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings from preprocessed pixels."""
        dtype = self.image_proj.weight.dtype
        with torch.autocast(pixels.device.type, torch.bfloat16, enabled=self.autocast_vision):
            feats = self.visual(pixels.to(dtype))
        return F.normalize(self.image_proj(feats.to(dtype)), dim=-1)

    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings from (cached or online) LLM report embeddings."""
        return F.normalize(self.text_adapter(text_emb.to(self.image_proj.weight.dtype)), dim=-1)

    def encode_graph(self, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.graph_encoder is None:
            raise ConfigError("the model has no graph encoder", "model.graph.enabled")
        return F.normalize(self.graph_encoder(graph), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped (the clamp stops the temperature from collapsing)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()[0]

    def forward(
        self,
        pixels: torch.Tensor,
        text_emb: torch.Tensor,
        graph: dict[str, torch.Tensor] | None = None,
        negated_emb: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All streams in one call (ZeRO-3 gathers parameters per forward).

        ``negated_emb``: each sample's own edited reports, [n, D] or [n, k, D] (the negated one,
        then ``loss.negation.hard_negatives``); ``out["negated"]`` keeps that shape.
        """
        out = {
            "image": self.encode_image(pixels),
            "text": self.encode_text(text_emb),
            "scale": self.scale(),
        }
        if negated_emb is not None:
            out["negated"] = self.encode_text(negated_emb)
        if graph is not None and self.graph_encoder is not None:
            out["graph"] = self.encode_graph(graph)
        return out
