"""The encoder dir's ``README.md``: what the model is, how it was trained, how it scored on held-out
reports (when ``llmclip eval text`` has scored this very fingerprint), three ways to load it, and
what it must not be used for.

Held-out metrics are looked up, not computed: an ``*eval_text.json`` in the encoder dir, its run
folder or the folder above (the demo's layout), or the file given to ``llmclip export --metrics``,
and only when its ``fingerprint`` is this encoder's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmclip.config import ConfigError

# The plain-transformers recipe, run verbatim by tests/text/test_export.py (with ``path``,
# ``prompt_name`` and ``texts`` given); the card prints the imports, those three, then the body.
RECIPE_IMPORTS = '''\
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
'''
RECIPE_BODY = '''\
tok = AutoTokenizer.from_pretrained(f"{path}/model")  # adds BOS itself
model = AutoModel.from_pretrained(f"{path}/model", dtype=torch.float32).eval()  # is_causal: false
prompt = json.loads(Path(path, "config_sentence_transformers.json").read_text())["prompts"][prompt_name]
batch = tok([prompt + t for t in texts], padding=True, truncation=True, padding_side="right",
            return_tensors="pt")  # max_length: model_max_length, as llmclip
mask = batch["attention_mask"].clone()
mask[:, : len(tok(prompt)["input_ids"])] = 0  # BOS + instruction steer the states but are not pooled
with torch.no_grad():
    states = model(**batch).last_hidden_state
emb = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
if Path(path, "pooler.safetensors").is_file():  # standardize: (x - center) * inv_scale
    stats = load_file(f"{path}/pooler.safetensors")
    emb = (emb - stats["standardize.center"]) * stats["standardize.inv_scale"]
'''
RECIPE = RECIPE_IMPORTS + RECIPE_BODY

NOT_CLINICAL = ("**Research use only. Not for clinical use**: not validated for, and must not be used in, "
                "diagnosis, triage, reporting or any other decision about a patient.")


def adapter_status(meta: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``adapter/`` applies to the named base model as published, and why (not)."""
    if not meta.get("adapter_dir"):
        return False, "no LoRA adapter (the run trained without LoRA, or this dir was built without one)"
    source = str(meta.get("base_model", ""))
    keep, layers, base = meta.get("keep_layers") or 0, meta.get("layers"), meta.get("base_layers")
    if keep and not (base and layers == base):
        return False, (f"the encoder keeps only the first {keep} decoder layers of `{source}`; the adapter "
                       "targets those layers and does not reproduce this encoder on the full base model")
    if source.startswith(("asset:", "tiny:")) or source.endswith(".gguf") or Path(source).exists():
        return False, (f"the base `{source}` is a local or converted model (GGUF dequantised, or built "
                       "from a config): the adapter fits that local copy only, not a published checkpoint")
    return True, f"the adapter applies to `{source}` unchanged (then switch attention to bidirectional)"


def find_text_metrics(origin: Path, fingerprint: str, explicit: Path | None = None) -> tuple[dict | None, Path | None]:
    """The ``llmclip eval text`` result for ``fingerprint``: ``explicit`` (must match) or one found
    beside ``origin`` (the encoder dir, its run folder, the folder above)."""
    if explicit is not None:
        try:
            result = json.loads(Path(explicit).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{explicit}: cannot read ({type(e).__name__}: {e})", "--metrics") from None
        if result.get("fingerprint") != fingerprint:
            raise ConfigError(f"{explicit}: fingerprint {str(result.get('fingerprint'))[:12]}.. is not this "
                              f"encoder's {fingerprint[:12]}..", "--metrics")
        return result, Path(explicit)
    for folder in (origin, origin.parent, origin.parent.parent):
        for f in sorted(folder.glob("*eval_text.json")) if folder.is_dir() else []:
            try:
                result = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(result, dict) and result.get("fingerprint") == fingerprint and result.get("table"):
                return result, f
    return None, None


def run_summary(run_dir: Path | None) -> dict[str, Any]:
    """The stage-1 config, data manifest and last logged step of ``run_dir`` (what exists of them)."""
    out: dict[str, Any] = {}
    if run_dir is None:
        return out
    try:
        import yaml

        out["config"] = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        out["config"] = {}
    spec = str(((out["config"].get("data") or {}).get("shards")) or "")
    if spec:
        folder, _, splits = spec.partition(":")
        try:
            manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
            wanted = set(splits.split(",")) if splits else None
            out["data_source"] = manifest.get("source")
            out["data_reports"] = sum(int(s.get("count", 0)) for s in manifest.get("shards", [])
                                      if wanted is None or s.get("split") in wanted)
        except (OSError, ValueError, TypeError):
            pass
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        out["last_step"] = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError, IndexError):
        pass
    return out


