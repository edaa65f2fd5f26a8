"""``model, preprocess = llmclip.load(run)``: open_clip's shape, the training transform, runs that
still load (and find their stage-1 encoder) after being copied or moved.

The fast tests build a small ``CLIPModel`` and write its run files by hand; the others use the
shared tiny 2-rank run (``stage2_runs["full"]``) and the Open-I shards it trained on.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import llmclip
from llmclip.clip.model import CLIPModel, ModelConfig, VisionConfig, tower_stats
from llmclip.clip.state import encoder_record, find_encoder
from llmclip.config import ConfigError, to_dict
from llmclip.data.images import decode_image
from llmclip.data.loader import make_loader
from llmclip.data.shards import read_tar

TINY_VIT = VisionConfig(
    name="vit_tiny_patch16_224", kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
)


def _write_run(final: Path, model: CLIPModel, text_dim: int, **meta) -> Path:
    """A RUN/final as the trainer writes it (safetensors + clip.json), without training."""
    final.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final / "model.safetensors"))
    record = {"format": "llmclip-clip/1", "model": to_dict(model.cfg), "image_size": model.image_size,
              "text_dim": text_dim, "cache_fingerprint": None, "encoder": None, "instruction": None}
    (final / "clip.json").write_text(json.dumps({**record, **meta}))
    return final.parent


def test_tower_stats_are_the_towers_own_for_pretrained_weights_only():
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224.mim_in22k", pretrained=False, num_classes=0)
    clip_mean = [0.48145466, 0.4578275, 0.40821073]
    # Pretrained EVA02 weights need OpenAI-CLIP statistics (timm's data config), not 0.5.
    mean, std = tower_stats(VisionConfig(name="eva02_tiny_patch14_224", pretrained=True), eva)
    np.testing.assert_allclose(mean, clip_mean, rtol=1e-6)
    np.testing.assert_allclose(std, [0.26862954, 0.26130258, 0.27577711], rtol=1e-6)
    grey, _ = tower_stats(VisionConfig(name="x", pretrained=True, in_chans=1, mean=[0.5], std=[0.5]), eva)
    assert grey == pytest.approx([sum(clip_mean) / 3])
    # From scratch, or stats: config: the configured values.
    assert tower_stats(VisionConfig(pretrained=False), eva) == ([0.5] * 3, [0.5] * 3)
    cfg = VisionConfig(pretrained=True, stats="config", mean=[0.1, 0.2, 0.3], std=[1.0, 2.0, 3.0])
    assert tower_stats(cfg, eva) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])


def test_load_is_open_clip_shaped_and_preprocess_is_the_training_transform(tmp_path):
    torch.manual_seed(0)
    vision = VisionConfig(**{**TINY_VIT.__dict__, "mean": [0.2, 0.3, 0.4], "std": [0.6, 0.7, 0.8]})
    cfg = ModelConfig(vision=vision, embed_dim=16, max_logit_scale=20.0)
    trained = CLIPModel(cfg, text_dim=12, image_size=32)
    with torch.no_grad():
        trained.logit_scale.fill_(5.0)  # exp(5) = 148 > max 20: training used 20
    run = _write_run(tmp_path / "run" / "final", trained, text_dim=12)

    model, preprocess = llmclip.load(run)
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(model.logit_scale, nn.Parameter)
    assert model.logit_scale.exp().item() == pytest.approx(20.0)  # open_clip: log of the multiplier
    assert preprocess.mean == [0.2, 0.3, 0.4] and preprocess.std == [0.6, 0.7, 0.8]

    # A non-square PIL image: what the loader makes of the same PNG file, not a squashed whole.
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 72), dtype=np.uint8)
    grey[:, :8] = 255  # a bright band left of the centre square: a squash would pull it in
    buf = io.BytesIO()
    Image.fromarray(grey, "L").save(buf, format="PNG")
    x = preprocess(Image.open(io.BytesIO(buf.getvalue())))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    loader_uint8 = torch.from_numpy(decode_image(buf.getvalue(), "png", 32).copy())[None, None].expand(1, 3, -1, -1)
    torch.testing.assert_close(x[None], trained.preprocess(loader_uint8), rtol=0, atol=0)
    band = (255 / 255.0 - 0.2) / 0.6
    assert not torch.isclose(x[0, :, 0], torch.tensor(band)).all()
    # RGB input and an image already in memory take the same path.
    torch.testing.assert_close(preprocess(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), x)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess(torch.zeros(1, 32, 32, dtype=torch.uint8))

    img = model.encode_image(torch.stack([x, x]))
    assert img.shape == (2, 16) and torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    raw = model.encode_image(x[None], normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), img[:1])
    emb = torch.randn(3, 12)
    txt = model.encode_text_embeddings(emb)
    torch.testing.assert_close(txt, trained.eval().encode_text(emb).detach())
    # No encoder recorded or beside the run: encode_text says so, naming where to pass one.
    with pytest.raises(ConfigError, match="encoder=DIR"):
        model.encode_text(["The lungs are clear."])


def test_encoder_record_and_lookup_relative_absolute_and_by_fingerprint(tmp_path, tiny_encoder_dir):
    from llmclip.demo import plan_steps

    # The demo's stage-2 run is told its stage-1 encoder, so its clip.json records it.
    step = next(s for s in plan_steps(tmp_path / "demo", quick=True, ranks=2) if s.name == "stage 2")
    assert f"data.encoder={tmp_path / 'demo' / 'stage1' / 'final'}" in step.commands[0]
    final = tmp_path / "demo" / "stage2" / "final"
    encoder = tmp_path / "demo" / "stage1" / "final"
    shutil.copytree(tiny_encoder_dir, encoder)
    fp = json.loads((encoder / "encoder.json").read_text())["fingerprint"]
    rec = encoder_record(str(encoder), final)
    assert rec == {"encoder": "../../stage1/final", "encoder_path": str(encoder.resolve())}
    final.mkdir(parents=True)
    meta = {"cache_fingerprint": fp, **rec}
    assert find_encoder(final, meta)[0] == encoder.resolve()
    # The whole folder moved: the absolute path is gone, the relative one still holds.
    moved = tmp_path / "elsewhere" / "demo"
    moved.parent.mkdir()
    shutil.move(tmp_path / "demo", moved)
    assert find_encoder(moved / "stage2" / "final", meta)[0] == (moved / "stage1" / "final").resolve()
    # Nothing recorded (runs made before the demo recorded it): found beside the run by fingerprint.
    bare = {"cache_fingerprint": fp, "encoder": None}
    assert find_encoder(moved / "stage2" / "final", bare)[0] == (moved / "stage1" / "final").resolve()
    # A recorded folder whose fingerprint is not the training cache's is passed over.
    other = {"cache_fingerprint": "0" * 64, **encoder_record(str(moved / "stage1" / "final"), final)}
    found, tried = find_encoder(moved / "stage2" / "final", other)
    assert found is None and str((moved / "stage1" / "final").resolve()) in tried


def _copy_run(src: Path, root: Path, **meta) -> Path:
    dst = root / src.name
    shutil.copytree(src / "final", dst / "final")
    if meta:
        p = dst / "final" / "clip.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **meta}))
    return dst


def _shard_images(spec_dir: Path, split: str) -> dict[str, bytes]:
    out = {}
    for tar in sorted((spec_dir / "images").glob(f"{split}-*.tar")):
        out.update({key: m["jpg"] for key, m in read_tar(tar) if "jpg" in m})
    return out


def test_copied_run_loads_matches_the_training_loader_and_encodes_text(
    stage2_runs, stage2_encoder_dir, openi_shards, tmp_path
):
    run = stage2_runs["full"]
    meta = json.loads((run / "final" / "clip.json").read_text())
    # The trainer records the encoder relative to RUN/final, and absolutely as a fallback.
    assert not Path(meta["encoder"]).is_absolute()
    assert (run / "final" / meta["encoder"]).resolve() == Path(stage2_encoder_dir).resolve()
    assert meta["encoder_path"] == str(Path(stage2_encoder_dir).resolve())
    # Copied to another machine's layout: the training paths are gone (pointed nowhere here), the
    # encoder was copied beside the run; it is found there by its fingerprint.
    moved = tmp_path / "moved"
    copy = _copy_run(run, moved, encoder="../../gone/encoder", encoder_path=str(tmp_path / "gone"),
                     cache=str(tmp_path / "gone-cache"))
    shutil.copytree(stage2_encoder_dir, moved / "stage1" / "final")
    model, preprocess = llmclip.load(copy)
    assert Path(model.encoder_dir) == (moved / "stage1" / "final").resolve()

    # preprocess(PIL) is bit for bit the tensor training fed the tower for the same file.
    loader = make_loader(f"{openi_shards}:test", kind="image", batch_size=64, image_size=model.image_size,
                         num_workers=0, shuffle=False)
    batch = next(iter(loader))
    trained = model.model.preprocess(batch["image"])
    files = _shard_images(openi_shards, "test")
    x = torch.stack([preprocess(Image.open(io.BytesIO(files[k]))) for k in batch["key"]])
    assert len(batch["key"]) >= 20
    torch.testing.assert_close(x, trained, rtol=0, atol=0)
    torch.testing.assert_close(model.encode_image(x), model.encode_image(batch["image"]))

    # Free text through the stage-1 encoder found beside the copy, in the shared space.
    txt = model.encode_text(["No acute cardiopulmonary process.", "Large right pleural effusion."])
    assert txt.shape == (2, model.model.cfg.embed_dim)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    img, txt2, scale = model(x[:3], ["No acute cardiopulmonary process."])
    torch.testing.assert_close(txt2, txt[:1])
    assert scale.item() == pytest.approx(math.exp(model.logit_scale.item()))
    assert scale.item() <= model.model.cfg.max_logit_scale + 1e-4
    # The LLM is outside the module: its weights are not the CLIP model's.
    assert not any(k.startswith("_encoder") or "decoder" in k for k in model.state_dict())
