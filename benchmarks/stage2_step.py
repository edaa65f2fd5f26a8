"""Stage-2 training steps/s: llmclip (clinical losses on) vs open_clip's own step, same work.

    python benchmarks/stage2_step.py                  # ViT-Tiny, 96 px, batch 32 (~1 min, 2 cores)
    python benchmarks/stage2_step.py --vision vit_small_patch16_224 --image-size 224 --batch 64

Every contender trains the same timm vision tower (name, seed, image size, batch, precision, AdamW,
grad-norm clip 1.0) on the same batches of real Open-I reports. Precision: the recipe's
``deepspeed.precision`` as it resolves on this machine (``--precision`` overrides): ``fp32`` on both
sides, or ``bf16-autocast`` -- llmclip runs its vision tower under bf16 autocast with fp32 weights,
AdamW and losses, and open_clip runs its own ``amp_bf16`` (autocast over its whole forward and
loss, fp32 weights and AdamW). Attention: each side's own default -- llmclip's towers take timm's
eager attention path on a CPU (``model.vision.attention: auto``, ``clip.model.set_tower_attention``),
open_clip keeps timm's fused SDPA; ``--peer-attention eager`` gives open_clip the eager path too, to
show what that one choice is worth. Before timing, a frozen tiny Llama
(real SmolLM2 tokenizer) writes each report's embedding and its negated, laterality-swapped and
severity-changed edits (``llmclip.cache.texts.VARIANTS``) into a real embedding cache: one fp16
``.emb.npy`` sidecar, memory-mapped by both sides.

- ``llmclip``: ``Stage2Trainer._micro_step`` itself (the step ``llmclip/train.py`` runs), on a
  trainer built with the calls of ``Stage2Trainer.__init__``: ``CLIPModel`` (text adapter and
  report-graph GCN), ``make_optimizer`` (torch AdamW, ``param_groups``), warmup + cosine, DeepSpeed
  engine with the recipe's JSON (``ds_configs/cpu_zero0.json``: plain data parallel, and on one
  rank no gradient all-reduce, ``stage2.make_engine``); recipe from ``--config`` (default
  ``configs/stage2/demo.yaml``): **all clinical losses on** -- negation hard negatives with the
  laterality and severity columns, soft labels at their full mix weight (alpha_end), graph
  alignment. Per step it does what the trainer does: cache rows of all four columns by key, the
  CheXpert label matrix, edit mask, padded report graphs and node sets (graphs parsed once per
  key, as in training), uint8 -> normalised pixels, forward, ``total_loss``, engine backward, step.
  Loader samples (key, labels, report, uint8 image) are prebuilt; augmentation off on both sides.
- ``open_clip (same work)``, the headline peer: ``open_clip_train.train.train_one_epoch``
  (``ClipLoss``, the AdamW groups of ``open_clip_train.main``, ``cosine_lr``) on
  ``open_clip.create_model`` of a ``CustomTextCLIP`` whose vision tower is the same timm model and
  whose text tower (``model.text``, open_clip's slot for a custom text encoder) is the same cache
  lookup: the report's fp16 row gathered from the same memory-mapped sidecar by sample index, then
  a linear projection to the embedding width (a frozen, precomputed text encoder). Its loader
  hands it normalised float images.
- ``open_clip (online text)``: the same loop on ``open_clip.CLIP`` with its standard text tower
  (ViT-B-16's 12 x 512, 77 tokens; tokens prebuilt), run online. It is paired with llmclip in a
  second, separate interleaved run: the ratio says what reading the cache saves, not who is faster
  at the same work.

Interleaved repetitions in rotating order; ratios are ratios of medians with the per-repetition
spread. FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` on one step of each contender
(one counting rule), over a same-run GEMM peak at the vision tower's own linear shapes.
Needs open_clip (benchmark-only peer): ``.venv/bin/pip install open-clip-torch``.
"""

from __future__ import annotations

