"""Stage-2 losses: CLIP InfoNCE gathered across ranks, plus the three clinical additions of
"Bringing CLIP to the clinic" (negation hard negatives, dynamic soft labels, graph alignment).

Notation for one global batch of N studies split over W ranks (n = N / W rows per rank):
``img``, ``txt``, ``neg``, ``gph`` are L2-normalised embeddings of the image, the report, the
negated report and the report graph; ``s`` is the (clamped) logit scale.

Symmetric InfoNCE (CLIP):
    L = 1/2 [ CE(s * img @ txt^T, T) + CE(s * txt @ img^T, T) ],  CE(Z, T) = -mean_i sum_j T_ij log softmax(Z_i)_j
with T = I (one-hot) for plain CLIP.

Negation hard negatives: image i also scores its own negated report, one extra column in the
image->report direction: Z_i = [s * img_i . txt_j for all j, s * img_i . neg_i + log beta], target 0
there (beta = ``negation.weight``: the hard negative counts as beta ordinary ones, 1 = plain). A
negated report identical to the report (nothing to negate) is masked out of the softmax. Each
column of ``negation.hard_negatives`` (e.g. the report with one finding's side or grade changed)
adds one more such column, same beta, same masking: negation alone teaches presence, not where
or how much.

Clinically-enhanced dynamic soft labels (computed per global batch, no gradient):
    t_ij = cos(e_i, e_j)                                e = frozen cached LLM report embeddings
    c_ij = sum_k min(a_ik, a_jk) / sum_k max(a_ik, a_jk)   a = CheXpert 14-vector: positive 1,
                                                         uncertain 0.5, negative/absent 0
                                                         (weighted Jaccard; 1 when both are empty)
    g_ij = |G_i & G_j| / |G_i | G_j|                     G = set of (entity, status) graph nodes
           (or cos of the detached graph embeddings with ``graph_similarity: embedding``)
    S    = (w_t t + w_c c + w_g g) / (w_t + w_c + w_g)
    Q    = row-softmax(S / tau)
    T    = (1 - alpha(step)) I + alpha(step) Q
    alpha(step) ramps linearly from alpha_start to alpha_end between ramp_start and ramp_end
    (fractions of the run). alpha = 0 gives exactly plain InfoNCE.
S is symmetric, so row i of T is the target of both the image->report and the report->image rows.

Graph alignment: the same InfoNCE (with the same T) between ``img`` and ``gph``, weight w_graph.

Distribution: every rank computes the logits of its own n rows against all N columns
(``local_loss``, open_clip's choice; memory O(nN)) or the whole N x N matrix. Features are gathered
with ``all_gather_with_grad`` so the gradient reaching every rank's features equals that of the
1-rank loss on the concatenated batch (after DeepSpeed averages gradients over ranks). With
``gather_with_grad: false`` the other ranks' features are constants (cheaper backward): exact for
the full matrix (the local gradient is rescaled by W), an approximation with ``local_loss``
(the gradient through other ranks' rows is dropped, as in open_clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from llmclip.config import ConfigError
from llmclip.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size

# Logit given to masked candidates: finite so that 0 * log_softmax stays 0 (no NaN).
MASKED_LOGIT = -1e4


@dataclass
class NegationConfig:
    enabled: bool = False
    """Score each image against its own negated report as an extra negative."""
    variant: str = "negated"
    """Cache column holding the negated report embedding."""
    identical_cos: float = 0.9999
    """An edited (negated, ...) embedding at least this close (cosine) to the report one, or equal
    to it, is masked: nothing was edited. 1.0 masks exact copies only."""
    weight: float = 1.0
    """beta: the negated report counts as beta in-batch negatives (log beta is added to its logit)."""
    hard_negatives: list[str] = field(default_factory=list)
    """Further cache columns, e.g. laterality, severity, each scored by its own image as one more
    extra negative (same weight), masked where identical to the report."""

    def validate(self) -> None:
        if not 0 < self.identical_cos <= 1:
            raise ConfigError("must be in (0, 1]", "identical_cos")
        if not self.weight > 0:
            raise ConfigError("must be > 0", "weight")
        if not all(self.hard_negatives):
            raise ConfigError("column names must not be empty", "hard_negatives")
        if len(set(self.columns())) != len(self.columns()):
            raise ConfigError(
                f"columns repeat in {self.columns()} (with variant {self.variant!r}): a repeated "
                "column would weigh its negative twice",
                "hard_negatives",
            )

    def columns(self) -> list[str]:
        """Cache columns of the extra negatives, in logit order: ``variant`` first."""
        return [self.variant, *self.hard_negatives]

    def column_indices(self, available: list[str]) -> list[int]:
        """Positions of ``columns()`` in a cache's variant list; a missing one names the key."""
        for key, names in (("variant", [self.variant]), ("hard_negatives", self.hard_negatives)):
            missing = [n for n in names if n not in available]
            if missing:
                raise ConfigError(
                    f"the embedding cache has no column {', '.join(map(repr, missing))} (it has "
                    f"{', '.join(available)}); rebuild it with `llmclip cache build --variants "
                    f"{','.join(dict.fromkeys([*available, *self.columns()]))}`",
                    f"loss.negation.{key}",
                )
        return [available.index(n) for n in self.columns()]