def _front_matter(meta: dict[str, Any], export: dict[str, Any]) -> str:
    source = str(meta.get("base_model", ""))
    lines = ["---", "license: other", "pipeline_tag: feature-extraction",
             "tags: [llmclip, radiology, chest-x-ray, report-encoder, research-only]"]
    if export.get("sentence_transformers"):
        lines.append("library_name: sentence-transformers")
    if "/" in source and not source.startswith(("asset:", "tiny:", "/", ".")) and not Path(source).exists():
        lines.append(f"base_model: {source}")  # a hub id only; local/converted bases are not linkable
    return "\n".join([*lines, "---", ""])


def _layers_line(meta: dict[str, Any]) -> str:
    layers, base, keep = meta.get("layers"), meta.get("base_layers"), meta.get("keep_layers") or 0
    if keep:
        total = f"{base}" if base else "? (not recorded)"
        return f"{layers or keep} of {total} (`keep_layers: {keep}`: the first {keep} decoder layers)"
    return f"{layers} of {base or layers} (all)" if layers else "all (count not recorded)"


def _training(meta: dict[str, Any], run: dict[str, Any]) -> list[str]:
    cfg = run.get("config") or {}
    model, s1, optim = cfg.get("model") or {}, cfg.get("stage1") or {}, cfg.get("optim") or {}
    ds = cfg.get("deepspeed") or {}
    steps = meta.get("trained_steps") or (run.get("last_step") or {}).get("step")
    out = ["## Training", ""]
    if run.get("data_source"):
        out.append(f"- Data: `{run['data_source']}` report shards ({run.get('data_reports', '?')} reports in "
                   f"`{(cfg.get('data') or {}).get('shards')}`), text only.")
    elif cfg.get("data"):
        out.append(f"- Data: report shards `{cfg['data'].get('shards')}`, text only.")
    else:
        out.append("- Data: not recorded beside this encoder dir.")
    out.append(f"- Trained steps: {steps if steps is not None else 'not recorded'}.")
    if cfg:
        lora = model.get("lora") or {}
        out += [
            f"- Recipe: llmclip stage 1: {s1.get('mntp_steps', '?')} steps of masked next-token prediction, "
            f"then supervised contrastive learning (report <-> rewrite, findings -> impression; "
            f"{s1.get('hard_negatives', '?')} hard negative(s) per query), bidirectional attention.",
            f"- LoRA r={lora.get('r')}, alpha={lora.get('alpha')}." if lora.get("enabled", True)
            else "- Every decoder weight trained (no LoRA).",
            f"- Optimiser: AdamW, lr {optim.get('lr')}, {optim.get('warmup_steps')} warm-up steps, "
            f"micro-batch {ds.get('micro_batch_size')} x accumulation {ds.get('grad_accum')} per rank; "
            f"quantisation during training: {model.get('quantization', 'none')}.",
        ]
    return [*out, ""]


def _metrics(result: dict | None, path: Path | None) -> list[str]:
    out = ["## Held-out evaluation", ""]
    if not result:
        return [*out, "No `llmclip eval text` result for this fingerprint was found. Run "
                "`llmclip eval text --encoder DIR --out RUN/eval_text.json`, then `llmclip export RUN` "
                "to add it here.", ""]
    from llmclip.eval.text import format_table

    return [*out, f"`llmclip eval text` on `{result.get('shards')}` (file `{path.name if path else '?'}`); "
            "%, 95% bootstrap intervals:", "", format_table(result), ""]