import argparse
import json
import logging
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
SHARD = "train-000000"
COLUMNS = ("report", "negated", "laterality", "severity")
OURS, PEER, ONLINE = "llmclip", "open_clip (same work)", "open_clip (online text)"
# llmclip's stage-2 precision -> open_clip_train's --precision doing the same work.
PEER_PRECISION = {"fp32": "fp32", "bf16-autocast": "amp_bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_tiny_patch16_224", help="timm model (all contenders)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--config", default=str(C.REPO / "configs/stage2/demo.yaml"),
                   help="stage-2 recipe: llmclip's losses, graph, text adapter, embed_dim")  # fmt: skip
    p.add_argument("--ds-config", default="",
                   help="DeepSpeed JSON of the llmclip side (default: the recipe's)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions of the headline pair")
    p.add_argument("--online-reps", type=int, default=5, help="repetitions of the online pairing")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=12, help="open_clip online text tower depth")
    p.add_argument("--text-width", type=int, default=512, help="open_clip online text tower width")
    p.add_argument("--context", type=int, default=77, help="open_clip text context length")
    p.add_argument("--no-online", action="store_true", help="skip the online-text-tower row")
    p.add_argument("--llm-hidden", type=int, default=256, help="cache encoder (tiny Llama) width")
    p.add_argument("--llm-layers", type=int, default=4, help="cache encoder (tiny Llama) depth")
    p.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    p.add_argument("--precision", default="recipe", choices=("recipe", "fp32", "bf16-autocast"),
                   help="both sides' precision (recipe: the recipe's, resolved on this machine)")
    p.add_argument("--peer-attention", default="timm", choices=("timm", "eager"),
                   help="open_clip tower's attention: timm's default (fused SDPA) or the eager path "
                        "llmclip takes on a CPU (shows what that choice is worth)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_inputs(args: argparse.Namespace, n: int, cache_dir: Path) -> list[dict]:
    """``n`` loader samples (key, shard, meta with report and labels, uint8 image) of real Open-I
    reports, and an embedding cache of their four columns written by a frozen tiny LLM encoder
    (each distinct text encoded once, as ``llmclip cache build`` does)."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.cache import CacheIdentity, write_meta, write_sidecar
    from llmclip.cache.texts import VARIANTS
    from llmclip.clinical import Labeler
    from llmclip.labels.openi import read_openi
    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import ModelConfig
    from llmclip.text.sources import TinyLlamaSpec

    reports = [r for r in read_openi(openi_reports_tgz()) if r.text]
    reports = [reports[i % len(reports)] for i in range(n)]
    labeler = Labeler()
    h = args.llm_hidden
    spec = TinyLlamaSpec(hidden_size=h, num_hidden_layers=args.llm_layers,
                         num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128),
                         intermediate_size=h * 8 // 3 // 64 * 64 or 64)  # fmt: skip
    mcfg = ModelConfig(source="tiny:llama", tiny=spec, max_length=128, attention="sdpa")
    torch.manual_seed(0)
    enc = LLMEncoder.build(mcfg, torch.float32, lora=False).eval()
    samples, texts = [], []
    gen = torch.Generator().manual_seed(0)
    for i, r in enumerate(reports):
        report = {"findings": r.findings, "impression": r.impression}
        meta = {"report": report, "labels": dict(labeler.label(r.text).vector)}
        gray = torch.randint(0, 256, (1, args.image_size, args.image_size), dtype=torch.uint8,
                             generator=gen)  # fmt: skip
        image = gray.expand(3, -1, -1).contiguous()  # the loader's uint8 [3, S, S]
        samples.append({"key": f"openi-{i:06d}", "shard": SHARD, "meta": meta, "image": image})
        texts.extend(VARIANTS[c](report) for c in COLUMNS)
    slot: dict[str, int] = {}
    cells = np.array([slot.setdefault(t, len(slot)) for t in texts], dtype=np.int64)
    with torch.inference_mode():
        uniq = enc.encode(list(slot), batch_tokens=4096).float().numpy().astype(np.float16)
    rows = uniq[cells].reshape(n, len(COLUMNS), enc.dim)
    ident = CacheIdentity(fingerprint="bench-tiny-llama", pooling="mean", max_length=128,
                          instruction=None, variants=COLUMNS, dim=enc.dim, dtype="fp16")  # fmt: skip
    cache_dir.mkdir(parents=True)
    write_sidecar(cache_dir, SHARD, [s["key"] for s in samples], rows, ident)
    write_meta(cache_dir, ident, {SHARD: n})
    return samples


class Batches:
    """The trainer's data stream (``llmclip.data.order.RankStream``) with its takes prebuilt:
    ``next()`` cycles them."""

    def __init__(self, samples: list[dict], b: int):
        self.batches = [samples[i : i + b] for i in range(0, len(samples), b)]
        self.i = 0

    def next(self) -> list[dict]:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def recipe_ds_config(recipe: str) -> str:
    """The recipe's DeepSpeed JSON, resolved against the repository (the script runs anywhere)."""
    import yaml

    path = Path(yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))["deepspeed"]["config"])
    return str(path if path.is_absolute() else C.REPO / path)


