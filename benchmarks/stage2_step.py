"""Stage-2 training steps/s: llmclip on cached LLM embeddings vs open_clip's own training step.

    python benchmarks/stage2_step.py                       # tiny ViT, 96 px, batch 32 (~4-7 min, 2 cores)
    python benchmarks/stage2_step.py --vision vit_small_patch16_224 --image-size 224 --batch 64

Three contenders train the *same* timm vision tower (same name, image size, batch, fp32, AdamW,
grad-norm clip 1.0) on the same real Open-I reports:

- ``llmclip (cache)``: what ``llmclip/train.py`` runs for stage 2 -- ``CLIPModel`` + ``total_loss``
  under a DeepSpeed engine (ZeRO-2 JSON of the repo, torch AdamW, warmup+cosine), text = one fp16 row
  per sample read from a memory-mapped embedding sidecar; the LLM is never run.
- ``open_clip``: open_clip's training loop itself (``open_clip_train.train.train_one_epoch`` with
  ``ClipLoss``, its AdamW parameter groups and ``cosine_lr``) on an ``open_clip.CLIP`` whose vision
  tower is the same timm model and whose text tower is open_clip's standard one (the ViT-B-16 text
  transformer: 12 layers x 512, 77 tokens), run online as open_clip always does.
- ``llmclip (online LLM)``: the llmclip step, but the report embedding comes from running the frozen
  ``LLMEncoder`` (a tiny random Llama with the real SmolLM2 tokenizer) on every batch.

Tokenisation and image decoding are loader work in all three and happen before timing. Repetitions
are interleaved in rotating order; the final line is the median of per-repetition ratios.
Needs open_clip (benchmark-only peer): ``.venv/bin/pip install open-clip-torch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

OPEN_CLIP_HINT = "open_clip is not installed; it is the peer of this benchmark:\n    " + (
    f"{sys.executable} -m pip install open-clip-torch"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_tiny_patch16_224", help="timm model (both contenders)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each contender")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=12, help="open_clip text tower depth")
    p.add_argument("--text-width", type=int, default=512, help="open_clip text tower width")
    p.add_argument("--context", type=int, default=77, help="open_clip text context length")
    p.add_argument("--llm-hidden", type=int, default=256, help="online tiny Llama width")
    p.add_argument("--llm-layers", type=int, default=4, help="online tiny Llama depth")
    p.add_argument("--max-tokens", type=int, default=128, help="report token limit of the LLM")
    p.add_argument("--no-online", action="store_true", help="skip the online-LLM contender")
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# llmclip
# ------------------------------------------------------------------------------------------------


class LLMClipStep:
    """The stage-2 trainer's micro-step (``Stage2Trainer._micro_step``) on in-memory batches."""

    def __init__(self, args: argparse.Namespace, text_dim: int, workdir: Path):
        import deepspeed

        from llmclip.clip.model import CLIPModel, ModelConfig, VisionConfig
        from llmclip.clip.stage2 import (
            Stage2Config,
            Stage2OptimConfig,
            build_ds_config,
            lr_factor,
            param_groups,
        )
        from llmclip.config import DeepSpeedSection, RunConfig

        C.single_rank_env()
        cfg = Stage2Config(
            run=RunConfig(out_dir=str(workdir / "run"), tensorboard=False),
            model=ModelConfig(vision=VisionConfig(name=args.vision), embed_dim=args.embed_dim),
            optim=Stage2OptimConfig(lr=5e-4, weight_decay=0.2, warmup_steps=10, max_steps=10_000),
            deepspeed=DeepSpeedSection(
                config=str(C.REPO / "ds_configs/cpu_zero2.json"),
                micro_batch_size=args.batch,
                precision="fp32",
            ),
        )
        cfg.data.augment = False  # open_clip augments in its loader workers; neither side here
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = CLIPModel(cfg.model, text_dim, args.image_size)
        opt = torch.optim.AdamW(
            param_groups(self.model, cfg.optim),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim))
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=sched, config=build_ds_config(cfg, 1)
        )
        self.step_no = 0
        self.last_loss = float("nan")

    def step(self, images: torch.Tensor, text_raw: torch.Tensor, labels: torch.Tensor) -> None:
        from llmclip.clip.losses import total_loss

        pixels = self.model.preprocess(images)
        feats = self.engine(pixels, text_raw)
        aux = {"text_raw": text_raw, "labels": labels}
        alpha = self.cfg.loss.soft_labels.alpha(self.step_no, self.cfg.optim.max_steps)
        loss, _ = total_loss(self.cfg.loss, feats, aux, alpha)
        self.engine.backward(loss)
        self.engine.step()
        self.step_no += 1
        self.last_loss = float(loss.detach())


