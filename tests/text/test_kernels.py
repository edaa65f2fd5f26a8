"""GPU kernels (llmclip/text/kernels.py): used when present, tested for equality when not.

On the CPU: eager vs SDPA (math kernel, and torch's CPU flash kernel) bidirectional hidden states
of one tiny Llama agree, and the same comparison does fail on a real difference (causal vs
bidirectional); ``apply_liger`` is a clean no-op, ``kernels: liger`` is a config error, and the
Liger patch plumbing leaves CPU inputs on the plain code and other models untouched. The CUDA tests
(Liger vs plain, NF4 + LoRA, fused linear cross-entropy, fused SDPA kernels vs eager) assert the
same equalities on a GPU machine and are skipped here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
import yaml

from llmclip.config import ConfigError
from llmclip.text.attention import make_bidirectional, make_causal
from llmclip.text.encoder import LLMEncoder
from llmclip.text.kernels import (
    apply_liger,
    attention_backends,
    fused_linear_cross_entropy,
    kernels_of,
    liger_status,
)
from llmclip.text.model_config import LoraSection, ModelConfig

CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_liger_gpu = pytest.mark.skipif(not (CUDA and HAS_LIGER), reason="needs CUDA and liger-kernel")
cpu_only = pytest.mark.skipif(CUDA, reason="CPU-only behaviour (this machine has CUDA)")

TEXTS = [
    "Small left pleural effusion. No pneumothorax. Heart size is normal.",
    "No acute cardiopulmonary abnormality.",
    "Interval increase in right lower lobe opacity, concerning for pneumonia.",
]


def _build(attention: str = "sdpa", dtype: torch.dtype = torch.float32, lora: bool = False,
           **kw) -> LLMEncoder:
    torch.manual_seed(0)
    kw.setdefault("kernels", "none")
    cfg = ModelConfig(source="tiny:llama", attention=attention, max_length=64, **kw)
    return LLMEncoder.build(cfg, dtype, lora=lora).eval()


def _states(enc: LLMEncoder, batch: dict[str, torch.Tensor], backend=None) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return enc.hidden_states(batch["input_ids"], batch["attention_mask"]).float()


def assert_same_states(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, rel: float) -> None:
    """max |a - b| over real tokens <= rel * max |b| (the gpu_check criterion)."""
    m = mask.bool()
    diff = (a[m] - b[m]).abs().max().item()
    scale = b[m].abs().max().item()
    assert diff <= rel * scale, f"max diff {diff:.3e} > {rel:.0e} x {scale:.3e}"


# ------------------------------------------------------------------------------------------------
# attention implementations (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_sdpa():
    return _build("eager"), _build("sdpa")


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_kernel_matches_eager_bidirectional(eager_sdpa, backend, padded):
    from torch.nn.attention import SDPBackend

    eager, sdpa = eager_sdpa
    assert eager.base_model.config._attn_implementation == "eager"
    assert sdpa.base_model.config._attn_implementation == "sdpa"
    batch = eager.tokenize(TEXTS)
    if not padded:
        width = int(batch["attention_mask"].sum(1).min())
        batch = {k: v[:, :width] for k, v in batch.items()}
    assert bool((batch["attention_mask"] == 0).any()) is padded
    ref = _states(eager, batch)
    out = _states(sdpa, batch, getattr(SDPBackend, backend))  # forced: refuses rather than falls back
    assert_same_states(out, ref, batch["attention_mask"], rel=1e-5)
    # and both really are bidirectional: the first token sees the last real token of row 0
    last = int(batch["attention_mask"][0].sum()) - 1
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    edited["input_ids"][0, last] = (edited["input_ids"][0, last] + 7) % eager.tokenizer.vocab_size
    for enc, bk in ((eager, None), (sdpa, getattr(SDPBackend, backend))):
        assert (_states(enc, edited, bk)[0, 0] - _states(enc, batch, bk)[0, 0]).abs().max() > 1e-4


def test_the_equality_check_fails_on_a_real_difference(eager_sdpa):
    # Causal vs bidirectional attention of the same weights: the comparison above must reject it,
    # by a wide margin, or its passing would prove nothing.
    eager, _ = eager_sdpa
    batch = eager.tokenize(TEXTS)
    bidir = _states(eager, batch)
    make_causal(eager.base_model)
    try:
        causal = _states(eager, batch)
    finally:
        make_bidirectional(eager.base_model)
    with pytest.raises(AssertionError, match="max diff"):
        assert_same_states(causal, bidir, batch["attention_mask"], rel=1e-5)
    m = batch["attention_mask"].bool()
    assert (causal[m] - bidir[m]).abs().max() > 1e-2 * bidir[m].abs().max()  # >> 1e-5
    torch.testing.assert_close(_states(eager, batch), bidir)  # restored


def test_attention_backends_is_a_noop_on_cpu(eager_sdpa):
    _, sdpa = eager_sdpa
    batch = sdpa.tokenize(TEXTS)
    with attention_backends("cpu"):
        inside = _states(sdpa, batch)
    torch.testing.assert_close(inside, _states(sdpa, batch), rtol=0, atol=0)
    assert isinstance(attention_backends("cpu", allow_math=True), type(attention_backends("cpu")))


# ------------------------------------------------------------------------------------------------
# Liger selection without a GPU
# ------------------------------------------------------------------------------------------------


@cpu_only
def test_apply_liger_is_a_clean_noop_on_cpu():
    import transformers.models.llama.modeling_llama as ml

    before = dict(vars(ml))
    enc = _build("sdpa")
    batch = enc.tokenize(TEXTS)
    ref = _states(enc, batch)
    report = apply_liger(enc.base_model)
    assert report["kernels"] == "none" and report["applied"] == []
    assert "CUDA" in report["reason"]
    assert all("forward" not in m.__dict__ for m in enc.base_model.modules())
    assert {k: v for k, v in vars(ml).items() if before.get(k) is not v} == {}
    torch.testing.assert_close(_states(enc, batch), ref, rtol=0, atol=0)
    assert kernels_of(enc.lm)["kernels"] == "none"
    assert fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.arange(4)) is None


@cpu_only
def test_auto_kernels_build_plain_on_cpu():
    enc = _build("sdpa", kernels="auto", lora=True)
    assert kernels_of(enc.lm)["applied"] == []
    assert all("forward" not in m.__dict__ for m in enc.base_model.modules())


@cpu_only
def test_kernels_liger_without_cuda_is_a_config_error(tmp_path, capsys):
    # No silent fallback: `kernels: liger` asks for the kernels; `auto` is the fall-back choice.
    with pytest.raises(ConfigError, match="CUDA"):
        ModelConfig(source="tiny:llama", kernels="liger").validate()
    with pytest.raises(ConfigError, match="liger"):
        _build("sdpa", kernels="liger")
    with pytest.raises(ConfigError, match="one of"):
        ModelConfig(source="tiny:llama", kernels="triton").validate()
    ok, why = liger_status()
    assert not ok and "CUDA" in why
    # and the training CLI exits 2 naming the key, before any heavy work
    from pathlib import Path

    from llmclip.config import EXIT_CONFIG
    from llmclip.train import main

    tiny = Path(__file__).resolve().parents[2] / "configs" / "stage1" / "tiny.yaml"
    cfg = yaml.safe_load(tiny.read_text())
    cfg["model"]["kernels"] = "liger"
    path = tmp_path / "liger.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.kernels" in err and "CUDA" in err, err


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel not installed")
def test_liger_patch_plumbing_on_cpu_inputs_keeps_plain_code_and_other_models():
    # The patch itself (no CUDA gate): CPU inputs must still run the plain PyTorch forward, and
    # nothing may leak into the family's module (a later-built model stays plain).
    import transformers.models.llama.modeling_llama as ml

    from llmclip.text.kernels import _patch_liger

    rms_cls, mlp_cls = ml.LlamaRMSNorm, ml.LlamaMLP
    enc = _build("sdpa", lora=True)
    batch = enc.tokenize(TEXTS)
    ref = _states(enc, batch)
    report = _patch_liger(enc.base_model, "llama")
    layers = enc.base_model.config.num_hidden_layers
    assert report["applied"] == ["rms_norm", "swiglu", "rope"]
    assert report["modules"] == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    assert (ml.LlamaRMSNorm, ml.LlamaMLP) == (rms_cls, mlp_cls)
    assert ml.apply_rotary_pos_emb._llmclip_original is not None  # the dispatcher, once
    torch.testing.assert_close(_states(enc, batch), ref, rtol=0, atol=0)
    # still bidirectional with LoRA in place
    assert enc.base_model.config.is_causal is False
    other = _build("eager")
    assert type(other.decoder.norm) is rms_cls and "forward" not in other.decoder.norm.__dict__
    # a deep copy's patched forwards are bound to the copy, not the original
    clone = copy.deepcopy(enc.decoder)
    assert clone.norm.forward.__self__ is clone.norm
    assert clone.layers[0].self_attn.forward.__self__ is clone.layers[0].self_attn


# ------------------------------------------------------------------------------------------------
# CUDA: the same equalities with the fused kernels (run on a GPU machine)
# ------------------------------------------------------------------------------------------------


def _loss_and_grads(enc: LLMEncoder, batch: dict[str, torch.Tensor]):
    h = enc.hidden_states(batch["input_ids"], batch["attention_mask"])
    sel = batch["attention_mask"][:, 1:].bool()
    loss = F.cross_entropy(enc.lm_head(h[:, :-1][sel]).float(), batch["input_ids"][:, 1:][sel])
    loss.backward()
    grads = {n: p.grad.float() for n, p in enc.lm.named_parameters() if p.grad is not None}
    return h.detach().float(), loss.detach().float(), grads


@needs_liger_gpu
@pytest.mark.parametrize(("dtype", "nf4", "rel"), [(torch.float32, False, 1e-4),
                                                   (torch.bfloat16, True, 5e-2)])
def test_liger_matches_plain_on_cuda(dtype, nf4, rel):
    runs = {}
    for kernels in ("none", "liger"):
        torch.manual_seed(0)
        cfg = ModelConfig(source="tiny:llama", attention="sdpa", max_length=64, kernels=kernels,
                          quantization="nf4" if nf4 else "none", lora=LoraSection(r=8, dropout=0.0))
        enc = LLMEncoder.build(cfg, dtype, lora=nf4)
        if next(enc.lm.parameters()).device.type != "cuda":
            enc.lm.cuda()
        if not nf4:
            enc.lm.requires_grad_(True)
        batch = enc.tokenize(TEXTS, device="cuda")
        runs[kernels] = (_loss_and_grads(enc.train(), batch), batch, enc)
    (h1, l1, g1), batch, enc = runs["liger"]
    (h0, l0, g0), _, _ = runs["none"]
    assert kernels_of(enc.lm)["applied"] == ["rms_norm", "swiglu", "rope"]
    assert_same_states(h1, h0, batch["attention_mask"], rel)
    assert abs(l1.item() - l0.item()) <= rel * abs(l0.item())
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 2 * rel * g0[n].abs().max() + 1e-12, n
    # the Liger model is still bidirectional
    last = int(batch["attention_mask"][0].sum()) - 1
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    edited["input_ids"][0, last] = (edited["input_ids"][0, last] + 7) % enc.tokenizer.vocab_size
    assert (_states(enc, edited)[0, 0] - _states(enc, batch)[0, 0]).abs().max() > 1e-4


@needs_liger_gpu
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_linear_cross_entropy_matches_plain_on_cuda(dtype, rel):
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(256, 128, generator=gen).to("cuda", dtype)
    w0 = (torch.randn(5000, 128, generator=gen) / 128**0.5).to("cuda", dtype)
    t = torch.randint(0, 5000, (256,), generator=gen).cuda()
    out = {}
    for name in ("plain", "fused"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = (F.cross_entropy((h @ w.t()).float(), t) if name == "plain"
                else fused_linear_cross_entropy(h, w, t))
        loss.backward()
        out[name] = (loss.detach(), h.grad.float(), w.grad.float())
    for a, b in zip(out["fused"], out["plain"], strict=True):
        assert (a.float() - b.float()).abs().max() <= rel * b.float().abs().max()


@needs_cuda
@pytest.mark.parametrize(("backend", "padded"), [("FLASH_ATTENTION", False),
                                                 ("EFFICIENT_ATTENTION", True)])
def test_fused_sdpa_kernels_match_eager_on_cuda(backend, padded):
    from torch.nn.attention import SDPBackend

    eager = _build("eager", dtype=torch.bfloat16).cuda()
    sdpa = _build("sdpa", dtype=torch.bfloat16).cuda()
    batch = eager.tokenize(TEXTS, device="cuda")
    if not padded:
        width = int(batch["attention_mask"].sum(1).min())
        batch = {k: v[:, :width] for k, v in batch.items()}
    out = _states(sdpa, batch, getattr(SDPBackend, backend))
    assert_same_states(out, _states(eager, batch), batch["attention_mask"], rel=3e-2)
    with attention_backends("cuda"):  # the trainer's context picks a fused kernel, not math
        assert_same_states(_states(sdpa, batch), _states(eager, batch), batch["attention_mask"], 3e-2)


# ------------------------------------------------------------------------------------------------
# fp32 attention under a CPU bf16 autocast (stage 1's bf16-autocast recipe)
# ------------------------------------------------------------------------------------------------


def _spy_sdpa(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """Record (query dtype, autocast on) of every SDPA call transformers makes."""
    seen: list[tuple[torch.dtype, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@cpu_only
def test_fp32_attention_is_sdpa_in_fp32_under_autocast(monkeypatch):
    from llmclip.text.attention import FP32_SDPA, use_fp32_attention

    plain, fp32 = _build("sdpa", lora=True), _build("sdpa", lora=True)
    assert use_fp32_attention(fp32.decoder)
    assert fp32.base_model.config._attn_implementation == FP32_SDPA
    batch = plain.tokenize(TEXTS)
    assert bool((batch["attention_mask"] == 0).any())
    # Outside autocast it is the very same kernel on the very same inputs: identical states.
    torch.testing.assert_close(_states(fp32, batch), _states(plain, batch), rtol=0, atol=0)
    seen = _spy_sdpa(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = _states(fp32, batch), _states(plain, batch)
    layers = fp32.base_model.config.num_hidden_layers
    assert seen[:layers] == [(torch.float32, False)] * layers  # fp32, autocast off: no bf16 cast
    assert all(on for _, on in seen[layers:])  # the plain model's SDPA is autocast to bf16
    assert_same_states(ours, _states(plain, batch), batch["attention_mask"], rel=3e-2)
    assert (ours - theirs).abs().max() > 0  # a different kernel precision really ran
    # Gradients reach the LoRA weights through the fp32 kernel (B: A gets none while B = 0).
    fp32.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32.hidden_states(batch["input_ids"], batch["attention_mask"]).float().square().mean().backward()
    grads = [p.grad for n, p in fp32.named_parameters() if "lora_B" in n and "q_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fp32_attention_leaves_other_kernels_alone(eager_sdpa):
    from llmclip.text.attention import use_fp32_attention

    eager, _ = eager_sdpa
    assert not use_fp32_attention(eager.decoder)
    assert eager.base_model.config._attn_implementation == "eager"


@cpu_only
@pytest.mark.parametrize(("autocast", "attention", "expected"),
                         [(True, "fp32", "llmclip_sdpa_fp32"), (True, "bf16", "sdpa"), (False, "fp32", "sdpa")])
def test_stage1_module_picks_fp32_attention_only_under_cpu_autocast(autocast, attention, expected):
    from llmclip.text.stage1 import Stage1Module
    from llmclip.text.stage1_config import ObjectiveConfig

    enc = _build("sdpa", lora=True)
    Stage1Module(enc, ObjectiveConfig(), autocast=autocast, autocast_attention=attention)
    assert enc.base_model.config._attn_implementation == expected