def llmclip_trainer(args: argparse.Namespace, work: Path, samples: list[dict]):
    """A ``Stage2Trainer`` built with the calls of its ``__init__``, in order, minus the shard
    checks, checkpoint resume and run-folder files that only a real run needs."""
    from deepspeed.accelerator import get_accelerator

    from llmclip.cache import EmbeddingCache
    from llmclip.clinical import CHEXPERT_CLASSES
    from llmclip.clip.batching import GraphFeaturizer, text_statistics
    from llmclip.clip.model import CLIPModel
    from llmclip.clip.stage2 import Stage2Config, make_engine
    from llmclip.clip.trainer import Stage2Trainer
    from llmclip.config import load_config
    from llmclip.distributed import dist_env

    C.single_rank_env()
    cfg = load_config(Stage2Config, args.config, [
        f"run.out_dir={work / 'run'}", "run.tensorboard=false", f"data.cache={work / 'cache'}",
        f"data.shards={work / 'shards'}", f"data.image_size={args.image_size}",
        "data.augment=false", f"model.vision.name={args.vision}", "model.vision.kwargs={}",
        "model.vision.pretrained=false", "model.vision.drop_path_rate=0.0",
        f"deepspeed.micro_batch_size={args.batch}", "deepspeed.grad_accum=1",
        *([f"deepspeed.precision={args.precision}"] if args.precision != "recipe" else []),
        f"deepspeed.config={args.ds_config or recipe_ds_config(args.config)}",
    ])  # fmt: skip
    t = Stage2Trainer.__new__(Stage2Trainer)
    t.cfg, t.classes, t.out = cfg, list(CHEXPERT_CLASSES), Path(cfg.run.out_dir)
    t.cache = EmbeddingCache(cfg.data.cache)
    t.text_col = t.cache.variant_index(cfg.data.text_variant)
    neg = cfg.loss.negation
    t.neg_cols = neg.column_indices(t.cache.variants) if neg.enabled else None
    torch.manual_seed(0)
    t.model = CLIPModel(cfg.model, t.cache.dim, cfg.data.image_size)
    if cfg.model.text.standardize:
        t.model.text_adapter.set_statistics(*text_statistics(t.cache, [SHARD], t.text_col))
    soft = cfg.loss.soft_labels
    need_graph = cfg.model.graph.enabled or (soft.enabled and soft.weight_graph > 0)
    t.graphs = GraphFeaturizer(cfg.model.graph) if need_graph else None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    t.engine, t.optimizer, t.scheduler, t.ds_config = make_engine(
        t.model, cfg, 1, get_accelerator().device_name()
    )
    t.env, t.device = dist_env(), t.engine.device
    t.stream = Batches(samples, args.batch)
    # Soft labels at their full mix weight (alpha_end): the step where the ramp has ended.
    t.step = int(np.ceil(soft.ramp_end * cfg.optim.max_steps))
    assert not soft.enabled or soft.alpha(t.step, cfg.optim.max_steps) == soft.alpha_end
    return t


class CachedTextTower(torch.nn.Module):
    """open_clip's text slot with a frozen precomputed text encoder: the report's fp16 row gathered
    from the memory-mapped sidecar by sample index, then a linear projection to ``embed_dim``."""

    def __init__(self, sidecar: Path, column: int, embed_dim: int):
        super().__init__()
        self.rows = np.load(sidecar, mmap_mode="r", allow_pickle=False)
        self.column = column
        self.proj = torch.nn.Linear(self.rows.shape[-1], embed_dim, bias=False)
        self.context_length, self.vocab_size = 1, self.rows.shape[0]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        emb = np.ascontiguousarray(self.rows[index.numpy(), self.column])
        return self.proj(torch.from_numpy(emb).float())


class BatchList(list):
    """What ``train_one_epoch`` reads from ``data['train']``: a dataloader with sizes."""

    def __init__(self, batches: list, batch_size: int):
        super().__init__(batches)
        self.num_batches = len(batches)
        self.num_samples = len(batches) * batch_size


