"""The parts of an encoder dir that load without llmclip: ``model/`` for plain transformers and the
Sentence Transformers files beside it.

    model/                   + a tokenizer of its own (below) and sentence_bert_config.json
    modules.json             Transformer (path ``model``) -> Pooling (mean or last token) -> Dense
    config_sentence_transformers.json   prompts: "default", "none", "query", "document", each task
    1_Pooling/config.json    ``include_prompt: false``: BOS and the instruction are never pooled
    2_Dense/                 the ``standardize`` affine as an identity-activation Dense (when used)

llmclip tokenises ``[bos] + tok(instruction + ":") + tok(report)`` (three separate calls) and pools
the report tokens only. Sentence Transformers tokenises ``prompt + text`` as one string and skips
``len(tok(prompt))`` tokens (less a trailing special token). Two changes to the copy of the
tokenizer in ``model/`` make the two agree token for token, without touching llmclip's own
``tokenizer/`` or its tokenisation (existing encoder dirs and caches stay valid):

- every prompt ends with ``PROMPT_SEPARATOR`` (U+2063 INVISIBLE SEPARATOR), which a ``Split``
  pre-tokenizer removes, so the report is tokenised as if alone: nothing merges across ("findings:"
  followed by "(PA)" would otherwise become one ``:(`` token);
- the post-processor adds BOS (and EOS for last-token pooling, as llmclip does), and BOS is not
  declared ``bos_token``: Sentence Transformers drops a trailing special token from the prompt
  length, which for the no-instruction prompt (BOS alone) would count 0 and pool BOS.

``check_tokenization`` proves the agreement on probe texts before any file is written; a tokenizer
that fails it (e.g. SentencePiece models that prepend "▁" to the whole string) gets no
Sentence Transformers files, and encoder.json says why. Nothing here imports sentence-transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PROMPT_SEPARATOR = "\u2063"
RESERVED_PROMPTS = ("default", "none", "query", "document")
ST_FILES = ("modules.json", "config_sentence_transformers.json", "1_Pooling", "2_Dense",
            "model/sentence_bert_config.json")

# Report-like probes with the starts that could merge with a prompt's last token (punctuation,
# digits, spaces, newlines, non-ASCII); one more, longer than max_length, is added to check truncation.
PROBES = [
    "The heart is normal in size. There is a small left pleural effusion.",
    "(PA and lateral) No acute cardiopulmonary process.",
    "- Small right effusion; no pneumothorax.",
    ":-) odd start",
    "1. Cardiomegaly. 2. No edema.",
    " leading space",
    "\nFINDINGS: clear lungs.",
    "Épanchement pleural gauche – modéré.",
    "x",
]


def prompt_for(instruction: str | None, has_bos: bool = True) -> str:
    """The Sentence Transformers prompt for an llmclip instruction (mirrors ``LLMEncoder.tokenize``)."""
    words = instruction.strip() + ":" if instruction else ""
    # Without BOS and instruction there is nothing to skip; "" is ST's "no prompt".
    return words + PROMPT_SEPARATOR if words or has_bos else ""


def build_prompts(meta: dict[str, Any], has_bos: bool) -> dict[str, str]:
    """Prompt per name: each task instruction, then the reserved names (which win a name clash)."""
    prompts = {str(k): prompt_for(v, has_bos) for k, v in (meta.get("instructions") or {}).items()}
    default = prompt_for(meta.get("instruction"), has_bos)  # what LLMEncoder.encode(texts) uses
    prompts.update({"default": default, "none": prompt_for(None, has_bos), "query": default, "document": default})
    return prompts


def export_tokenizer(tokenizer_dir: Path, pooling: str, max_length: int) -> Any:
    """llmclip's tokenizer, changed as the module docstring says, for ``model/``."""
    from tokenizers import pre_tokenizers, processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{tokenizer_dir}: not a fast (tokenizers) tokenizer")
    split = pre_tokenizers.Split(PROMPT_SEPARATOR, behavior="removed")
    old = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, old] if old is not None else [split])
    specials, single = [], "$A"
    if tok.bos_token_id is not None:
        specials.append((tok.bos_token, tok.bos_token_id))
        single = f"{tok.bos_token} $A"
    if pooling == "last_token" and tok.eos_token_id is not None:
        specials.append((tok.eos_token, tok.eos_token_id))
        single += f" {tok.eos_token}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=list(dict.fromkeys(specials)))
    if tok.pad_token is None:  # llmclip pads with EOS when there is no pad token
        tok.pad_token = tok.eos_token
    tok.bos_token = None  # see the module docstring: BOS must count as part of every prompt
    tok.model_max_length = int(max_length)  # ST and plain calls truncate where llmclip does
    tok.padding_side = "right"
    tok.chat_template = None  # else ST would feed texts through the chat template ("message")
    return tok


