"""The peer side of ``stage1_step.py``: llm2vec's supervised contrastive training step.

Runs inside the llm2vec venv (``.bench-venv/llm2vec``: llm2vec 0.2.x pins transformers 4.44, which
llmclip cannot import), never imports llmclip, and talks to the parent only in numbers:

    parent -> child (stdin):   "run K"      K training steps, then one JSON line back
                               "quit"
    child -> parent (stdout):  "READY {...}" once set up (token counts per batch)
                               "{...}"       per "run": seconds per step, last loss

The step is llm2vec's ``experiments/run_supervised.py``: ``LLM2Vec.from_pretrained(...,
enable_bidirectional=True)`` (its ``LlamaBiModel``), LoRA on q,k,v,o,gate,up,down via peft,
query / positive / hard negatives (all of a batch's, concatenated: the loss scores every query
against every positive and negative) each through ``LLM2Vec.forward`` (mean pooling over the text after
the instruction separator), ``HardNegativeNLLLoss`` (scale 50), backward, gradient-norm clip 1.0
(the HF Trainer's default), AdamW; with ``--autocast`` the forward runs under bf16 autocast, as
the HF Trainer's ``bf16=True`` does. Batches are tokenised once at start by ``LLM2Vec.tokenize``
(the collator's work, which runs in the data loader and is not timed on either side).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SEPARATOR = "!@#$%^&*()"  # llm2vec's marker between instruction and text
LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def compatible_copy(src: Path, dst: Path) -> Path:
    """The model folder in the dialect transformers 4.44 reads (the parent saved it with 5.x).

    Only file formats change: the tokenizer class name, BPE merges written as "a b" strings, no
    token_type_ids, and ``rope_theta`` at top level. Weights and vocabulary are the same bytes.
    """
    shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_input_names"] = ["input_ids", "attention_mask"]
    (dst / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    tj = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    merges = tj.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):
        tj["model"]["merges"] = [" ".join(m) for m in merges]
        tj["model"].pop("ignore_merges", None)
    (dst / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="tiny Llama folder (saved by the parent)")
    p.add_argument("--batches", required=True, help="JSON: [{query, instruction, pos, neg}, ...]")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale", type=float, default=50.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around the step's forward")
    args = p.parse_args()

    import torch
    import transformers
    from llm2vec import LLM2Vec
    from llm2vec.loss.utils import load_loss
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = json.loads(Path(args.batches).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="llm2vec-peer-") as tmp:
        folder = compatible_copy(Path(args.model), Path(tmp) / "model")
        model = LLM2Vec.from_pretrained(
            str(folder),
            enable_bidirectional=True,
            pooling_mode="mean",
            max_length=args.max_length,
            torch_dtype=torch.float32,
        )
    model.model = get_peft_model(
        model.model,
        LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=LORA_TARGETS, bias="none", task_type=None,
        ),
    )  # fmt: skip
    loss_fn = load_loss("HardNegativeNLLLoss", scale=args.scale)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)

    def collate(b: dict) -> list[dict]:
        queries = [
            f"{ins.strip()} {SEPARATOR}{q}"
            for ins, q in zip(b["instruction"], b["query"], strict=True)
        ]
        docs_pos = [f"{SEPARATOR}{t}" for t in b["pos"]]
        docs_neg = [f"{SEPARATOR}{t}" for t in b["neg"]]
        return [model.tokenize([model.prepare_for_tokenization(t) for t in texts])
                for texts in (queries, docs_pos, docs_neg)]  # fmt: skip

    feats = [collate(b) for b in batches]
    info = {
        "real_tokens": [sum(int(f["attention_mask"].sum()) for f in fs) for fs in feats],
        "padded_tokens": [sum(int(f["attention_mask"].numel()) for f in fs) for fs in feats],
        "trainable": sum(q.numel() for q in params),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    print("READY " + json.dumps(info), flush=True)

    step = 0
    model.train()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seconds, loss = [], float("nan")
        for _ in range(int(cmd[1])):
            fs = feats[step % len(feats)]
            t0 = time.perf_counter()
            # LLM2Vec.forward mutates its feature dict (attention mask -> embed mask): a fresh
            # dict per call, as the collator hands the Trainer every step.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
                q_reps = model(dict(fs[0]))
                d_reps = model(dict(fs[1]))
                d_neg = model(dict(fs[2]))
                loss_t = loss_fn(q_reps.float(), d_reps.float(), d_neg.float())
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(loss_t.detach())
            seconds.append(time.perf_counter() - t0)
            step += 1
        print(json.dumps({"seconds": seconds, "loss": loss}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