@dataclass
class SoftLabelConfig:
    enabled: bool = False
    """Replace the one-hot target by the clinically-enhanced dynamic soft target (formula above)."""
    weight_text: float = 1.0
    """w_t: weight of the report-embedding cosine."""
    weight_labels: float = 1.0
    """w_c: weight of the CheXpert label-vector similarity."""
    weight_graph: float = 1.0
    """w_g: weight of the report-graph similarity."""
    graph_similarity: Literal["nodes", "embedding"] = "nodes"
    """g from the Jaccard of graph node sets, or the cosine of the (detached) graph embeddings."""
    temperature: float = 0.1
    """tau of the row softmax over S."""
    alpha_start: float = 0.0
    """Mix weight of the soft part at the start of the ramp."""
    alpha_end: float = 0.3
    """Mix weight of the soft part after the ramp."""
    ramp_start: float = 0.0
    """Fraction of max_steps where the ramp starts."""
    ramp_end: float = 0.5
    """Fraction of max_steps where the ramp ends."""

    def validate(self) -> None:
        for name in ("weight_text", "weight_labels", "weight_graph"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", name)
        if self.weight_text + self.weight_labels + self.weight_graph <= 0:
            raise ConfigError("at least one similarity weight must be > 0", "weight_text")
        if not self.temperature > 0:
            raise ConfigError("must be > 0", "temperature")
        for name in ("alpha_start", "alpha_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("must be in [0, 1]", name)
        if not 0 <= self.ramp_start <= self.ramp_end <= 1:
            raise ConfigError("need 0 <= ramp_start <= ramp_end <= 1", "ramp_start")

    def alpha(self, step: int, max_steps: int) -> float:
        """The dynamic mix weight at optimizer step ``step``."""
        frac = step / max(1, max_steps)
        if self.ramp_end <= self.ramp_start:
            ramp = 1.0 if frac >= self.ramp_end else 0.0
        else:
            ramp = min(1.0, max(0.0, (frac - self.ramp_start) / (self.ramp_end - self.ramp_start)))
        return self.alpha_start + (self.alpha_end - self.alpha_start) * ramp


@dataclass
class LossConfig:
    local_loss: bool = True
    """Each rank computes its own rows against all columns (O(nN) memory) instead of N x N."""
    gather_with_grad: bool = True
    """Gather features with gradients (exact); false treats other ranks' features as constants."""
    negation: NegationConfig = field(default_factory=NegationConfig)
    """Negation-based hard negatives."""
    soft_labels: SoftLabelConfig = field(default_factory=SoftLabelConfig)
    """Clinically-enhanced dynamic soft labels."""
    graph_weight: float = 0.5
    """Weight of the image-graph alignment loss (used when ``model.graph.enabled``)."""

    def validate(self) -> None:
        if self.graph_weight < 0:
            raise ConfigError("must be >= 0", "graph_weight")


# ------------------------------------------------------------------------------------------------
# Gathering
# ------------------------------------------------------------------------------------------------


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``x``, gradient multiplied by ``factor``."""
    if factor == 1.0:
        return x
    return x * factor - x.detach() * (factor - 1.0)


def gather(x: torch.Tensor, *, with_grad: bool, local_loss: bool) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated in rank order (see the module docstring for gradients)."""
    w = world_size()
    if w == 1:
        return x
    if with_grad:
        return all_gather_with_grad(x)
    parts = list(all_gather_no_grad(x.detach()).chunk(w, dim=0))
    parts[rank()] = x if local_loss else _scale_grad(x, float(w))
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------------------------------------
# Soft targets
# ------------------------------------------------------------------------------------------------


def label_similarity(a: torch.Tensor) -> torch.Tensor:
    """Weighted Jaccard between rows of ``a`` (values in [0, 1]); 1 where both rows are empty."""
    a = a.float()
    inter = torch.minimum(a.unsqueeze(1), a.unsqueeze(0)).sum(-1)
    union = torch.maximum(a.unsqueeze(1), a.unsqueeze(0)).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(union))


def set_similarity(m: torch.Tensor) -> torch.Tensor:
    """Jaccard between rows of a 0/1 multi-hot matrix ``m``; 1 where both sets are empty."""
    m = m.float()
    inter = m @ m.T
    size = m.sum(-1)
    union = size.unsqueeze(1) + size.unsqueeze(0) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.ones_like(union))


