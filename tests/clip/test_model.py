"""The dual tower built from configs (tiny timm ViT, random weights), its optimizer groups and schedule."""

from __future__ import annotations

import math

import pytest
import torch

from llmclip.clip.model import CLIPModel, GraphConfig, ModelConfig, TextAdapterConfig, VisionConfig
from llmclip.clip.stage2 import Stage2OptimConfig, augment, lr_factor, param_groups
from llmclip.config import ConfigError

TINY_VIT = VisionConfig(
    name="vit_tiny_patch16_224",
    kwargs={"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
)


def _graph(b: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    adj = (torch.rand(b, 4, n, n, generator=g) > 0.7).float()
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:, -2:] = False
    return {
        "labels": torch.randint(0, 64, (b, n), generator=g),
        "status": torch.randint(0, 4, (b, n), generator=g),
        "types": torch.randint(0, 5, (b, n), generator=g),
        "mask": mask,
        "adj": adj,
    }


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_forward_shapes_normalised_and_graph_stream(kind: str):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=TINY_VIT,
        text=TextAdapterConfig(kind=kind, blocks=2),
        graph=GraphConfig(enabled=True, dim=16, vocab_size=128, max_nodes=6),
        embed_dim=24,
    )
    model = CLIPModel(cfg, text_dim=40, image_size=32)
    images = torch.randint(0, 256, (3, 1, 48, 48), dtype=torch.uint8)  # grayscale, other size
    pixels = model.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    out = model(pixels, torch.randn(3, 40), graph=_graph(3), negated_emb=torch.randn(3, 40))
    for name in ("image", "text", "negated", "graph"):
        assert out[name].shape == (3, 24)
        assert torch.allclose(out[name].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    # Padded graph nodes do not change the graph embedding.
    g = _graph(3)
    g2 = {k: v.clone() for k, v in g.items()}
    g2["labels"][:, -2:] = 7
    assert torch.allclose(model.encode_graph(g), model.encode_graph(g2), atol=1e-6)
    # Gradients reach every trainable part.
    loss = sum(v.sum() for k, v in out.items() if k != "scale") + out["scale"]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_logit_scale_is_clamped():
    model = CLIPModel(ModelConfig(vision=TINY_VIT, max_logit_scale=50.0), text_dim=8, image_size=32)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(50.0)


def test_convnet_tower_and_unknown_model():
    cfg = ModelConfig(vision=VisionConfig(name="resnet10t"), embed_dim=16)
    model = CLIPModel(cfg, text_dim=8, image_size=40)
    assert model.encode_image(torch.randn(2, 3, 40, 40)).shape == (2, 16)
    with pytest.raises(ConfigError, match="model.vision.name"):
        CLIPModel(
            ModelConfig(vision=VisionConfig(name="no_such_model_xyz")), text_dim=8, image_size=32
        )


def test_layer_decay_groups_and_no_decay_on_scale_and_norms():
    model = CLIPModel(ModelConfig(vision=TINY_VIT), text_dim=8, image_size=32)
    optim = Stage2OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    groups = param_groups(model, optim)
    scales = sorted({g["lr_scale"] for g in groups})
    # Consecutive powers of 0.5 from the patch embedding (smallest) up to the heads (1.0).
    assert len(scales) >= 3 and scales[-1] == 1.0
    assert scales == pytest.approx([0.5 ** (len(scales) - 1 - i) for i in range(len(scales))])
    blk = model.visual.blocks
    first, last = (by_param_scale(groups, b.attn.qkv.weight) for b in (blk[0], blk[-1]))
    assert first == pytest.approx(0.5 * last)
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.logit_scale)]["weight_decay"] == 0.0
    assert by_param[id(model.visual.pos_embed)]["lr_scale"] == pytest.approx(scales[0])
    assert by_param[id(model.image_proj.weight)]["weight_decay"] == 0.1
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params


def by_param_scale(groups: list[dict], param: torch.Tensor) -> float:
    return next(g["lr_scale"] for g in groups if any(p is param for p in g["params"]))


def test_warmup_cosine_schedule():
    optim = Stage2OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, optim) == pytest.approx(0.1)
    assert lr_factor(9, optim) == pytest.approx(1.0)
    assert lr_factor(60, optim) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, optim) == pytest.approx(0.1)


