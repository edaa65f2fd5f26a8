"""The config machinery: strict keys, types, overrides and validation, exit code 2 from the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from llmclip.config import (
    ConfigError,
    DeepSpeedSection,
    OptimConfig,
    RunConfig,
    apply_overrides,
    load_config,
)


@dataclasses.dataclass
class Model:
    name: str = "tiny"
    """model name"""
    pooling: Literal["mean", "last_token"] = "mean"
    """pooling"""
    layers: int | None = None
    """optional layer count"""


@dataclasses.dataclass
class Top:
    model: Model = dataclasses.field(default_factory=Model)
    """model section"""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """optimizer section"""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """run section"""


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_nested_yaml_and_scientific_floats(tmp_path):
    cfg = load_config(Top, _write(tmp_path, "model:\n  pooling: last_token\noptim:\n  lr: 3e-4\n"))
    assert cfg.model.pooling == "last_token"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Top, _write(tmp_path, "optim:\n  lrr: 0.1\n"))
    assert "optim.lrr" in str(e.value) and "did you mean 'lr'" in str(e.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("optim:\n  max_steps: ten\n", "optim.max_steps"),
        ("optim:\n  max_steps: 1.5\n", "optim.max_steps"),
        ("run:\n  resume: 'yes'\n", "run.resume"),
        ("model:\n  pooling: cls\n", "model.pooling"),
        ("model: 3\n", "model"),
        ("optim:\n  betas: [0.9]\n", "optim.betas"),
        ("optim:\n  warmup_steps: 500\n  max_steps: 10\n", "optim.warmup_steps"),
        ("optim:\n  lr: -1\n", "optim.lr"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(Top, _write(tmp_path, text))
    assert key in str(e.value)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(Top, _write(tmp_path, ""), ["optim.lr=1e-3", "model.layers=4", "run.resume=false"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.model.layers == 4 and cfg.run.resume is False
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Top, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Top, _write(tmp_path, "- 1\n- 2\n"))


def test_deepspeed_section_requires_existing_json(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.config"):
        @dataclasses.dataclass
        class C:
            deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)

        load_config(C, _write(tmp_path, f"deepspeed:\n  config: {tmp_path}/missing.json\n"))


def test_cli_exit_code_2_on_unknown_command_args():
    r = subprocess.run([sys.executable, "-m", "llmclip.cli", "assets", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2


def test_every_command_group_imports():
    import importlib

    from llmclip.cli import COMMANDS

    for module in COMMANDS.values():
        assert callable(importlib.import_module(module).register), module


def test_stage2_ablation_recipes_differ_from_the_demo_only_in_their_losses():
    """The ablation table compares losses (and the graph stream that one of them needs): every other
    field must equal configs/stage2/demo.yaml."""
    from pathlib import Path

    from llmclip.config import read_yaml

    repo = Path(__file__).resolve().parents[2]
    demo = read_yaml(repo / "configs/stage2/demo.yaml")
    names = sorted(p.stem for p in (repo / "configs/stage2/ablations").glob("*.yaml"))
    assert {"baseline", "full"} <= set(names)
    for name in names:
        recipe = read_yaml(repo / f"configs/stage2/ablations/{name}.yaml")
        for section in set(demo) | set(recipe):
            if section in ("loss", "run"):
                continue
            if section == "model":
                strip = lambda m: {k: v for k, v in m.items() if k != "graph"}  # noqa: E731
                assert strip(recipe["model"]) == strip(demo["model"]), name
                continue
            assert recipe.get(section) == demo.get(section), (name, section)
        assert {k: v for k, v in recipe["run"].items() if k != "out_dir"} == {
            k: v for k, v in demo["run"].items() if k != "out_dir"
        }, name
    full = read_yaml(repo / "configs/stage2/ablations/full.yaml")
    assert full["loss"] == demo["loss"]


@pytest.mark.parametrize("flags, found", [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
    ("flags\t\t: fpu sse2 avx2 avx512f", None),
    ("model name\t: no flags line", None),
])
def test_bf16_matmul_flag_reads_the_cpuinfo_flags(flags, found):
    from llmclip.precision import bf16_matmul_flag

    assert bf16_matmul_flag(f"processor\t: 0\n{flags}\n") == found


def test_auto_precision_follows_the_hardware():
    from llmclip.precision import cpu_bf16_matmul, resolve_precision

    assert resolve_precision("auto", cuda=True) == "bf16"
    assert resolve_precision("fp32", cuda=True) == "fp32"
    cpu = "bf16-autocast" if cpu_bf16_matmul() else "fp32"
    assert resolve_precision("auto", cuda=False) == cpu


@pytest.mark.parametrize("flag, want", [("amx_bf16", "bf16"), ("avx512_bf16", "bf16"), (None, "fp32")])
def test_inference_takes_bf16_weights_wherever_the_hardware_has_bf16_matmuls(monkeypatch, flag, want):
    import llmclip.precision as P

    monkeypatch.setattr(P, "cpu_bf16_matmul", lambda: flag)
    assert P.inference_precision("auto", cuda=False) == want
    assert P.inference_precision("auto", cuda=True) == "bf16"
    assert P.inference_precision("fp32", cuda=True) == "fp32"
    assert P.inference_precision("bf16", cuda=False) == "bf16"
    assert P.resolve_precision("auto", cuda=False) == ("bf16-autocast" if flag else "fp32")  # training
