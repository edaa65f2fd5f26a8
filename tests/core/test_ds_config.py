"""The one DeepSpeed JSON builder of both stages: the run's values win, the user's monitor blocks
are merged, unusable files are refused naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmclip.config import ConfigError, DeepSpeedSection, RunConfig
from llmclip.ds_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[2]


def _build(tmp_path: Path, user: dict, tensorboard: bool = True, **section) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    d = DeepSpeedSection(config=str(path), micro_batch_size=4, grad_accum=3, **section)
    run = RunConfig(out_dir=str(tmp_path / "run"), tensorboard=tensorboard)
    return build_deepspeed_config(d, run, grad_clip=0.5, world=2, job="stage2", bf16=False)


def test_run_values_overwrite_the_file_and_the_rest_is_kept(tmp_path):
    user = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    user["train_batch_size"], user["gradient_clipping"] = 999, 7.0
    ds = _build(tmp_path, user, zero_stage=3)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == user["zero_optimization"]["reduce_bucket_size"]
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_monitor_blocks_are_merged_not_overwritten(tmp_path):
    wandb = {"enabled": True, "project": "cxr", "group": "ablation-3", "team": "lab"}
    csv = {"enabled": True, "output_path": "/data/csv", "job_name": "mine"}
    tb = {"enabled": True, "output_path": "/data/tb", "job_name": "mine"}
    ds = _build(tmp_path, {"wandb": wandb, "csv_monitor": csv, "tensorboard": tb}, tensorboard=False)
    assert ds["wandb"] == wandb and ds["csv_monitor"] == csv and ds["tensorboard"] == tb
    # Empty or missing paths are filled with the run's; the YAML switch turns it on.
    ds = _build(tmp_path, {"tensorboard": {"enabled": False, "output_path": "", "job_name": ""}})
    assert ds["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run" / "tb"),
                                 "job_name": "stage2"}  # fmt: skip
    ds = _build(tmp_path, {}, tensorboard=False)
    assert ds["tensorboard"]["enabled"] is False and "wandb" not in ds


@pytest.mark.parametrize(
    "user, words",
    [
        ([1, 2], "top level must be an object"),
        ({"optimizer": {"type": "Adam"}}, "leave out 'optimizer'"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
        ({"wandb": True}, "'wandb' must be an object"),
    ],
)
def test_unusable_files_are_refused_naming_the_file(tmp_path, user, words):
    with pytest.raises(ConfigError, match="ds.json") as e:
        _build(tmp_path, user)
    assert words in str(e.value) and e.value.key == "deepspeed.config"


_PREFETCH = r"""
import json, os, sys
import deepspeed, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from llmclip.ds_config import mark_zero3_leaves

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512)
layer = sum(p.numel() for p in LlamaForCausalLM(cfg).model.layers[0].parameters())
out = {"layer": layer}
for partitioned in (False, True):
    zero = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    if partitioned:  # loading under zero.Init, as from_pretrained does under HfDeepSpeedConfig
        with deepspeed.zero.Init(config_dict_or_path=zero):
            lm = LlamaForCausalLM(cfg)
    else:
        lm = LlamaForCausalLM(cfg)
    model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = sum(p.numel() for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n)
    for bucket in (1000, 10**9, 0):
        ds = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": bucket}}
        assert mark_zero3_leaves(model, "layer", ds) == 2
        out[f"{partitioned}-{bucket}"] = ds["zero_optimization"]["stage3_prefetch_bucket_size"]
    out["lora"] = lora
print("RESULT " + json.dumps(out))
"""


def test_layer_leaves_prefetch_a_whole_layer(tmp_path):
    # ZeRO-3 prefetches parameters up to stage3_prefetch_bucket_size; with decoder layers as fetch
    # units a bucket smaller than a layer leaves most of each layer to be gathered when it starts.
    # The bucket is raised to the largest layer (a larger one is kept, 0 = prefetch off is kept),
    # counted right also when loading already partitioned the weights (their .numel() is then 0).
    import subprocess
    import sys

    from llmclip.distributed import free_port

    script = tmp_path / "prefetch.py"
    script.write_text(_PREFETCH, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True,
                         timeout=300)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    whole = out["layer"] + out["lora"]
    assert whole > 1000
    for partitioned in (False, True):
        assert out[f"{partitioned}-1000"] == whole
        assert out[f"{partitioned}-{10**9}"] == 10**9
        assert out[f"{partitioned}-0"] == 0