def soft_targets(
    cfg: SoftLabelConfig,
    alpha: float,
    text_raw: torch.Tensor,
    labels: torch.Tensor | None = None,
    graph_nodes: torch.Tensor | None = None,
    graph_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """The N x N target T = (1 - alpha) I + alpha softmax(S / tau) of the module docstring.

    All inputs are global (gathered) and carry no gradient. Missing inputs drop their term.
    """
    n = text_raw.shape[0]
    eye = torch.eye(n, device=text_raw.device, dtype=torch.float32)
    if alpha == 0.0:
        return eye
    terms: list[tuple[float, torch.Tensor]] = []
    if cfg.weight_text > 0:
        e = F.normalize(text_raw.float(), dim=-1)
        terms.append((cfg.weight_text, e @ e.T))
    if cfg.weight_labels > 0 and labels is not None:
        terms.append((cfg.weight_labels, label_similarity(labels)))
    if cfg.weight_graph > 0:
        if cfg.graph_similarity == "embedding" and graph_emb is not None:
            g = F.normalize(graph_emb.float(), dim=-1)
            terms.append((cfg.weight_graph, g @ g.T))
        elif cfg.graph_similarity == "nodes" and graph_nodes is not None:
            terms.append((cfg.weight_graph, set_similarity(graph_nodes)))
    if not terms:
        return eye
    total = sum(w for w, _ in terms)
    sim = sum(w * s for w, s in terms) / total
    q = torch.softmax(sim / cfg.temperature, dim=1)
    return (1.0 - alpha) * eye + alpha * q


# ------------------------------------------------------------------------------------------------
# InfoNCE
# ------------------------------------------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_j T_ij log softmax(Z_i)_j (equals F.cross_entropy for one-hot T)."""
    return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    target: torch.Tensor | None = None,
    extra_a: torch.Tensor | None = None,
    extra_valid: torch.Tensor | None = None,
    extra_weight: float = 1.0,
) -> torch.Tensor:
    """Symmetric InfoNCE between local rows ``a`` and ``b`` (normalised, [n, d]) gathered over ranks.

    ``target``: global [N, N] soft target (None = one-hot). ``extra_a``: per-row extra candidates
    for the a->b direction (local [n, d] for one, [n, k, d] for k, e.g. the negated report and
    other edited reports), each masked where ``extra_valid`` ([n] or [n, k]) is False.
    Returns this rank's loss; its mean over ranks is the global loss.
    """
    n = a.shape[0]
    all_a = gather(a, with_grad=gather_with_grad, local_loss=local_loss)
    all_b = gather(b, with_grad=gather_with_grad, local_loss=local_loss)
    if local_loss:
        offset = rank() * n
        rows_a, rows_b = a, b
        index = torch.arange(offset, offset + n, device=a.device)
    else:
        rows_a, rows_b = all_a, all_b
        index = torch.arange(all_a.shape[0], device=a.device)
    logits_ab = scale * rows_a @ all_b.T
    logits_ba = scale * rows_b @ all_a.T
    if target is None:
        tgt = F.one_hot(index, all_a.shape[0]).float()
    else:
        tgt = target.float()[index]
    tgt_ab = tgt
    if extra_a is not None:
        extra = extra_a if extra_a.dim() == 3 else extra_a.unsqueeze(1)
        if not local_loss:
            extra = gather(extra, with_grad=gather_with_grad, local_loss=False)
        extra_logit = scale * (rows_a.unsqueeze(1) * extra).sum(-1) + math.log(extra_weight)
        if extra_valid is not None:
            valid = extra_valid.reshape(extra_valid.shape[0], -1)
            if not local_loss:
                valid = all_gather_no_grad(valid.to(torch.uint8)).bool()
            extra_logit = extra_logit.masked_fill(~valid, MASKED_LOGIT)
        logits_ab = torch.cat([logits_ab, extra_logit], dim=1)
        tgt_ab = torch.cat([tgt, tgt.new_zeros(tgt.shape[0], extra.shape[1])], dim=1)
    return 0.5 * (soft_cross_entropy(logits_ab, tgt_ab) + soft_cross_entropy(logits_ba, tgt))


