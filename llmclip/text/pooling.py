"""Token states -> one report embedding. ``pool_mask`` marks the tokens that count (report tokens:
not padding, not the instruction prefix), so an instruction steers the states without being averaged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLINGS = ("mean", "latent_attention", "last_token")


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1; states [b, t, d], mask [b, t] -> [b, d]."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPooler(nn.Module):
    """Average of the report tokens' last hidden states (LLM2Vec's default)."""

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(states, mask)


class LastTokenPooler(nn.Module):
    """State of the last report token (right padding: the last position where ``mask`` is 1)."""

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), pos, torch.zeros_like(pos)).amax(1)
        return states[torch.arange(states.shape[0], device=states.device), last]


class LatentAttentionPooler(nn.Module):
    """NV-Embed style pooler: tokens attend to trainable latents, an MLP, then a masked mean.

    The attention output and MLP are added to the token states (residual), and both output layers
    start at zero, so at initialisation the pooler equals mean pooling: contrastive training starts
    from the base model's embedding instead of from a random projection.

    Every weight is used through a call of its own ``nn.Linear``: ZeRO-3 fetches parameters in
    module hooks and replays the order it traced, and ``nn.MultiheadAttention`` reads its
    ``out_proj`` weights without calling it, which broke that trace after the first checkpoint.
    """

    def __init__(self, dim: int, num_latents: int = 512, num_heads: int = 8, mlp_ratio: float = 1.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by pooler heads {num_heads}")
        self.heads = num_heads
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for out in (self.o, self.mlp[2]):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # [.., t, d] -> [.., h, t, d/h]

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = states.to(self.latents.dtype)
        lat = self.latents
        q, k, v = self._split(self.q(x)), self._split(self.k(lat)), self._split(self.v(lat))
        attended = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0))
        x = x + self.o(attended.transpose(1, 2).flatten(-2))
        x = x + self.mlp(x)
        return masked_mean(x, mask)


class Standardize(nn.Module):
    """Per-dimension centring and scaling of the pooled vector, calibrated on training reports.

    Mean-pooled LLM states are dominated by a few "massive activation" dimensions that are nearly
    constant across texts (in SmolLM2, four dimensions carry about half of the norm), so cosine
    similarity barely sees content. Subtracting the corpus mean and dividing by the per-dimension
    standard deviation (a diagonal version of BERT-whitening) fixes that before training starts;
    both vectors stay trainable.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.center = nn.Parameter(torch.zeros(dim))
        self.inv_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center.to(x.dtype)) * self.inv_scale.to(x.dtype)

    @staticmethod
    def statistics(count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor,
                   eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """(center, inv_scale) from the count, sum and sum of squares of pooled vectors."""
        mean = total / count
        var = (total_sq / count - mean**2).clamp_min(0.0)
        return mean, 1.0 / (var.sqrt() + eps)


class Pooler(nn.Module):
    """Token states -> one vector: ``pool`` by name, then optionally ``Standardize``."""

    def __init__(self, kind: str, dim: int, num_latents: int = 512, num_heads: int = 8,
                 standardize: bool = False):
        super().__init__()
        self.pool = build_pool(kind, dim, num_latents, num_heads)
        self.standardize = Standardize(dim) if standardize else None

    def raw(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooled vector before standardisation (what calibration measures)."""
        return self.pool(states, mask)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.pool(states, mask)
        return self.standardize(x) if self.standardize is not None else x


def build_pool(kind: str, dim: int, num_latents: int = 512, num_heads: int = 8) -> nn.Module:
    """A pooling by name; ``latent_attention`` has trainable weights, the others none."""
    if kind == "mean":
        return MeanPooler()
    if kind == "last_token":
        return LastTokenPooler()
    if kind == "latent_attention":
        return LatentAttentionPooler(dim, num_latents=num_latents, num_heads=num_heads)
    raise ValueError(f"unknown pooling {kind!r}; choose one of {', '.join(POOLINGS)}")


def build_pooler(kind: str, dim: int, num_latents: int = 512, num_heads: int = 8,
                 standardize: bool = False) -> Pooler:
    """The encoder's pooler: a pooling by name, then ``Standardize`` when asked for."""
    return Pooler(kind, dim, num_latents=num_latents, num_heads=num_heads, standardize=standardize)
