"""Stage-1 losses: masked next-token prediction (MNTP) and supervised contrastive InfoNCE.

MNTP (LLM2Vec): ~20% of the report tokens are replaced by a blank token and token ``i`` is predicted
from the bidirectional state at position ``i - 1``, so the LM head the model was pretrained with
keeps its meaning while the layers learn to use right context.

Contrastive: each query (a report, or findings) has one positive (an equivalent rewrite, or the
impression) and ``H`` hard negatives (the same text with exactly one clinical error). Keys are every
positive and every hard negative of the *global* batch, gathered across ranks with gradients, so a
2-rank step computes the same loss and (after DeepSpeed's gradient averaging) the same gradients as
one rank holding the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmclip.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_max, rank

IGNORE = -100


def blank_token_id(tokenizer) -> int:
    """The MNTP blank: the tokenizer's mask token, else ``_`` (LLM2Vec's choice for Llama), else unk."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer("_", add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    if fallback is None:
        raise ValueError("tokenizer has no mask, '_' , unk or pad token to use as the MNTP blank")
    return int(fallback)


def mntp_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, blank_id: int, prob: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blank ~``prob`` of the real tokens after the first one (at least one per row).

    Returns (masked ids, labels) where labels hold the original id at blanked positions and -100
    elsewhere. Position 0 is never blanked: no state precedes it to predict it from.
    """
    cand = attention_mask.bool().clone()
    cand[:, 0] = False
    noise = torch.rand(input_ids.shape, generator=generator)
    chosen = cand & (noise < prob)
    # Rows where chance picked nothing: blank their candidate with the smallest noise.
    empty = ~chosen.any(1) & cand.any(1)
    if empty.any():
        first = torch.where(cand, noise, torch.full_like(noise, 2.0)).argmin(1)
        chosen[empty, first[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    masked = torch.where(chosen, torch.full_like(input_ids, blank_id), input_ids)
    return masked, labels


def mntp_rows(states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states that predict blanked tokens (state ``i - 1`` for token ``i``), [N, D], and those
    tokens, [N]. Only these go through the LM head: ~80% of a row's positions would be thrown away."""
    target = labels[:, 1:]
    sel = target != IGNORE
    return states[:, :-1][sel], target[sel]


def mntp_loss(states: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
              chunk_mib: float = 32.0) -> torch.Tensor:
    """Cross-entropy of token ``i`` predicted from the state at ``i - 1``, over blanked tokens only."""
    hidden, target = mntp_rows(states, labels)
    return lm_head_loss(hidden, lm_head, target, chunk_mib)


