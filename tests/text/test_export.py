"""The portable encoder dir: one tiny encoder loaded three ways (llmclip, plain transformers with the
documented recipe, Sentence Transformers) gives the same embeddings, with and without an
instruction; ``model/`` is bidirectional through a plain ``AutoModel``; the model card; and
``llmclip export`` on existing dirs (in place, to a copy, refusing what it must)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmclip.cli import main
from llmclip.text.encoder import LLMEncoder
from llmclip.text.export import compute_fingerprint, save_encoder_dir
from llmclip.text.model_card import RECIPE, RECIPE_BODY, adapter_status
from llmclip.text.model_config import ModelConfig, pooler_args
from llmclip.text.st_export import PROMPT_SEPARATOR, check_tokenization, prompt_for

SUMMARY = "Given the findings of a chest X-ray report, retrieve its impression"
TEXTS = [
    "The heart is normal in size. There is a small left pleural effusion. No pneumothorax.",
    "(PA and lateral) Mild cardiomegaly.",  # punctuation right after the prompt's ":"
    "- Lungs are clear.",
    "1. Right lower lobe opacity.",
    "No effusion.",
    "Stable small bilateral effusions with bibasilar atelectasis. " * 12,  # past max_length: truncated
]


def _tiny(pooling: str = "mean", **kw) -> LLMEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(source="tiny:llama", attention="sdpa", max_length=64, pooling=pooling,
                      pooler_latents=8, pooler_heads=4, **kw)
    return LLMEncoder.build(cfg, torch.float32, lora=False).eval()


@pytest.fixture(scope="module")
def std_dir(tmp_path_factory):
    """A tiny encoder with standardize calibrated to non-trivial statistics and two task prompts."""
    from llmclip.text.pooling import Standardize

    enc = _tiny(standardize=True)
    b = enc.tokenize(TEXTS)
    with torch.no_grad():
        raw = enc.pooler.raw(enc.hidden_states(b["input_ids"], b["attention_mask"]), b["pool_mask"]).double()
        center, inv = Standardize.statistics(torch.tensor([len(TEXTS)], dtype=torch.float64), raw.sum(0),
                                             (raw * raw).sum(0))
        enc.pooler.standardize.center.copy_(center.float())
        enc.pooler.standardize.inv_scale.copy_(inv.float())
    out = tmp_path_factory.mktemp("export") / "std-encoder"
    return save_encoder_dir(out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=64,
                            dtype="float32", pooler_args=pooler_args(ModelConfig(standardize=True)),
                            instructions={"rewrite": "", "summary": SUMMARY}, extra={"base_model": "tiny:llama"})


def _recipe(path, prompt_name: str, texts: list[str]) -> torch.Tensor:
    scope = {"path": str(path), "prompt_name": prompt_name, "texts": texts}
    exec(RECIPE, scope)  # the very code the model card prints
    return scope["emb"]


def _st(path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(path), device="cpu")


def _dir(which: str, tiny_encoder_dir, std_dir):
    return tiny_encoder_dir if which == "tiny" else std_dir


@pytest.mark.parametrize("which", ["tiny", "standardize"])
def test_documented_plain_transformers_recipe_matches_llmclip(which, tiny_encoder_dir, std_dir):
    d = _dir(which, tiny_encoder_dir, std_dir)
    enc = LLMEncoder.from_dir(d)
    plain = enc.encode(TEXTS)
    torch.testing.assert_close(_recipe(d, "default", TEXTS), plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(_recipe(d, "none", TEXTS), plain, atol=1e-4, rtol=0)
    if which == "standardize":  # with an instruction (a task prompt of the dir)
        inst = enc.encode(TEXTS, instruction=SUMMARY)
        torch.testing.assert_close(_recipe(d, "summary", TEXTS), inst, atol=1e-4, rtol=0)
        assert (inst - plain).abs().max() > 1e-3  # the instruction really steers the report tokens


@pytest.mark.parametrize("which", ["tiny", "standardize"])
def test_sentence_transformers_matches_llmclip(which, tiny_encoder_dir, std_dir):
    d = _dir(which, tiny_encoder_dir, std_dir)
    enc, st = LLMEncoder.from_dir(d), _st(d)
    plain = enc.encode(TEXTS)
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(st.encode(TEXTS, prompt_name="none", convert_to_tensor=True), plain,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(st.encode_document(TEXTS, convert_to_tensor=True), plain, atol=1e-4, rtol=0)
    # With an instruction: a task prompt of the dir, or any instruction as an explicit prompt.
    if which == "standardize":
        inst = enc.encode(TEXTS, instruction=SUMMARY)
        torch.testing.assert_close(st.encode(TEXTS, prompt_name="summary", convert_to_tensor=True), inst,
                                   atol=1e-4, rtol=0)
        # "rewrite" has no instruction: the same vectors as none.
        torch.testing.assert_close(st.encode(TEXTS, prompt_name="rewrite", convert_to_tensor=True), plain,
                                   atol=1e-4, rtol=0)
        dense = st[2].linear  # the calibrated statistics, far from the identity, in a Dense
        assert (dense.weight.diagonal() - 1).abs().max() > 0.1 and dense.bias.abs().max() > 0.1
    else:
        inst = enc.encode(TEXTS, instruction="Retrieve the impression")
        got = st.encode(TEXTS, prompt=prompt_for("Retrieve the impression"), convert_to_tensor=True)
        torch.testing.assert_close(got, inst, atol=1e-4, rtol=0)
    assert (inst - plain).abs().max() > 1e-3  # the instruction really steers the report tokens


def test_padding_side_does_not_matter(std_dir):
    enc, st = LLMEncoder.from_dir(std_dir), _st(std_dir)
    st[0].tokenizer.padding_side = "left"
    got = st.encode(TEXTS, prompt_name="summary", batch_size=len(TEXTS), convert_to_tensor=True)
    assert st[0].tokenizer(TEXTS[:2], padding=True)["attention_mask"][1][0] == 0  # really left padded
    torch.testing.assert_close(got, enc.encode(TEXTS, instruction=SUMMARY), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_plain_automodel_is_bidirectional(tiny_encoder_dir, attention):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir / "model")
    ids = tok([TEXTS[0]], return_tensors="pt")["input_ids"]  # one unpadded row: no mask to lean on
    edited = ids.clone()
    edited[0, -1] = (edited[0, -1] + 17) % tok.vocab_size

    def first_state_moves(**kw) -> float:
        model = AutoModel.from_pretrained(tiny_encoder_dir / "model", attn_implementation=attention, **kw).eval()
        with torch.no_grad():
            a, b = model(input_ids=ids).last_hidden_state, model(input_ids=edited).last_hidden_state
        return (a[0, 0] - b[0, 0]).abs().max().item()

    assert first_state_moves() > 1e-4
    assert first_state_moves(is_causal=True) < 1e-6  # the probe does detect a causal model


def test_bfloat16_dir_loads_in_both_dtypes(tmp_path):
    # ST casts the float32 Dense to the transformer's dtype; in float32 both paths read the same
    # bf16-rounded weights, so they agree as tightly as a float32 dir.
    from llmclip.text.pooling import Standardize

    enc = _tiny(standardize=True)
    with torch.no_grad():
        enc.pooler.standardize.center.copy_(torch.linspace(-1, 1, 64))
        enc.pooler.standardize.inv_scale.copy_(torch.linspace(0.5, 3, 64))
    assert isinstance(enc.pooler.standardize, Standardize)
    d = save_encoder_dir(tmp_path / "bf16", enc.decoder.to(torch.bfloat16), enc.tokenizer,
                         enc.pooler.to(torch.bfloat16), pooling="mean", max_length=64, dtype="bfloat16",
                         pooler_args=pooler_args(ModelConfig(standardize=True)), extra={"base_model": "tiny:llama"})
    st = pytest.importorskip("sentence_transformers")
    want = LLMEncoder.from_dir(d, dtype=torch.float32).encode(TEXTS)
    got = st.SentenceTransformer(str(d), device="cpu", model_kwargs={"dtype": torch.float32})
    torch.testing.assert_close(got.encode(TEXTS, convert_to_tensor=True), want, atol=1e-4, rtol=0)
    native = st.SentenceTransformer(str(d), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert native.dtype == torch.float32 or native.dtype == torch.bfloat16
    torch.testing.assert_close(native.float(), LLMEncoder.from_dir(d).encode(TEXTS), atol=0.1, rtol=0.05)


def test_last_token_pooling_exports_too(tmp_path):
    enc = _tiny("last_token")
    d = save_encoder_dir(tmp_path / "last", enc.decoder, enc.tokenizer, enc.pooler, pooling="last_token",
                         max_length=64, dtype="float32", extra={"base_model": "tiny:llama"})
    got = _st(d).encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(got, LLMEncoder.from_dir(d).encode(TEXTS), atol=1e-4, rtol=0)


def test_latent_attention_gets_no_sentence_transformers_files(tmp_path):
    from transformers import AutoModel

    enc = _tiny("latent_attention")
    d = save_encoder_dir(tmp_path / "lat", enc.decoder, enc.tokenizer, enc.pooler, pooling="latent_attention",
                         max_length=64, dtype="float32", pooler_args=pooler_args(ModelConfig(
                             pooling="latent_attention", pooler_latents=8, pooler_heads=4)),
                         extra={"base_model": "tiny:llama"})
    meta = json.loads((d / "encoder.json").read_text())
    assert meta["export"]["sentence_transformers"] is False
    assert "LLMEncoder.from_dir" in meta["export"]["sentence_transformers_note"]
    assert not (d / "modules.json").exists() and not (d / "1_Pooling").exists()
    assert "Sentence Transformers files were not written" in (d / "README.md").read_text()
    AutoModel.from_pretrained(d / "model")  # the decoder still loads plainly
    assert LLMEncoder.from_dir(d).encode(TEXTS[:2]).shape == (2, 64)


def test_model_card_names_base_layers_and_limits(tiny_encoder_dir, std_dir):
    card = (tiny_encoder_dir / "README.md").read_text()
    assert "`tiny:llama`" in card and "| decoder layers | 2 of 2 (all) |" in card
    assert "Not for clinical use" in card and "Research use only" in card
    assert json.loads((tiny_encoder_dir / "encoder.json").read_text())["fingerprint"] in card
    assert RECIPE_BODY.strip() in card  # the card prints the recipe the tests run
    assert 'SentenceTransformer("' in (std_dir / "README.md").read_text()
    assert "`summary`" in (std_dir / "README.md").read_text()


def test_adapter_applies_only_to_an_unchanged_published_base():
    full = {"adapter_dir": "adapter", "base_model": "meta-llama/Meta-Llama-3-8B", "keep_layers": 0}
    assert adapter_status(full)[0]
    assert not adapter_status({**full, "keep_layers": 4, "layers": 4, "base_layers": 32})[0]
    assert not adapter_status({**full, "base_model": "asset:smollm2-135m"})[0]
    assert not adapter_status({**full, "base_model": "tiny:llama"})[0]
    assert not adapter_status({**full, "adapter_dir": None})[0]


def test_tokenization_check_catches_a_tokenizer_that_differs(std_dir):
    from transformers import AutoTokenizer

    meta = json.loads((std_dir / "encoder.json").read_text())
    llm_tok = AutoTokenizer.from_pretrained(std_dir / "tokenizer")
    prompts = meta["export"]["prompts"]
    assert prompts["summary"] == SUMMARY + ":" + PROMPT_SEPARATOR
    assert check_tokenization(llm_tok, AutoTokenizer.from_pretrained(std_dir / "model"), meta, prompts) is None
    # llmclip's own tokenizer, used the Sentence Transformers way (no BOS, no separator), does not pass.
    assert check_tokenization(llm_tok, llm_tok, meta, prompts) is not None


def _strip_export(d) -> None:
    """Make ``d`` look like an encoder dir written before the export files existed."""
    for name in ("README.md", "modules.json", "config_sentence_transformers.json", "1_Pooling", "2_Dense"):
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for f in (d / "model").iterdir():
        if not (f.name == "config.json" or f.suffix == ".safetensors"):
            f.unlink()
    meta = json.loads((d / "encoder.json").read_text())
    meta.pop("export", None)
    (d / "encoder.json").write_text(json.dumps(meta))


def test_llmclip_export_in_place_and_to_a_copy(std_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(std_dir, run / "final")
    _strip_export(run / "final")
    before = json.loads((run / "final" / "encoder.json").read_text())["fingerprint"]
    (run / "config.yaml").write_text("model: {keep_layers: 0, lora: {enabled: true, r: 8, alpha: 16}}\n"
                                     "stage1: {mntp_steps: 3, hard_negatives: 1}\noptim: {lr: 0.003}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 8, "loss": 0.5}) + "\n")
    table = {"encoder": "stage-1 encoder (final)", "error_discrimination": 0.75,
             "ci": {"error_discrimination": {"value": 0.75, "lo": 0.61, "hi": 0.88, "n": 40}}}
    counts = {"reports": 50, "error_items": 40, "findings_impression": 30, "distinct_impressions": 20,
              "abbreviated": 25}
    (run / "eval_text.json").write_text(json.dumps({"fingerprint": before, "shards": "x:test",
                                                    "counts": counts, "table": [table]}))
    (run / "other_eval_text.json").write_text(json.dumps({"fingerprint": "0" * 64, "table": [table]}))

    assert main(["export", str(run)]) == 0
    final = run / "final"
    meta = json.loads((final / "encoder.json").read_text())
    assert meta["fingerprint"] == before == compute_fingerprint(final, meta)  # caches stay valid
    assert meta["export"]["heldout_metrics"].endswith("/run/eval_text.json")
    card = (final / "README.md").read_text()
    assert "75.0 [61.0, 88.0]" in card and "Trained steps: 8" in card and "LoRA r=8" in card
    enc = LLMEncoder.from_dir(final)
    assert enc.fingerprint == before
    torch.testing.assert_close(_st(final).encode(TEXTS, prompt_name="summary", convert_to_tensor=True),
                               enc.encode(TEXTS, instruction=SUMMARY), atol=1e-4, rtol=0)

    out = tmp_path / "copy"
    assert main(["export", str(final), "--out", str(out)]) == 0
    assert (out / "modules.json").is_file() and (out / "2_Dense" / "model.safetensors").is_file()
    assert json.loads((out / "encoder.json").read_text())["fingerprint"] == before
    assert f'SentenceTransformer("{out}")' in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy.tmp")]
    capsys.readouterr()
    assert main(["export", str(final), "--out", str(out)]) == 2  # never over an existing folder
    assert "--out" in capsys.readouterr().err


def test_llmclip_export_refuses_what_it_must(std_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no encoder.json" in capsys.readouterr().err
    d = tmp_path / "enc"
    shutil.copytree(std_dir, d)
    (d / "bad.json").write_text(json.dumps({"fingerprint": "0" * 64, "table": []}))
    assert main(["export", str(d), "--metrics", str(d / "bad.json")]) == 2
    assert "--metrics" in capsys.readouterr().err
    meta = json.loads((d / "encoder.json").read_text())
    (d / "encoder.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    assert main(["export", str(d)]) == 2  # weights that are not the fingerprinted ones
    assert "fingerprint" in capsys.readouterr().err