def edit_mask(edited: torch.Tensor, text_raw: torch.Tensor, identical_cos: float) -> torch.Tensor:
    """[n, k]: whether each cached edited report ([n, k, D], or [n, D] for k = 1) differs from its
    report ([n, D]). An edit column holds the report itself where there was nothing to edit, and
    scoring an image against its own report as a negative would fight the positive.

    Equal rows always count as identical: the builder encodes each distinct text once, so such a
    cell is the report's very row, while a real one-word edit of a long report can sit within
    1e-4 of it in cosine (``identical_cos`` 1.0 then keeps every real edit).
    """
    edited = edited if edited.dim() == 3 else edited.unsqueeze(1)
    report = text_raw.unsqueeze(1)
    cos = F.cosine_similarity(edited.float(), report.float(), dim=-1)
    return (cos < identical_cos) & ~(edited == report).all(-1)


def total_loss(
    cfg: LossConfig,
    feats: dict[str, torch.Tensor],
    aux: dict[str, torch.Tensor],
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """All enabled terms. ``feats``: image, text, scale [, negated, graph]; ``aux`` (no grad):
    text_raw [n, D] cached embeddings, labels [n, 14], graph_nodes [n, V] multi-hot, negated_valid.
    ``negated`` is [n, E] or [n, k, E] (the ``negation.columns()`` in order), ``negated_valid`` [n]
    or [n, k] to match.
    """
    target = None
    logs: dict[str, float] = {}
    if cfg.soft_labels.enabled:
        with torch.no_grad():
            g_emb = feats.get("graph")
            target = soft_targets(
                cfg.soft_labels,
                alpha,
                all_gather_no_grad(aux["text_raw"].float()),
                all_gather_no_grad(aux["labels"].float()) if "labels" in aux else None,
                all_gather_no_grad(aux["graph_nodes"].float()) if "graph_nodes" in aux else None,
                all_gather_no_grad(g_emb.detach().float()) if g_emb is not None else None,
            )
        logs["alpha"] = alpha
    neg = feats.get("negated") if cfg.negation.enabled else None
    kw = dict(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
    loss = clip_loss(
        feats["image"],
        feats["text"],
        feats["scale"],
        target=target,
        extra_a=neg,
        extra_valid=aux.get("negated_valid") if neg is not None else None,
        extra_weight=cfg.negation.weight,
        **kw,
    )
    logs["loss_clip"] = float(loss.detach())
    if "graph" in feats and cfg.graph_weight > 0:
        g_loss = clip_loss(feats["image"], feats["graph"], feats["scale"], target=target, **kw)
        logs["loss_graph"] = float(g_loss.detach())
        loss = loss + cfg.graph_weight * g_loss
    return loss, logs