def test_augment_is_seeded_and_keeps_shape():
    x = torch.randn(4, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_text_standardisation_removes_the_shared_direction():
    # Reports that share one dominant direction (as LLM embeddings do) differ only in small parts.
    g = torch.Generator().manual_seed(0)
    common = torch.randn(32, generator=g) * 10
    x = common + 0.1 * torch.randn(64, 32, generator=g)
    model = CLIPModel(ModelConfig(vision=TINY_VIT, embed_dim=16), text_dim=32, image_size=32)
    raw = model.encode_text(x)
    model.text_adapter.set_statistics(x.mean(0), x.std(0))
    std = model.encode_text(x)

    def mean_cos(e: torch.Tensor) -> float:
        s = e @ e.T
        return float((s.sum() - s.diagonal().sum()) / (len(e) * (len(e) - 1)))

    assert mean_cos(raw) > 0.9 and mean_cos(std) < 0.3
    # The statistics are buffers: saved with the weights, not trained.
    sd = model.state_dict()
    assert torch.equal(sd["text_adapter.mean"], x.mean(0))
    assert "text_adapter.mean" not in dict(model.named_parameters())


def test_forward_with_bf16_parameters_and_fp32_buffers():
    """DeepSpeed's bf16 engine casts parameters only (buffers stay fp32): every stream still runs."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=TINY_VIT,
        text=TextAdapterConfig(kind="mlp", blocks=1),
        graph=GraphConfig(enabled=True, dim=16, vocab_size=128, max_nodes=6),
        embed_dim=24,
    )
    model = CLIPModel(cfg, text_dim=40, image_size=32)
    model.text_adapter.set_statistics(torch.randn(40), torch.rand(40) + 0.5)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert any(b.dtype == torch.float32 for b in model.buffers())
    pixels = model.preprocess(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    out = model(pixels, torch.randn(2, 40), graph=_graph(2), negated_emb=torch.randn(2, 40))
    for name in ("image", "text", "negated", "graph"):
        assert out[name].dtype == torch.bfloat16 and torch.isfinite(out[name].float()).all()


def test_edited_reports_keep_their_columns():
    """``negated_emb`` [n, k, D] (the negated report, then loss.negation.hard_negatives): each
    column goes through the same text adapter as a report would, one row at a time."""
    torch.manual_seed(0)
    cfg = ModelConfig(vision=TINY_VIT, text=TextAdapterConfig(kind="mlp", blocks=1), embed_dim=24)
    model = CLIPModel(cfg, text_dim=40, image_size=32).eval()
    edited = torch.randn(3, 4, 40)
    pixels = model.preprocess(torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8))
    out = model(pixels, torch.randn(3, 40), negated_emb=edited)
    assert out["negated"].shape == (3, 4, 24)
    for k in range(4):
        assert torch.allclose(out["negated"][:, k], model.encode_text(edited[:, k]), atol=1e-6)


def test_autocast_vision_runs_only_the_tower_in_bf16():
    """``deepspeed.precision: bf16-autocast`` (stage2.make_engine sets ``autocast_vision``): the
    tower's matmuls run in bf16, while its weights, the projection, the text side and the gradients
    stay fp32; the embeddings agree with fp32's within bf16 rounding."""
    torch.manual_seed(0)
    model = CLIPModel(ModelConfig(vision=TINY_VIT, embed_dim=24), text_dim=40, image_size=32)
    pixels = model.preprocess(torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8))
    seen: dict[str, torch.dtype] = {}
    for name in ("visual", "image_proj"):
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.dtype))
    first_linear = next(m for m in model.visual.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda m, i, o: seen.__setitem__("tower linear", o.dtype))

    want = model.encode_image(pixels)
    assert seen == {"visual": torch.float32, "image_proj": torch.float32, "tower linear": torch.float32}
    model.autocast_vision = True
    out = model(pixels, torch.randn(4, 40))
    assert seen["tower linear"] == torch.bfloat16 and seen["image_proj"] == torch.float32
    assert out["image"].dtype == out["text"].dtype == torch.float32
    cos = (out["image"] * want).sum(-1)
    assert cos.min() > 0.99 and not torch.equal(out["image"], want)
    out["image"].sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.visual.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16-autocast", "bf16"])
def test_stage2_precision_sets_the_engine_and_the_tower(precision: str):
    from pathlib import Path

    from llmclip.clip.stage2 import Stage2Config, build_ds_config, stage2_precision
    from llmclip.config import load_config
    from llmclip.precision import cpu_bf16_matmul

    recipe = Path(__file__).resolve().parents[2] / "configs" / "stage2" / "tiny.yaml"
    cfg = load_config(Stage2Config, recipe, [f"deepspeed.precision={precision}"])
    auto = "bf16" if torch.cuda.is_available() else "bf16-autocast" if cpu_bf16_matmul() else "fp32"
    want = auto if precision == "auto" else precision
    assert stage2_precision(cfg) == want
    assert build_ds_config(cfg, 1)["bf16"]["enabled"] is (want == "bf16")  # autocast: fp32 weights


def test_tower_attention_paths_agree_and_auto_takes_eager_on_a_cpu():
    """``model.vision.attention``: the eager path and the fused SDPA kernel compute the same
    embeddings and gradients; ``auto`` takes eager where there is no CUDA (clip/model.py)."""
    from llmclip.clip.model import set_tower_attention

    torch.manual_seed(0)
    model = CLIPModel(ModelConfig(vision=TINY_VIT, embed_dim=24), text_dim=40, image_size=32)
    blocks = [m for m in model.visual.modules() if hasattr(m, "fused_attn")]
    assert blocks and all(m.fused_attn is torch.cuda.is_available() for m in blocks)
    pixels = model.preprocess(torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8))
    out = {}
    for attention in ("eager", "fused"):
        assert set_tower_attention(model.visual, attention) == len(blocks)
        assert all(m.fused_attn is (attention == "fused") for m in blocks)
        model.zero_grad()
        emb = model.encode_image(pixels)
        emb.square().sum().backward()
        out[attention] = (emb.detach(), blocks[0].qkv.weight.grad.clone())
    torch.testing.assert_close(out["eager"][0], out["fused"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["eager"][1], out["fused"][1], atol=1e-5, rtol=1e-4)
