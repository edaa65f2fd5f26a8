"""Stage 1: train an LLM into a clinical report encoder under DeepSpeed (ZeRO-3, QLoRA-ready).

    deepspeed --num_gpus 2 llmclip/train.py --config configs/stage1/demo.yaml

Schedule: ``stage1.mntp_steps`` steps of masked next-token prediction, then supervised contrastive
steps until ``optim.max_steps``, one LoRA adapter throughout. Every step is a pure function of
(seed, step, rank, data position): masking and dropout are reseeded per step, so a run killed and
resumed from its latest checkpoint logs the same losses as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclip.config import (
    ConfigError,
    DeepSpeedSection,
    lr_factor,
    to_dict,
)
from llmclip.precision import resolve_precision
from llmclip.text.attention import use_fp32_attention
from llmclip.text.encoder import LLMEncoder
from llmclip.text.pairs import report_text
from llmclip.text.stage1_batch import _to, make_batch, step_seed
from llmclip.text.stage1_config import ObjectiveConfig, Stage1Config

log = logging.getLogger("llmclip.stage1")


# ------------------------------------------------------------------------------------ DeepSpeed
def precision(ds: DeepSpeedSection) -> str:
    """``bf16``, ``fp32`` or ``bf16-autocast`` (see ``llmclip.precision``)."""
    return resolve_precision(ds.precision, torch.cuda.is_available())


def use_bf16(ds: DeepSpeedSection) -> bool:
    return precision(ds) == "bf16"


def deepspeed_config(cfg: Stage1Config, world_size: int) -> dict[str, Any]:
    """The JSON recipe with this run's batch sizes, clip, precision, stage and monitors filled in."""
    from llmclip.ds_config import build_deepspeed_config

    return build_deepspeed_config(
        cfg.deepspeed, cfg.run, cfg.optim.grad_clip, world_size, "stage1", use_bf16(cfg.deepspeed)
    )


def zero3_leaf_mode(cfg: Stage1Config, zero3: bool) -> str:
    """``deepspeed.zero3_leaf`` resolved for this run (see ``llmclip.ds_config.mark_zero3_leaves``).

    DeepSpeed reduces a leaf module's gradients once per *call* of it, so leaves need one decoder
    forward per micro-step (``stage1.length_buckets: 1``); there ``auto`` makes each decoder layer
    one fetch unit (fewest hooks: ``benchmarks/zero3_fetch.py``), and with more buckets it keeps
    per-module hooks, trading hook overhead for bucketing's saved padding.
    """
    mode = cfg.deepspeed.zero3_leaf
    if not zero3:
        return "none"
    if mode == "auto":
        return "layer" if cfg.stage1.length_buckets == 1 else "none"
    if mode != "none" and cfg.stage1.length_buckets > 1:
        raise ConfigError(
            f"ZeRO-3 leaf modules need one forward per micro-step, but stage1.length_buckets is "
            f"{cfg.stage1.length_buckets}: DeepSpeed would reduce a leaf's gradients once per bucket; "
            "set stage1.length_buckets: 1 or deepspeed.zero3_leaf: auto|none", "deepspeed.zero3_leaf")
    return mode


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never biases, norms, latents or 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or "latents" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------ the module
class Stage1Module(nn.Module):
    """What DeepSpeed wraps: the encoder plus both objectives, so every parameter fetch under
    ZeRO-3 happens inside one ``forward``."""

    def __init__(self, encoder: LLMEncoder, obj: ObjectiveConfig, autocast: bool = False,
                 autocast_attention: str = "fp32"):
        super().__init__()
        self.encoder = encoder
        self.obj = obj
        self.autocast = autocast  # bf16 matmuls, fp32 weights and optimizer (bf16-autocast)
        if autocast and autocast_attention == "fp32" and not torch.cuda.is_available():
            use_fp32_attention(encoder.decoder)  # CPU: fp32 flash attention beats bf16 (attention.py)

    def forward(self, kind: str, **batch: torch.Tensor) -> dict[str, Any]:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            return self._forward(kind, **batch)

    def _forward(self, kind: str, **batch: torch.Tensor) -> dict[str, Any]:
        from llmclip.text.objectives import contrastive_loss, lm_head_loss, mntp_rows

        enc = self.encoder
        if kind == "mntp":  # one forward per length bucket; one head loss over all blanked rows
            b = batch["buckets"]
            rows = [mntp_rows(enc.hidden_states(i, a), lab) for i, a, lab
                    in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)]
            hidden, target = torch.cat([h for h, _ in rows]), torch.cat([t for _, t in rows])
            loss = lm_head_loss(hidden, enc.lm_head, target, self.obj.mntp_chunk_mib)
            return {"loss": loss, "metrics": {}}
        emb = enc.embed_buckets(batch["texts"])  # queries, positives, the encoded negatives
        b = int(batch["queries"])
        rows = batch["neg_rows"]
        neg = emb[2 * b :]
        if neg.shape[0] != rows.numel():  # fillers were not encoded: zero rows, masked in the loss
            neg = neg.new_zeros(rows.numel(), neg.shape[1]).index_put((rows,), neg)
        loss, metrics = contrastive_loss(emb[:b], emb[b : 2 * b], neg, batch["neg_valid"], batch["pos_ids"],
                                         batch["neg_ids"], self.obj.contrastive_scale)
        return {"loss": loss, "metrics": metrics}