def render_card(meta: dict[str, Any], export: dict[str, Any], run: dict[str, Any], where: str,
                metrics: dict | None = None, metrics_path: Path | None = None) -> str:
    """The model card text; ``where`` is the encoder dir as the snippets should name it."""
    pooling = meta.get("pooling")
    std = bool((meta.get("pooler_args") or {}).get("standardize"))
    prompts = export.get("prompts") or {}
    tasks = [k for k in prompts if k not in ("default", "none", "query", "document")]
    applies, why = adapter_status(meta)
    lines = [
        _front_matter(meta, export),
        "# Chest X-ray report encoder (llmclip stage 1)", "", NOT_CLINICAL, "",
        "A decoder LLM made bidirectional and fine-tuned as an encoder of radiology report text: it "
        "maps a report to one vector (cosine similarity) for retrieval and as the text tower of a chest "
        "X-ray CLIP model.", "",
        "| | |", "|---|---|",
        f"| base model | `{meta.get('base_model', '?')}` |",
        f"| decoder layers | {_layers_line(meta)} |",
        f"| embedding dimension | {meta.get('dim')} |",
        f"| pooling | {pooling}{' + standardize (per-dimension centre and scale)' if std else ''}; "
        "BOS and instruction tokens are never pooled |",
        f"| max tokens | {meta.get('max_length')} (instruction included) |",
        f"| weights dtype | {meta.get('dtype')} |",
        f"| fingerprint | `{meta.get('fingerprint', '')}` |",
        f"| task prompts | {', '.join(f'`{t}`' for t in tasks) or 'none'} |", "",
        *_training(meta, run), *_metrics(metrics, metrics_path),
        "## Use", "", "With llmclip (every pooling):", "", "```python",
        "from llmclip.text.encoder import LLMEncoder", "",
        f'enc = LLMEncoder.from_dir("{where}")',
        'emb = enc.encode(["Small left pleural effusion."], instruction=None)  # or a task instruction',
        "```", "",
    ]
    if export.get("sentence_transformers"):
        lines += [
            "With Sentence Transformers (no remote code; `prompt_name` = `default`, `none` or a task):", "",
            "```python", "from sentence_transformers import SentenceTransformer", "",
            f'model = SentenceTransformer("{where}")',
            'emb = model.encode(["Small left pleural effusion."], prompt_name="default")',
            "```", "",
            "With plain transformers (mean over the report tokens, then the standardize affine):", "",
            "```python", RECIPE_IMPORTS, f'path, prompt_name = "{where}", "default"  # or "none", a task',
            'texts = ["Small left pleural effusion.", "No acute cardiopulmonary process."]',
            RECIPE_BODY.rstrip("\n"), "```", "",
            "All three agree to 1e-4 in float32. Prompts end in U+2063 (INVISIBLE SEPARATOR), which "
            "the tokenizer in `model/` drops, so the report is tokenised exactly as llmclip does; that "
            "tokenizer also adds BOS itself. Empty texts differ (llmclip pools one pad token).", "",
        ]
    else:
        lines += [f"Sentence Transformers files were not written: {export.get('sentence_transformers_note')}. "
                  "`model/` still loads with `transformers.AutoModel` (bidirectional), but only "
                  "`LLMEncoder.from_dir` reproduces the embeddings.", ""]
    lines += [
        "## Files", "",
        "- `encoder.json`: llmclip settings and the fingerprint; `model/`: the decoder with LoRA merged "
        "(safetensors, `is_causal: false`) and a tokenizer for plain use; `tokenizer/`: llmclip's tokenizer; "
        "`pooler.safetensors`: pooler weights (standardize statistics or the latent-attention pooler).",
        (f"- `adapter/`: the LoRA adapter (peft). {'Applies' if applies else 'Does not apply to the full base model'}"
         f": {why}." if meta.get("adapter_dir") else f"- No `adapter/`: {why}."), "",
        "## Intended use and limits", "", NOT_CLINICAL, "",
        "- Intended for research on report retrieval, report-error sensitivity and image-text "
        "pre-training. Trained on public English chest X-ray reports and rule-made variants of them; "
        "expect it to miss phrasing, languages and findings those do not cover.",
        "- Similarity is not correctness: a wrong report can sit close to the right one (see the "
        "error-discrimination figures above).",
        "- Embeddings are reproducible only with the same weights (same fingerprint) and float32; "
        "bfloat16 differs in the last digits.", "",
    ]
    return "\n".join(lines)


def recorded_base_layers(enc_dir: Path, meta: dict[str, Any]) -> int | None:
    """The base model's layer count: encoder.json, else the config of the local base the adapter
    names (dirs written before ``base_layers`` was recorded)."""
    if meta.get("base_layers"):
        return int(meta["base_layers"])
    try:
        adapter = json.loads((enc_dir / str(meta.get("adapter_dir")) / "adapter_config.json").read_text())
        base = Path(adapter["base_model_name_or_path"]) / "config.json"
        cfg = json.loads(base.read_text(encoding="utf-8"))
        return int(cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_model_card(enc_dir: Path, meta: dict[str, Any], export: dict[str, Any], *, where: Path,
                     origin: Path, run_dir: Path | None, metrics_file: Path | None = None) -> Path | None:
    """Write ``enc_dir/README.md`` (``where``: its final location; ``origin``: where to look for
    held-out metrics). Returns the metrics file used, None when none was found."""
    metrics, path = find_text_metrics(origin, str(meta.get("fingerprint", "")), metrics_file)
    text = render_card(meta, export, run_summary(run_dir), str(where), metrics, path)
    (enc_dir / "README.md").write_text(text, encoding="utf-8")
    return path