class OpenClipStep:
    """open_clip's ``train_one_epoch`` over ``steps`` in-memory batches per call."""

    def __init__(self, args: argparse.Namespace, embed_dim: int, work: Path, sidecar: Path | None,
                 precision: str):
        import open_clip
        import timm
        from open_clip_train.scheduler import cosine_lr

        from llmclip.clip.model import set_tower_attention

        name = "bench-timm-cached" if sidecar else "bench-timm-online"
        w = 64 if sidecar else args.text_width  # cached: a throwaway text tower, replaced below
        cfg = {
            "embed_dim": embed_dim,
            "custom_text": bool(sidecar),
            "vision_cfg": {"timm_model_name": args.vision, "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": args.image_size},
            "text_cfg": {"context_length": args.context, "vocab_size": 49408, "width": w,
                         "heads": max(1, w // 64), "layers": 1 if sidecar else args.text_layers},
        }  # fmt: skip
        cfg_dir = work / f"open_clip_cfg_{name}"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / f"{name}.json").write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(cfg_dir)
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None, output_dict=True)
        # open_clip builds timm towers at their default resolution; rebuild the trunk at this
        # image size exactly as llmclip does (same timm call, same seed): the same network.
        torch.manual_seed(0)
        model.visual.trunk = timm.create_model(
            args.vision, pretrained=False, num_classes=0, img_size=args.image_size
        )
        if args.peer_attention == "eager":
            set_tower_attention(model.visual.trunk, "eager")
        if sidecar:
            model.text = CachedTextTower(sidecar, COLUMNS.index("report"), embed_dim)
        self.model = model
        self.tokenizer = None if sidecar else open_clip.get_tokenizer(name)
        # Parameter groups and optimizer exactly as open_clip_train.main builds them.
        named = list(model.named_parameters())

        def exclude(n: str, p: torch.nn.Parameter) -> bool:
            return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

        gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
            lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
        )  # fmt: skip
        self.scheduler = cosine_lr(self.optimizer, 5e-4, 10, 10_000)
        self.loss = open_clip.ClipLoss(
            local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1
        )
        self.args = SimpleNamespace(
            device="cpu", precision=precision, distill=False, accum_freq=1, skip_scheduler=False,
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


def step_flops(fn) -> float:
    """FLOPs of one call as torch's dispatcher counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.offline_hub()
    try:
        import open_clip  # noqa: F401
        import open_clip_train  # noqa: F401
    except ImportError:
        print(OPEN_CLIP_HINT, file=sys.stderr)
        return 2
    from llmclip.clip.stage2 import stage2_precision
    from llmclip.data.text import sample_text

    logging.basicConfig(level=logging.WARNING)
    threads = C.set_threads(args.threads)
    b, s, k = args.batch, args.image_size, args.steps
    n = b * k

    with tempfile.TemporaryDirectory(prefix="llmclip-bench-") as tmp:
        work = Path(tmp)
        samples = build_inputs(args, n, work / "cache")
        ours = llmclip_trainer(args, work, samples)
        embed_dim = ours.cfg.model.embed_dim
        prec = stage2_precision(ours.cfg)
        if prec not in PEER_PRECISION:
            print(f"stage-2 precision {prec!r} has no CPU peer here; pass --precision", file=sys.stderr)
            return 2
        sidecar = work / "cache" / f"{SHARD}.emb.npy"
        peers = {PEER: OpenClipStep(args, embed_dim, work, sidecar, PEER_PRECISION[prec])}
        if not args.no_online:
            peers[ONLINE] = OpenClipStep(args, embed_dim, work, None, PEER_PRECISION[prec])
        C.set_threads(args.threads)  # DeepSpeed's CPU accelerator may have changed it
        images = torch.stack([x["image"] for x in samples])
        norm = (images.float() / 255.0 - 0.5) / 0.5  # open_clip's loader output (normalised)
        texts = {PEER: torch.arange(n)}  # sample index -> its cache row
        if ONLINE in peers:
            texts[ONLINE] = peers[ONLINE].tokenizer([sample_text(x["meta"]) for x in samples])
        oc = {name: BatchList([(norm[i * b : (i + 1) * b], texts[name][i * b : (i + 1) * b])
                               for i in range(k)], b) for name in peers}  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        losses: list[float] = []

        def run_ours() -> None:
            for _ in range(k):
                losses.append(ours._micro_step(gen)["loss"])

        runners = {OURS: run_ours}
        runners.update({nm: (lambda p=p, bl=oc[nm]: p.run(bl)) for nm, p in peers.items()})
        # Headline: the same-work pair on its own. The online text tower is a different, much
        # heavier job (its activations alone evict the caches the next contender starts on), so
        # it gets its own interleaved pairing with llmclip instead of sharing these repetitions.
        times = C.interleaved({nm: runners[nm] for nm in (OURS, PEER)}, args.reps, args.warmup)
        online = {}
        if ONLINE in peers:
            online = C.interleaved({nm: runners[nm] for nm in (OURS, ONLINE)}, args.online_reps, 1)

        one = {OURS: lambda: ours._micro_step(gen)}
        for nm, p in peers.items():
            one[nm] = lambda p=p, bl=oc[nm]: p.run(BatchList(bl[:1], b))
        flops = {name: step_flops(fn) for name, fn in one.items()}
        models = {OURS: ours.model, **{nm: p.model for nm, p in peers.items()}}
        n_params = {nm: sum(p.numel() for p in m.parameters() if p.requires_grad)
                    for nm, m in models.items()}  # fmt: skip
        with torch.no_grad():
            seq = ours.model.visual.forward_features(torch.zeros(1, 3, s, s))
        tokens = b * (seq.shape[1] if seq.dim() == 3 else 1)
        dtype = torch.bfloat16 if prec == "bf16-autocast" else torch.float32  # the tower's matmuls
        peak = C.gemm_peak(C.linear_shapes(ours.model.visual, tokens), dtype)
        ok = all(np.isfinite(losses))

    def row(name: str, ts: list[float], label: str = "") -> list:
        med = C.median(ts) / k
        return [label or name, f"{n_params[name] / 1e6:.2f}M", 1 / med, b / med,
                f"±{100 * C.spread(ts):.0f}%", flops[name] / 1e9, flops[name] / med / 1e9,
                f"{100 * flops[name] / med / peak:.1f}%"]  # fmt: skip

    rows_out = [row(OURS, times[OURS]), row(PEER, times[PEER])]
    if online:
        rows_out += [row(OURS, online[OURS], "llmclip (run 2)"), row(ONLINE, online[ONLINE])]
    cfg = ours.cfg
    soft, neg = cfg.loss.soft_labels, cfg.loss.negation
    print(f"stage-2 step: {args.vision} @ {s}px, batch {b}, {prec} (open_clip: "
          f"{PEER_PRECISION[prec]}), attention {cfg.model.vision.attention} (open_clip: "
          f"{args.peer_attention}), {threads} threads, "
          f"{args.reps} interleaved reps x {k} steps (online pairing: {args.online_reps}); cache "
          f"encoder: tiny Llama {args.llm_layers} x {args.llm_hidden}, columns "
          f"{','.join(COLUMNS)}")  # fmt: skip
    print(f"llmclip recipe {Path(args.config).name}: negation {neg.enabled} {neg.columns()}, soft "
          f"labels {soft.enabled} (alpha {soft.alpha(ours.step, cfg.optim.max_steps):.2f}), graph "
          f"{cfg.model.graph.enabled} (weight {cfg.loss.graph_weight}); GEMM peak at the "
          f"tower's linear shapes ({tokens} tokens): {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(C.table(["contender", "trainable", "steps/s", "images/s", "noise", "GFLOP/step",
                   "GFLOP/s", "of peak"], rows_out))  # fmt: skip
    if not ok:
        print("warning: llmclip loss was not finite", file=sys.stderr)
    r = C.ratio_of_medians(times[OURS], times[PEER])
    result = {"benchmark": "stage2_step", "args": vars(args), "threads": threads,
              "precision": prec, "peer_precision": PEER_PRECISION[prec],
              "attention": ours.cfg.model.vision.attention, "peer_attention": args.peer_attention,
              "steps_per_rep": k, "seconds": times, "seconds_online_pairing": online,
              "flops_per_step": flops, "gemm_peak_flops": peak,
              "ratio_vs_same_work_open_clip": r.as_dict()}  # fmt: skip
    if online:
        r_cache = C.ratio_of_medians(online[OURS], online[ONLINE])
        result["ratio_cache_vs_online_text_tower"] = r_cache.as_dict()
        print(f"what caching saves (run 2, not the same work): llmclip (cache) vs open_clip with "
              f"its online {args.text_layers} x {args.text_width} text tower: {r_cache}")  # fmt: skip
    C.write_json(args.json, result)
    print(C.verdict("llmclip stage-2 step vs same-work open_clip", r, 1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