class CachedRows:
    """fp16 report embeddings in an ``.npy`` sidecar, memory-mapped and gathered per batch, as the
    embedding cache serves them (``EmbeddingCache.rows``)."""

    def __init__(self, path: Path, rows: np.ndarray):
        np.save(path, rows.astype(np.float16))
        self.arr = np.load(path, mmap_mode="r", allow_pickle=False)

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.arr[idx]))


# ------------------------------------------------------------------------------------------------
# open_clip
# ------------------------------------------------------------------------------------------------


class BatchList(list):
    """What ``train_one_epoch`` reads from ``data['train']``: a dataloader with sizes."""

    def __init__(self, batches: list, batch_size: int):
        super().__init__(batches)
        self.num_batches = len(batches)
        self.num_samples = len(batches) * batch_size


class OpenClipStep:
    """open_clip's ``train_one_epoch`` over ``steps`` in-memory batches per call."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        import open_clip
        import timm
        from open_clip_train.scheduler import cosine_lr

        cfg = {
            "embed_dim": args.embed_dim,
            "vision_cfg": {
                "timm_model_name": args.vision,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": args.image_size,
            },
            "text_cfg": {
                "context_length": args.context,
                "vocab_size": 49408,
                "width": args.text_width,
                "heads": max(1, args.text_width // 64),
                "layers": args.text_layers,
            },
        }
        cfg_dir = workdir / "open_clip_cfg"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "bench-timm.json").write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(cfg_dir)
        torch.manual_seed(0)
        model = open_clip.create_model("bench-timm", pretrained=None, output_dict=True)
        # open_clip builds timm towers at their default resolution; rebuild the trunk at this
        # image size exactly as llmclip does (same timm call), so both train the same network.
        model.visual.trunk = timm.create_model(
            args.vision, pretrained=False, num_classes=0, img_size=args.image_size
        )
        self.model = model
        self.tokenizer = open_clip.get_tokenizer("bench-timm")
        # Parameter groups and optimizer exactly as open_clip_train.main builds them.
        named = list(model.named_parameters())

        def exclude(n: str, p: torch.nn.Parameter) -> bool:
            return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

        gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
            lr=5e-4,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        self.scheduler = cosine_lr(self.optimizer, 5e-4, 10, 10_000)
        self.loss = open_clip.ClipLoss(
            local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1
        )
        self.args = SimpleNamespace(
            device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
            grad_clip_norm=1.0, horovod=False, log_every_n_steps=10**9, batch_size=args.batch,
            world_size=1, rank=0, local_rank=0, wandb=False, distributed=False,
        )  # fmt: skip
        self.epoch = 0

    def run(self, batches: BatchList) -> None:
        from open_clip_train.train import train_one_epoch

        data = {"train": SimpleNamespace(dataloader=batches, set_epoch=lambda e: None)}
        train_one_epoch(
            self.model, data, self.loss, self.epoch, self.optimizer, None, self.scheduler,
            None, self.args, tb_writer=None,
        )  # fmt: skip
        self.epoch += 1


# ------------------------------------------------------------------------------------------------
# online LLM encoder
# ------------------------------------------------------------------------------------------------


def tiny_encoder(args: argparse.Namespace):
    """A frozen LLMEncoder: tiny random Llama (real SmolLM2 tokenizer), bidirectional, mean pool."""
    from llmclip.text.encoder import LLMEncoder, ModelConfig
    from llmclip.text.sources import TinyLlamaSpec

    spec = TinyLlamaSpec(
        hidden_size=args.llm_hidden,
        num_hidden_layers=args.llm_layers,
        num_attention_heads=max(1, args.llm_hidden // 64),
        num_key_value_heads=max(1, args.llm_hidden // 128),
        intermediate_size=args.llm_hidden * 8 // 3 // 64 * 64 or 64,
    )
    mcfg = ModelConfig(source="tiny:llama", tiny=spec, max_length=args.max_tokens, attention="sdpa")
    enc = LLMEncoder.build(mcfg, torch.float32, lora=False)
    return enc.eval()


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.offline_hub()
    try:
        import open_clip  # noqa: F401
        import open_clip_train  # noqa: F401
    except ImportError:
        print(OPEN_CLIP_HINT, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    threads = C.set_threads(args.threads)
    b, s, k = args.batch, args.image_size, args.steps
    n = b * k
    texts = C.openi_texts(n)
    from llmclip.clinical import CHEXPERT_CLASSES, Labeler

    labeler = Labeler()
    labels = torch.from_numpy(
        np.nan_to_num(np.stack([labeler.label(t).as_array() for t in texts]), nan=0.0)
    ).clamp(min=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, s, s), dtype=torch.uint8, generator=gen)
    images = images.expand(-1, 3, -1, -1).contiguous()  # the loader's uint8 [B, 3, S, S]
    assert labels.shape[1] == len(CHEXPERT_CLASSES)

    with tempfile.TemporaryDirectory(prefix="llmclip-bench-") as tmp:
        work = Path(tmp)
        enc = None if args.no_online else tiny_encoder(args)
        text_dim = enc.dim if enc is not None else args.llm_hidden
        rows = np.random.default_rng(0).standard_normal((n, text_dim)).astype(np.float32)
        if enc is not None:  # the cache holds what the encoder produces for these reports
            rows = enc.encode(texts, batch_tokens=4096).numpy()
        cache = CachedRows(work / "train-000000.emb.npy", rows)

        ours = LLMClipStep(args, text_dim, work)
        peer = OpenClipStep(args, work)
        C.set_threads(args.threads)  # DeepSpeed's CPU accelerator may have changed it
        norm = (images.float() / 255.0 - 0.5) / 0.5  # open_clip's loader output (normalised)
        tokens = peer.tokenizer(texts)
        oc_batches = BatchList(
            [(norm[i * b : (i + 1) * b], tokens[i * b : (i + 1) * b]) for i in range(k)], b
        )
        idx = [np.arange(i * b, (i + 1) * b) for i in range(k)]
        lab = [labels[i * b : (i + 1) * b] for i in range(k)]
        img = [images[i * b : (i + 1) * b] for i in range(k)]
        tok = None
        if enc is not None:
            tok = [enc.tokenize(texts[i * b : (i + 1) * b]) for i in range(k)]

        def run_cache() -> None:
            for i in range(k):
                ours.step(img[i], cache.batch(idx[i]).float(), lab[i])

        def run_online() -> None:
            for i in range(k):
                with torch.no_grad():
                    emb = enc(**tok[i])
                ours.step(img[i], emb, lab[i])

        runners = {"llmclip (cache)": run_cache, "open_clip": lambda: peer.run(oc_batches)}
        if enc is not None:
            runners["llmclip (online LLM)"] = run_online
        times = C.interleaved(runners, reps=args.reps, warmup=args.warmup)

        n_params = {
            "llmclip (cache)": sum(p.numel() for p in ours.model.parameters()),
            "open_clip": sum(p.numel() for p in peer.model.parameters()),
        }
        if enc is not None:
            frozen = sum(p.numel() for p in enc.parameters())
            n_params["llmclip (online LLM)"] = n_params["llmclip (cache)"] + frozen
        finite = math.isfinite(ours.last_loss)

    base = C.median(times["open_clip"])
    rows_out = []
    for name, ts in times.items():
        med = C.median(ts)
        rows_out.append([
            name, f"{n_params[name] / 1e6:.1f}M", k / med, b * k / med, f"±{100 * C.spread(ts):.0f}%",
            base / med,
        ])  # fmt: skip
    print(
        f"stage-2 step: {args.vision} @ {s}px, batch {b}, fp32, {threads} threads, "
        f"{args.reps} interleaved reps x {k} steps"
    )
    print(
        f"open_clip text tower: {args.text_layers} x {args.text_width}, context {args.context}; "
        f"online LLM: tiny Llama {args.llm_layers} x {args.llm_hidden}, <= {args.max_tokens} tokens"
    )
    print(
        C.table(["contender", "params", "steps/s", "images/s", "noise", "vs open_clip"], rows_out)
    )
    if not finite:
        print("warning: llmclip loss was not finite", file=sys.stderr)
    r_cache = C.paired_ratio(times["open_clip"], times["llmclip (cache)"])
    result = {"benchmark": "stage2_step", "args": vars(args), "threads": threads,
              "median_s": {k_: C.median(v) for k_, v in times.items()},
              "ratio_vs_open_clip": r_cache}  # fmt: skip
    line = f"RATIO llmclip stage-2 (cached embeddings) vs open_clip: {r_cache:.2f}x steps/s"
    if "llmclip (online LLM)" in times:
        r_online = C.paired_ratio(times["llmclip (online LLM)"], times["llmclip (cache)"])
        result["ratio_cache_vs_online_llm"] = r_online
        print(f"cached embeddings vs online LLM encoder: {r_online:.2f}x steps/s")
        line += f" (online LLM: {r_online:.2f}x slower than cached)"
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(line + " [target >= 1.0x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