def lm_head_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, target: torch.Tensor,
                 chunk_mib: float = 32.0) -> torch.Tensor:
    """Mean cross-entropy of ``lm_head(hidden)`` against ``target``.

    With ``chunk_mib > 0`` the logits are never materialised for all rows at once
    (``chunked_linear_cross_entropy``; Liger's fused kernel on CUDA; checkpointed module calls under
    ZeRO-3); 0 = one plain ``lm_head`` + ``F.cross_entropy`` (what the others are tested against).
    """
    if chunk_mib <= 0 or getattr(lm_head, "bias", None) is not None:
        return F.cross_entropy(lm_head(hidden).float(), target)
    weight = lm_head.weight
    vocab = int(getattr(weight, "ds_shape", weight.shape)[0])
    rows = max(1, int(chunk_mib * 2**20 // (4 * vocab)))  # fp32 logits of `rows` tokens
    if hasattr(weight, "ds_id"):
        # ZeRO-3 owns the (often tied) head weight and fetches it through the module's hooks; each
        # chunk calls the module and is recomputed in the backward (one more head matmul per chunk).
        return _checkpointed_chunks(hidden, lm_head, target, rows)
    if hidden.is_cuda:  # Liger's fused Triton kernel when installed (None otherwise)
        from llmclip.text.kernels import fused_linear_cross_entropy

        fused = fused_linear_cross_entropy(hidden, weight, target)
        if fused is not None:
            return fused
    return chunked_linear_cross_entropy(hidden, weight, target, rows)


def _checkpointed_chunks(hidden: torch.Tensor, lm_head: torch.nn.Module, target: torch.Tensor,
                         rows: int) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h).float(), t, reduction="sum")

    n = hidden.shape[0]
    # The same number of head calls on every rank (each gathers the weight collectively): as many
    # chunks as the rank with the most blanked tokens needs; the others run empty ones.
    most = all_reduce_max(n, hidden.device)
    total = sum(checkpoint(chunk_sum, hidden[s:s + rows], target[s:s + rows], use_reentrant=False)
                for s in range(0, max(most, 1), rows))
    return total / max(n, 1)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 chunk_rows: int, vocab_block: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, target)`` (mean) without ever holding all the logits.

    hidden [N, D], weight [V, D] (an LM head without bias), target [N]. Rows are processed
    ``chunk_rows`` at a time and each chunk's gradient (softmax - one-hot) is folded into the input
    and weight gradients right away, in the forward: autograd then keeps two gradients of the inputs'
    own size instead of the [N, V] logits and their softmax, so peak memory no longer grows with the
    vocabulary (at 49K-128K vocabularies the logits are the largest tensor of an MNTP step). This is
    the CPU/any-device path; on CUDA with liger-kernel the fused Triton version does the same.

    Within a chunk the head is applied ``vocab_block`` rows of ``weight`` at a time, straight into
    one fp32 logits buffer that the softmax then overwrites in place. By default the whole head is
    one block when it is already in the compute dtype (no copy is made), and under autocast a block
    with a quarter of the chunk's logits elements: each matmul then casts a block of the head, not
    all of it (a whole bf16 copy of a 49K x 576 head is 54 MiB, of a 128K x 4096 one 1 GiB, more
    than the chunk).
    """
    if vocab_block is None:
        vocab_block = weight.shape[0]
        if _compute_dtype(hidden, weight) != weight.dtype:
            vocab_block = max(1, chunk_rows * weight.shape[0] // max(1, weight.shape[1]) // 4)
    return _ChunkedLinearCE.apply(hidden, weight, target, chunk_rows, vocab_block,
                                  torch.is_grad_enabled())


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What ``hidden @ weight.T`` would compute in here: the autocast dtype when autocast is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                chunk_rows: int, vocab_block: int, grad_enabled: bool) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        # (grad mode is off inside forward; the caller's mode says whether a backward can follow)
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        cdt = _compute_dtype(hidden, weight)
        acc = torch.promote_types(cdt, torch.float32)  # logits / softmax precision: fp32 at least
        blocks = [(v, min(v + vocab_block, vocab)) for v in range(0, vocab, vocab_block)]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are explicit
            hc = hidden.to(cdt)
            for s in range(0, n, chunk_rows):
                h, t = hc[s:s + chunk_rows], target[s:s + chunk_rows]
                logits = torch.empty((h.shape[0], vocab), dtype=acc, device=h.device)
                for a, b in blocks:
                    logits[:, a:b] = h @ weight[a:b].to(cdt).t()
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(1, keepdim=True)
                expsum = logits.sub_(top).exp_().sum(1, keepdim=True)  # logits now hold exp(l - max)
                total += (top.squeeze(1) + expsum.squeeze(1).log() - picked).sum()
                if want_h or want_w:
                    # d(mean CE)/d(logits) = (softmax - onehot) / N, in place over the chunk
                    p = logits.div_(expsum)
                    p[torch.arange(p.shape[0], device=p.device), t] -= 1.0
                    p.div_(max(n, 1))
                    gh = torch.zeros_like(h, dtype=acc) if want_h else None
                    h32 = h.to(grad_w.dtype) if want_w else None
                    for a, b in blocks:
                        if want_h:
                            gh += p[:, a:b].to(cdt) @ weight[a:b].to(cdt)
                        if want_w:
                            grad_w[a:b].addmm_(p[:, a:b].t().to(grad_w.dtype), h32)
                    if want_h:
                        grad_h[s:s + chunk_rows] = gh.to(hidden.dtype)
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.weight_dtype = weight.dtype
        return (total / max(n, 1)).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def contrastive_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                     negative_valid: torch.Tensor, positive_ids: torch.Tensor, negative_ids: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE of local queries against all gathered positives and hard negatives.

    query, positive: [B, D]; negatives: [B * H, D] with ``negative_valid`` [B * H] (False = padding
    where a report had fewer edits); ``positive_ids`` [B] / ``negative_ids`` [B * H]: int64 hashes of
    the key texts, so a key whose text equals this query's positive (two normal reports with the same
    impression) is not counted as a negative. Every rank must pass the same B and H.
    Returns the mean loss over local queries and (detached) accuracy of the positive being ranked first.
    """
    b = query.shape[0]
    q = F.normalize(query.float(), dim=-1)
    keys = torch.cat([all_gather_with_grad(positive.float()), all_gather_with_grad(negatives.float())])
    keys = F.normalize(keys, dim=-1)
    key_ids = torch.cat([all_gather_no_grad(positive_ids), all_gather_no_grad(negative_ids)])
    n_pos = keys.shape[0] - all_gather_no_grad(negative_valid).shape[0]
    valid = torch.cat([torch.ones(n_pos, dtype=torch.bool, device=q.device),
                       all_gather_no_grad(negative_valid.to(torch.uint8)).bool()])
    target = torch.arange(b, device=q.device) + rank() * b
    logits = scale * q @ keys.T
    same_text = key_ids.unsqueeze(0) == positive_ids.unsqueeze(1)
    own = torch.zeros_like(same_text)
    own[torch.arange(b), target] = True
    drop = (~valid).unsqueeze(0) | (same_text & ~own)
    logits = logits.masked_fill(drop, float("-inf"))
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean().item()
    return loss, {"contrastive_acc": acc}
