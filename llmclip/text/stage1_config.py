"""The stage-1 recipe (``stage: 1``): the report shards, the objectives and their schedule, and
the sections shared with stage 2 (run, model, optim, deepspeed) with stage-1 defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmclip.config import ConfigError, DeepSpeedSection, OptimConfig, RunConfig
from llmclip.text.model_config import ModelConfig
from llmclip.text.pairs import INSTRUCTIONS


@dataclass
class Stage1Data:
    """Where the reports come from."""

    shards: str = "shards/openi:train"
    """Text-only shard spec: DIR, DIR:train or DIR:train,val (never the eval split)."""
    num_workers: int = 0
    """Loader worker processes per rank (text decoding is light; 0 is fine on CPU)."""

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("must not be empty", "shards")
        if self.num_workers < 0:
            raise ConfigError("must be >= 0", "num_workers")


@dataclass
class ObjectiveConfig:
    """The stage-1 objectives and their schedule."""

    mntp_steps: int = 0
    """Optimizer steps of MNTP before the contrastive steps start."""
    mntp_mask_prob: float = 0.2
    """Share of report tokens blanked for MNTP."""
    mntp_chunk_mib: float = 32.0
    """MiB of fp32 logits per chunk of the MNTP cross-entropy (0 = materialise all the logits)."""
    contrastive_scale: float = 50.0
    """Cosine similarity is multiplied by this before the softmax (inverse temperature)."""
    hard_negatives: int = 1
    """One-error edits per query used as extra negatives (gathered across ranks like positives)."""
    length_buckets: int = 3
    """Separately padded length buckets per micro-step (one forward each; queries and documents share them)."""
    summary_fraction: float = 0.5
    """Share of pairs that are findings -> impression (the rest are report -> rewrite)."""
    task_batches: bool = False
    """One pair type per micro-step (drawn per step, the same on every rank, with probability
    ``summary_fraction`` for findings -> impression): a findings query then meets the other
    impressions of the global batch as negatives instead of mostly whole reports, which are easy."""
    instructions: dict[str, str] = field(default_factory=lambda: dict(INSTRUCTIONS))
    """Task instruction per pair type, prepended to queries and excluded from pooling ("" = none)."""

    def validate(self) -> None:
        if self.mntp_steps < 0:
            raise ConfigError("must be >= 0", "mntp_steps")
        if self.mntp_chunk_mib < 0:
            raise ConfigError("must be >= 0 (0 = no chunking)", "mntp_chunk_mib")
        if not 0 < self.mntp_mask_prob < 1:
            raise ConfigError("must be in (0, 1)", "mntp_mask_prob")
        if not self.contrastive_scale > 0:
            raise ConfigError("must be > 0", "contrastive_scale")
        if self.hard_negatives < 0:
            raise ConfigError("must be >= 0", "hard_negatives")
        if self.length_buckets < 1:
            raise ConfigError("must be >= 1", "length_buckets")
        if not 0 <= self.summary_fraction <= 1:
            raise ConfigError("must be in [0, 1]", "summary_fraction")
        missing = sorted(set(INSTRUCTIONS) - set(self.instructions))
        if missing:
            raise ConfigError(f"needs an instruction for {missing}", "instructions")


@dataclass
class Stage1Config:
    """A stage-1 recipe (``stage: 1``)."""

    stage: int = 1
    """Which trainer ``llmclip/train.py`` runs: 1 = this text encoder."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/stage1"))
    """Run folder, seed, logging and checkpoint cadence."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LLM, its precision, LoRA and pooling."""
    data: Stage1Data = field(default_factory=Stage1Data)
    """Text-only shards."""
    stage1: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Objectives and schedule."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the warmup + cosine schedule."""
    deepspeed: DeepSpeedSection = field(
        default_factory=lambda: DeepSpeedSection(config="ds_configs/cpu_zero3.json"))
    """DeepSpeed JSON and the values this recipe fills into it."""

    def validate(self) -> None:
        if self.stage != 1:
            raise ConfigError("a stage-1 config must say stage: 1", "stage")
        if self.stage1.mntp_steps > self.optim.max_steps:
            raise ConfigError("must not exceed optim.max_steps", "stage1.mntp_steps")
