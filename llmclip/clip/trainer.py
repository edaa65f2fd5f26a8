"""The stage-2 training loop (see ``llmclip.clip.stage2`` for the config and the entry point).

One optimizer step = ``grad_accum`` micro-batches per rank. Every rank runs exactly ``max_steps``
steps (the contrastive loss is a collective); each micro-batch is the rank's take of the global
data order, epochs chained without a gap. Randomness (augmentation, drop-path) is
re-seeded from (seed, step, rank) every step, and the data position is saved with every
checkpoint, so a killed run resumed from its last checkpoint takes the same steps as an
uninterrupted one. The data order is global (``llmclip.data.order``): the position is a count of
samples, so a run resumed on another number of ranks continues from the exact sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmclip.cache import EmbeddingCache, shard_name
from llmclip.clinical.graph import GRAPH_VOCAB_SHA
from llmclip.clip import state as ckpt
from llmclip.clip.batching import (
    GraphFeaturizer,
    cache_rows,
    label_matrix,
    report_text,
    text_statistics,
)
from llmclip.clip.losses import edit_mask, total_loss
from llmclip.clip.model import CLIPModel
from llmclip.clip.stage2 import (
    Stage2Config,
    _env_threads,
    _now,
    augment,
    make_engine,
    stage2_precision,
)
from llmclip.config import ConfigError, to_dict
from llmclip.data.order import RankStream, build_index
from llmclip.distributed import init_distributed
from llmclip.faults import inject_nonfinite
from llmclip.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler


def sample_shard(sample: dict[str, Any]) -> str:
    """The shard a sample came from (the loader names it), for its cache rows."""
    name = sample.get("shard")
    if not name:
        raise ConfigError(
            f"sample {sample.get('key')!r} carries no shard name; cannot find its cache rows"
        )
    return shard_name(str(name))


class Stage2Trainer:
    def __init__(self, cfg: Stage2Config):
        from deepspeed.accelerator import get_accelerator

        from llmclip.clinical import CHEXPERT_CLASSES
        from llmclip.data.shards import resolve_shards

        _env_threads()
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.classes = list(CHEXPERT_CLASSES)

        # Refuse a cache that does not match the shards (or the encoder) before any heavy work,
        # on every rank, before the process group is formed.
        cfg.data.check_paths()
        shards = resolve_shards(cfg.data.shards, "image")
        if not shards:
            raise ConfigError(f"no image shards in {cfg.data.shards}", "data.shards")
        self.cache = EmbeddingCache(cfg.data.cache)
        self.cache.check_matches(
            shards,
            fingerprint=ckpt.encoder_fingerprint(cfg.data.encoder),
            check_keys=cfg.data.check_keys,
        )
        self.text_col = self.cache.variant_index(cfg.data.text_variant)
        neg = cfg.loss.negation
        self.neg_cols = neg.column_indices(self.cache.variants) if neg.enabled else None
        self.env = init_distributed(cfg.run.collective_timeout_s)

        torch.manual_seed(cfg.run.seed)
        self.model = CLIPModel(cfg.model, self.cache.dim, cfg.data.image_size)
        if cfg.model.text.standardize:
            mean, std = text_statistics(self.cache, [s.name for s in shards], self.text_col)
            self.model.text_adapter.set_statistics(mean, std)
        need_graph = cfg.model.graph.enabled or (
            cfg.loss.soft_labels.enabled and cfg.loss.soft_labels.weight_graph > 0
        )
        self.graphs = GraphFeaturizer(cfg.model.graph) if need_graph else None
        self.engine, self.optimizer, self.scheduler, self.ds_config = make_engine(
            self.model, cfg, self.env.world_size, get_accelerator().device_name()
        )
        self.device = self.engine.device
        self.nonfinite_total = 0
        # SIGUSR1 (slurm/launch.sh): checkpoint at the step boundary, exit, get requeued.
        self.preempt = PreemptionHandler()
        self.stream = RankStream(
            build_index(cfg.data.shards, "image", shards=shards),
            seed=cfg.run.seed,
            n=cfg.deepspeed.micro_batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            image_size=cfg.data.image_size,
            num_workers=cfg.data.num_workers,
            epoch_samples=cfg.data.epoch_samples,
        )
        self.step = 0
        if self.env.is_main:
            print(f"stage2: precision {stage2_precision(cfg)}; world {self.env.world_size}", flush=True)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_files(self.out, to_dict(cfg), self.ds_config)
        if cfg.run.resume:
            resumed = ckpt.load_latest(self.out, self.engine, self.env)
            if resumed is not None:
                self.step = int(resumed["step"])
                # A global sample count: valid on any number of ranks (llmclip.data.order).
                self.stream.restore(resumed.get("data"))
                if self.env.is_main:
                    print(f"stage2: resumed from step {self.step}", flush=True)

    # --------------------------------------------------------------------------------------------

    def _inputs(self, samples: list[dict[str, Any]], gen: torch.Generator) -> tuple[dict, dict]:
        keys = [s["key"] for s in samples]
        metas = [s["meta"] for s in samples]
        rows = torch.from_numpy(cache_rows(self.cache, [sample_shard(s) for s in samples], keys))
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
        pixels = self.model.preprocess(images.to(self.device))
        if self.cfg.data.augment:
            pixels = augment(pixels, gen)
        text_raw = rows[:, self.text_col].to(self.device)
        inputs: dict[str, Any] = {"pixels": pixels, "text_emb": text_raw}
        aux: dict[str, torch.Tensor] = {
            "text_raw": text_raw,
            "labels": label_matrix(metas, self.classes).to(self.device),
        }
        if self.neg_cols is not None:
            neg = rows[:, self.neg_cols].to(self.device)  # [n, k, D]
            inputs["negated_emb"] = neg
            aux["negated_valid"] = edit_mask(neg, text_raw, self.cfg.loss.negation.identical_cos)
        if self.graphs is not None:
            texts = [report_text(m) for m in metas]
            if self.cfg.model.graph.enabled:
                inputs["graph"] = {
                    k: v.to(self.device) for k, v in self.graphs.tensors(keys, texts).items()
                }
            aux["graph_nodes"] = self.graphs.node_sets(keys, texts).to(self.device)
        return inputs, aux

    def _micro_step(self, gen: torch.Generator) -> dict[str, float]:
        inputs, aux = self._inputs(self.stream.next(), gen)
        feats = self.engine(
            inputs["pixels"],
            inputs["text_emb"],
            graph=inputs.get("graph"),
            negated_emb=inputs.get("negated_emb"),
        )
        alpha = self.cfg.loss.soft_labels.alpha(self.step, self.cfg.optim.max_steps)
        loss, logs = total_loss(self.cfg.loss, feats, aux, alpha)
        loss = inject_nonfinite(loss, self.step + 1, self.env.rank)  # tests/faults only
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if self.env.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            # Dropped on every rank alike (no backward, no step): the weights and the optimizer
            # state stay as they were; the trainer counts consecutive drops and stops at a limit.
            return {"nonfinite": 1.0, "loss": float("nan"), "scale": float(feats["scale"].detach())}
        self.engine.backward(loss)
        self.engine.step()
        logs["loss"] = float(loss.detach())
        logs["scale"] = float(feats["scale"].detach())
        return logs

    def train(self) -> int:
        """Run to ``max_steps`` (0) or until preempted (``PREEMPTED_EXIT_CODE``, after a checkpoint)."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=cfg.optim.max_steps,
            initial=self.step,
            desc="stage2",
            disable=not self.env.is_main,
            dynamic_ncols=True,
        )
        nonfinite, t0, samples = 0, _now(), 0
        window: dict[str, float] = {}
        while self.step < cfg.optim.max_steps:
            gen = torch.Generator().manual_seed(
                cfg.run.seed * 1_000_003 + self.step * 1009 + self.env.rank
            )
            torch.manual_seed(cfg.run.seed * 1_000_003 + self.step * 1009 + self.env.rank)
            logs: dict[str, float] = {}
            for _ in range(cfg.deepspeed.grad_accum):
                for k, v in self._micro_step(gen).items():
                    logs[k] = logs.get(k, 0.0) + v / cfg.deepspeed.grad_accum
            if any(k == "nonfinite" for k in logs):
                nonfinite += 1
                self.nonfinite_total += 1
                if self.env.is_main:
                    print(
                        f"stage2: non-finite loss at step {self.step + 1}: batch dropped",
                        flush=True,
                    )
                if nonfinite >= cfg.run.max_nonfinite_steps:
                    raise RuntimeError(
                        f"stage2: {nonfinite} consecutive steps with a non-finite loss at step "
                        f"{self.step + 1}; the last checkpoint is intact (lower optim.lr?)"
                    )
                continue
            nonfinite = 0
            logs = self._reduce(logs)
            self.step += 1
            samples += (
                cfg.deepspeed.micro_batch_size * cfg.deepspeed.grad_accum * self.env.world_size
            )
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            bar.set_postfix(loss=f"{logs['loss']:.3f}", T=f"{1 / logs['scale']:.3f}", refresh=False)
            bar.update(1)
            if self.step % cfg.run.log_every == 0 or self.step == cfg.optim.max_steps:
                n = (
                    cfg.run.log_every
                    if self.step % cfg.run.log_every == 0
                    else (self.step % cfg.run.log_every)
                )
                record = {k: v / n for k, v in window.items()}
                record.update(
                    step=self.step,
                    lr=self.scheduler.get_last_lr()[0],
                    samples_per_s=samples / (_now() - t0),
                    epoch=self.stream.epoch,
                )
                self._log(record)
                window, t0, samples = {}, _now(), 0
            if (
                cfg.run.save_every
                and self.step % cfg.run.save_every == 0
                and self.step < cfg.optim.max_steps
            ):
                self.save()
            if self.preempt.requested():  # SIGUSR1 on any rank (slurm/launch.sh): all stop here
                self.save()
                bar.close()
                if self.env.is_main:
                    print(
                        f"stage2: preempted; checkpoint at step {self.step}, exiting to be requeued",
                        flush=True,
                    )
                return PREEMPTED_EXIT_CODE
        bar.close()
        self.save()
        ckpt.export_final(self.out, self.model, self._final_meta(), self.env)
        return 0

    def _reduce(self, logs: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of every logged number (local-loss values differ per rank)."""
        if self.env.world_size == 1:
            return logs
        names = sorted(logs)
        t = torch.tensor([logs[k] for k in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.env.world_size for k, v in zip(names, t.tolist(), strict=True)}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            events = [
                (f"train/{k}", float(v), record["step"]) for k, v in record.items() if k != "step"
            ]
            monitor.write_events(events)

    def _final_meta(self) -> dict[str, Any]:
        return {
            "format": "llmclip-clip/1",
            "model": to_dict(self.cfg.model),
            "image_size": self.cfg.data.image_size,
            "text_dim": self.cache.dim,
            "text_variant": self.cfg.data.text_variant,
            "cache": str(Path(self.cfg.data.cache).resolve()),
            "cache_fingerprint": self.cache.fingerprint,
            # Relative to RUN/final where possible, so a run copied with its encoder still finds it.
            **ckpt.encoder_record(self.cfg.data.encoder, self.out / "final"),
            "instruction": self.cache.identity.instruction,
            # The graph encoder's embedding rows are GRAPH_VOCAB indices: tie them to that list.
            "graph_vocab_sha": GRAPH_VOCAB_SHA if self.cfg.model.graph.enabled else None,
            "steps": self.step,
        }

    def save(self) -> None:
        opt = self.engine.optimizer
        if hasattr(opt, "_hp_optimizer_states_linked"):
            # ZeRO-1/2 step their param groups one at a time and link the per-parameter views of
            # the optimizer state after the first group's first step only, so later groups' views
            # miss exp_avg/exp_avg_sq. Relink now that every group has state (cheap: views).
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        # The same on every rank (the ranks take in lockstep): no gather needed.
        ckpt.save(
            self.out,
            self.step,
            self.engine,
            {"data": self.stream.position()},
            self.cfg.run.keep_checkpoints,
            self.env,
        )

    def close(self) -> None:
        if hasattr(self, "preempt"):
            self.preempt.close()
        monitor = getattr(getattr(self, "engine", None), "monitor", None)
        writer = getattr(monitor, "tb_monitor", None)
        if writer is not None and getattr(writer, "summary_writer", None) is not None:
            writer.summary_writer.flush()


def run(cfg: Stage2Config) -> int:
    """Train (resuming when a checkpoint exists); ``RUN/final`` then holds the model.

    Returns the exit code: 0, or ``llmclip.preemption.PREEMPTED_EXIT_CODE`` after a SIGUSR1
    (checkpoint written; the SLURM script requeues the job, which resumes).
    """
    trainer = Stage2Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