def calibrate_standardize(engine: Any, cfg: Stage1Config, device: torch.device,
                          index: Any = None) -> None:
    """Set the pooler's ``Standardize`` from pooled-vector statistics of training reports.

    Every rank measures ``model.calibration_reports`` reports of its own (its take of a separately
    seeded order, so the training data position is untouched); sums are all-reduced. ``index``: the
    training stream's ``SampleIndex``, to not read the shards twice. Runs before step 1, where
    LoRA's B matrices are zero, so the statistics are those of the model training starts from.
    """
    import torch.distributed as dist

    from llmclip.checkpoint import set_trainable
    from llmclip.text.pooling import Standardize
    from llmclip.text.stream import ReportStream

    enc = engine.module.encoder
    std = enc.pooler.standardize
    texts = [report_text(m) for m in ReportStream(cfg.data.shards, seed=cfg.run.seed + 7919,
                                                  index=index).take(cfg.model.calibration_reports)]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # the same number of reports (so of forwards: ZeRO-3 gathers) on every rank
        n = torch.tensor([len(texts)], dtype=torch.int64, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        texts = texts[: int(n.item())]
    if not texts:
        raise ConfigError(f"no reports in {cfg.data.shards} to calibrate on (on some rank)", "model.standardize")
    sums = torch.zeros(2, enc.dim, dtype=torch.float64, device=device)
    # The pooler's own weights gathered whole for the pass: ``raw`` bypasses the pooler's module
    # hook, through which ZeRO-3 would fetch them.
    import deepspeed

    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(enc.pooler.parameters()), modifier_rank=None):
        for i in range(0, len(texts), 16):
            b = _to(enc.tokenize(texts[i : i + 16]), device)
            x = enc.pooler.raw(enc.hidden_states(b["input_ids"], b["attention_mask"]), b["pool_mask"]).double()
            sums[0] += x.sum(0)
            sums[1] += (x * x).sum(0)
    count = torch.tensor([float(len(texts))], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(count)
    center, inv_scale = Standardize.statistics(count, sums[0], sums[1])
    set_trainable(engine, std.center, center.float().cpu())
    set_trainable(engine, std.inv_scale, inv_scale.float().cpu())
    log.info("standardize: calibrated on %d reports; largest |center| %.2f", int(count.item()),
             center.abs().max().item())


def _cpu_threads() -> None:
    """Split the CPU cores between the ranks of this node instead of oversubscribing them.

    An exported ``OMP_NUM_THREADS`` wins (torch already took it), as in the cache builder: it is what
    slurm/launch.sh sets per node, and two ranks only compute bit-identical steps wherever they
    run with the same thread count.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0)
    if not local:
        local = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ the run
def run(cfg: Stage1Config) -> int:
    """Train (or resume) a stage-1 run and export ``RUN/final/``; every rank calls this."""
    import deepspeed
    import yaml

    from llmclip.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from llmclip.distributed import all_gather_no_grad, barrier, init_distributed
    from llmclip.ds_config import mark_zero3_leaves
    from llmclip.faults import inject_nonfinite
    from llmclip.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
    from llmclip.text.export import export_final
    from llmclip.text.kernels import attention_backends
    from llmclip.text.objectives import blank_token_id
    from llmclip.text.sources import resolve_source
    from llmclip.text.stream import ReportStream

    env = init_distributed(cfg.run.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(name)s: %(message)s")
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        _cpu_threads()
    out = Path(cfg.run.out_dir)
    ds_config = deepspeed_config(cfg, env.world_size)
    bf16 = ds_config["bf16"]["enabled"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        resolve_source(cfg.model.source, cfg.model.tiny, cfg.model.cache_dir or None)  # convert once
    barrier()

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    leaf_mode = zero3_leaf_mode(cfg, zero3)  # a bad combination fails before the model is built
    hf_ds = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive while from_pretrained runs  # noqa: F841
    torch.manual_seed(cfg.run.seed)
    encoder = LLMEncoder.build(cfg.model, dtype)
    mode = precision(cfg.deepspeed)
    module = Stage1Module(encoder, cfg.stage1, autocast=mode == "bf16-autocast",
                          autocast_attention=cfg.deepspeed.autocast_attention)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    leaves = mark_zero3_leaves(module, leaf_mode, ds_config)
    log.info("trainable parameters: %d; precision %s; ZeRO stage %s (%d leaf modules); world %d",
             n_train, mode, ds_config["zero_optimization"].get("stage"), leaves, env.world_size)
    if env.is_main:  # as used: layer leaves have just raised the prefetch bucket to a whole layer
        if leaf_mode == "layer":
            log.info("ZeRO-3 prefetch bucket: %d parameters",
                     ds_config["zero_optimization"]["stage3_prefetch_bucket_size"])
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2), encoding="utf-8")
    optimizer = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    # from_pretrained returns eval mode; training mode also keeps bitsandbytes from repacking 4-bit
    # weights for its CPU inference kernel, which ZeRO-3's release/re-gather would silently undo.
    engine.train()
    blank_id = blank_token_id(encoder.tokenizer)

    stream = ReportStream(cfg.data.shards, seed=cfg.run.seed, num_workers=cfg.data.num_workers)

    def data_state() -> dict[str, Any]:
        # A global sample count, the same on every rank: valid on any world size (llmclip.data.order).
        return {"data": {"position": stream.position()}}

    start = 0
    ckpt = latest_checkpoint(out) if cfg.run.resume else None
    if ckpt is None and cfg.model.standardize:
        calibrate_standardize(engine, cfg, device, stream.index)
    if ckpt is not None:
        info = load_checkpoint(ckpt, engine)
        start = int(info["step"])
        stream.restore((info.get("data") or {}).get("position"))
        if env.is_main:
            _truncate_metrics(out / "metrics.jsonl", start)
            log.info("resumed from %s at step %d", ckpt, start)

    accum = cfg.deepspeed.grad_accum
    bar = None
    if env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.optim.max_steps, initial=start, desc="stage1", unit="step", dynamic_ncols=True)
    nonfinite, step = 0, start
    preempt = PreemptionHandler()  # SIGUSR1 from slurm/launch.sh: checkpoint, exit, get requeued
    while step < cfg.optim.max_steps:
        kind = "mntp" if step < cfg.stage1.mntp_steps else "contrastive"
        t0, c0 = time.perf_counter(), time.process_time()
        losses, metrics, skip = [], {}, False
        for micro in range(accum):
            seed = step_seed(cfg.run.seed, step, env.rank, micro)
            metas = stream.take(cfg.deepspeed.micro_batch_size)
            task_seed = step_seed(cfg.run.seed, step, 0, micro)
            batch = _to(make_batch(kind, metas, encoder, cfg.stage1, seed, blank_id, task_seed), device)
            torch.manual_seed(seed)  # dropout: same draws whether or not the run was resumed
            with attention_backends(device, allow_math=True):  # fused SDPA kernels first on CUDA
                outp = engine(**batch)
            loss = inject_nonfinite(outp["loss"], step + 1, env.rank)  # tests/faults only
            bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=device)
            if all_gather_no_grad(bad).sum().item() > 0:
                skip = True
                break
            with attention_backends(device, allow_math=True):  # checkpointing recomputes attention
                engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            metrics = outp["metrics"]
        if skip:
            nonfinite += 1
            log.warning("non-finite loss at step %d on some rank: step skipped (%d in a row)", step + 1,
                        nonfinite)
            if nonfinite >= cfg.run.max_nonfinite_steps:
                raise RuntimeError(f"{nonfinite} consecutive non-finite losses; stopping at step {step + 1}")
            continue
        nonfinite = 0
        step += 1
        mean_loss = all_gather_no_grad(torch.stack(losses).mean().reshape(1)).mean().item()
        if bar is not None:
            bar.set_postfix(kind=kind, loss=f"{mean_loss:.4f}", refresh=False)
            bar.update(1)
        if env.is_main and (step % cfg.run.log_every == 0 or step == cfg.optim.max_steps or step == 1):
            rec = {"step": step, "objective": kind, "loss": mean_loss,
                   "lr": engine.get_lr()[0], "step_time_s": time.perf_counter() - t0,
                   "step_cpu_s": time.process_time() - c0,  # rank 0's CPU time: wall on an idle machine
                   "samples_seen": stream.samples, **metrics}
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if engine.monitor is not None and engine.monitor.enabled:
                engine.monitor.write_events([(f"stage1/{k}", float(v), step) for k, v in rec.items()
                                             if isinstance(v, (int, float)) and k != "step"])
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.optim.max_steps:
            save_checkpoint(out, step, engine, data_state(), keep=cfg.run.keep_checkpoints)
        if step < cfg.optim.max_steps and preempt.requested():  # every rank, same step
            save_checkpoint(out, step, engine, data_state(), keep=cfg.run.keep_checkpoints)
            log.warning("SIGUSR1: checkpoint at step %d written; exit %d to be requeued", step,
                        PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE
    if bar is not None:
        bar.close()
    save_checkpoint(out, step, engine, data_state(), keep=cfg.run.keep_checkpoints)
    if stream.dropped and env.is_main:
        log.warning("%d samples left out or stood in for (no report text, unreadable)", stream.dropped)
    if hf_ds is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del hf_ds
        unset_hf_deepspeed_config()  # the export loads a plain model on rank 0 only
    export_final(engine.module, cfg, out / "final", dtype)
    barrier()
    return 0