def _llmclip_rows(llm_tok: Any, texts: list[str], instruction: str | None, pooling: str,
                  max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, pooled positions) per text, by ``LLMEncoder.tokenize`` itself (no model needed)."""
    from llmclip.text.encoder import LLMEncoder

    pad = llm_tok.pad_token_id if llm_tok.pad_token_id is not None else llm_tok.eos_token_id
    shim = SimpleNamespace(tokenizer=llm_tok, pooling=pooling, max_length=max_length, pad_id=pad)
    b = LLMEncoder.tokenize(shim, texts, instruction)  # type: ignore[arg-type]
    rows = []
    for ids, attn, pool in zip(b["input_ids"], b["attention_mask"], b["pool_mask"], strict=True):
        n = int(attn.sum())
        pos = [i for i in range(n) if pool[i]]
        rows.append((ids[:n].tolist(), pos[-1:] if pooling == "last_token" else pos))
    return rows


def _st_row(st_tok: Any, prompt: str, text: str, pooling: str) -> tuple[list[int], list[int]]:
    """(ids, pooled positions) the way Sentence Transformers 6 computes them (Transformer.preprocess,
    _get_prompt_length, Pooling with include_prompt=False)."""
    limit = min(int(st_tok.model_max_length), 1 << 30)  # "no limit" is stored as ~1e30
    ids = st_tok(prompt + text, truncation=True, max_length=limit)["input_ids"]
    skip = 0
    if prompt:
        alone = st_tok(prompt)["input_ids"]
        skip = len(alone) - (1 if alone and alone[-1] in st_tok.all_special_ids else 0)
    if pooling == "last_token":
        return ids, [len(ids) - 1]
    return ids, list(range(skip, len(ids)))


def check_tokenization(llm_tok: Any, st_tok: Any, meta: dict[str, Any],
                       prompts: dict[str, str]) -> str | None:
    """None when every prompt + probe tokenises and pools alike both ways, else the first difference."""
    pooling, max_length = meta["pooling"], int(meta["max_length"])
    long = "No acute cardiopulmonary abnormality. " * (max_length // 4 + 8)
    probes = [*PROBES, long]
    has_bos = llm_tok.bos_token_id is not None
    # Every prompt in ``prompts`` comes from one of these instructions (build_prompts).
    by_prompt = {prompt_for(ins, has_bos): ins
                 for ins in [meta.get("instruction"), None, *(meta.get("instructions") or {}).values()]}
    if set(prompts.values()) - set(by_prompt):
        return f"prompts {sorted(set(prompts.values()) - set(by_prompt))} match no instruction"
    for prompt, ins in by_prompt.items():
        want = _llmclip_rows(llm_tok, probes, ins, pooling, max_length)
        for text, (ids, pos) in zip(probes, want, strict=True):
            got_ids, got_pos = _st_row(st_tok, prompt, text, pooling)
            if (got_ids, got_pos) != (ids, pos):
                return (f"prompt {prompt!r} + text {text[:40]!r}: ids {got_ids[:12]}.. pooled from "
                        f"{got_pos[:1]}, llmclip {ids[:12]}.. pooled from {pos[:1]}")
    return None


def remove_st_files(enc_dir: Path) -> None:
    """Delete Sentence Transformers files of an earlier export (a refused one must leave none)."""
    for name in ST_FILES:
        p = enc_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_st_files(enc_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the tokenizer into ``model/`` and, where they reproduce llmclip, the Sentence Transformers
    files. Returns what encoder.json records under ``export``."""
    from transformers import AutoTokenizer

    remove_st_files(enc_dir)
    pooling, max_length, dim = meta["pooling"], int(meta["max_length"]), int(meta["dim"])
    model_dir = enc_dir / meta.get("model_dir", "model")
    tok_dir = enc_dir / meta.get("tokenizer_dir", "tokenizer")
    llm_tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    has_bos = llm_tok.bos_token_id is not None
    prompts = build_prompts(meta, has_bos)
    info: dict[str, Any] = {"prompts": prompts, "prompt_separator": PROMPT_SEPARATOR,
                            "default_prompt_name": "default", "sentence_transformers": False}
    try:
        st_tok = export_tokenizer(tok_dir, pooling, max_length)
    except ValueError as e:
        info["sentence_transformers_note"] = str(e)
        return info
    st_tok.save_pretrained(model_dir)  # model/ loads alone with AutoTokenizer + AutoModel
    if pooling == "latent_attention":
        info["sentence_transformers_note"] = (
            "latent-attention pooling has no Sentence Transformers module: load with "
            "llmclip.text.encoder.LLMEncoder.from_dir")
        return info
    mismatch = check_tokenization(llm_tok, st_tok, meta, prompts)
    if mismatch:
        info["sentence_transformers_note"] = f"tokenisation differs from llmclip's: {mismatch}"
        return info
    _write_json(model_dir / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction", "max_seq_length": max_length, "do_lower_case": False,
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings"})
    mode = "lasttoken" if pooling == "last_token" else "mean"
    _write_json(enc_dir / "1_Pooling" / "config.json",
                {"embedding_dimension": dim, "pooling_mode": mode, "include_prompt": False})
    modules = [
        {"idx": 0, "name": "0", "path": meta.get("model_dir", "model"),
         "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
    ]
    if (meta.get("pooler_args") or {}).get("standardize"):
        _write_dense(enc_dir, meta, dim)
        modules.append({"idx": 2, "name": "2", "path": "2_Dense",
                        "type": "sentence_transformers.base.modules.dense.Dense"})
    _write_json(enc_dir / "modules.json", modules)
    _write_json(enc_dir / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": "default",
        "similarity_fn_name": "cosine"})
    info["sentence_transformers"] = True
    return info


def standardize_affine(enc_dir: Path, meta: dict[str, Any]) -> tuple[Any, Any]:
    """(center, inv_scale) float32 from the pooler file: ``Standardize`` is ``(x - center) * inv_scale``."""
    from safetensors.torch import load_file

    name = meta.get("pooler_file")
    state = load_file(str(enc_dir / name)) if name else {}
    try:
        return state["standardize.center"].float(), state["standardize.inv_scale"].float()
    except KeyError:
        from llmclip.config import ConfigError

        raise ConfigError(f"{enc_dir / str(name)}: standardize statistics missing", "pooler_file") from None


def _write_dense(enc_dir: Path, meta: dict[str, Any], dim: int) -> None:
    """``Standardize`` as ``Dense``: weight diag(inv_scale), bias -center * inv_scale, identity
    activation. Kept in float32 (ST casts it to the transformer's dtype on load)."""
    import torch
    from safetensors.torch import save_file

    center, inv = standardize_affine(enc_dir, meta)
    out = enc_dir / "2_Dense"
    out.mkdir(parents=True, exist_ok=True)
    save_file({"linear.weight": torch.diag(inv).contiguous(), "linear.bias": (-center * inv).contiguous()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", {"in_features": dim, "out_features": dim, "bias": True,
                                      "activation_function": "torch.nn.modules.linear.Identity"})
