"""Hostile configs: every field of every training config class (Stage1Config, Stage2Config and every
nested section) gets wrong types and out-of-range values (hypothesis). Always a ``ConfigError`` naming
the field, never another exception; through ``llmclip/train.py`` exit code 2 and one line, no
traceback."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from fault_tools import PYTHON, REPO, TRAIN, rank_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmclip.clip.stage2 import Stage2Config
from llmclip.config import ConfigError, apply_overrides, from_dict, load_config, validate
from llmclip.text.stage1_config import Stage1Config

CLASSES = {"stage1": Stage1Config, "stage2": Stage2Config}
SIGNED_INTS = {"run.seed", "model.tiny.seed"}  # seeds may be negative; every other int counts or sizes


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, tp))
    return out


FIELDS = [(name, path, tp) for name, cls in CLASSES.items() for path, tp in leaf_fields(cls)]


def base(name: str, tmp: Path) -> dict[str, Any]:
    """The smallest valid YAML of each stage (every other field keeps its default)."""
    ds = {"config": str(REPO / "ds_configs" / "cpu_zero2.json")}
    if name == "stage1":
        return {"stage": 1, "deepspeed": ds}
    cache = tmp / "cache"
    cache.mkdir(exist_ok=True)
    return {"stage": 2, "data": {"shards": "shards/x:train", "cache": str(cache)}, "deepspeed": ds}


def put(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = data
    for part in path.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[path.split(".")[-1]] = value
    return data


_scalars = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none(),
                     st.floats(allow_nan=False, allow_infinity=False, width=32))


def wrong_type(tp: Any) -> st.SearchStrategy:
    """Values of the wrong type for annotation ``tp`` (YAML-representable)."""
    lists = st.lists(_scalars, max_size=3)
    maps = st.dictionaries(st.text(max_size=4), _scalars, max_size=3)
    non_int_floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    origin = get_origin(tp)
    if tp is int:
        return st.one_of(st.text(max_size=6), non_int_floats, st.booleans(), st.none(), lists, maps)
    if tp is float:
        return st.one_of(st.text(max_size=6), st.booleans(), st.none(), lists, maps)
    if tp is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), lists, maps)
    if tp is bool:
        return st.one_of(st.integers(), st.text(max_size=6), st.floats(allow_nan=False), st.none(), lists, maps)
    if origin is Literal:
        choices = get_args(tp)
        return st.one_of(st.text(max_size=12).filter(lambda s: s not in choices), st.integers(), st.none(),
                         lists)
    if origin is list:
        item = get_args(tp)[0]
        bad_item = st.integers() if item is str else st.text(max_size=4)
        return st.one_of(st.text(max_size=6), st.integers(), maps, st.lists(bad_item, min_size=1, max_size=3))
    if origin is dict:
        value = get_args(tp)[1]
        bad = [st.text(max_size=6), st.integers(), lists]
        if value is str:
            bad.append(st.dictionaries(st.text(max_size=4), st.integers(), min_size=1, max_size=2))
        return st.one_of(*bad)
    if origin in (typing.Union, types.UnionType):  # int | None
        return st.one_of(st.text(max_size=6), non_int_floats, st.booleans(), lists, maps)
    raise AssertionError(f"no strategy for {tp}")


def out_of_range(path: str, tp: Any) -> st.SearchStrategy | None:
    """Values of the right type that no field accepts: NaN/Inf, negative sizes, beyond int64."""
    if tp is float:
        return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]),
                         st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
    if tp is int or get_origin(tp) in (typing.Union, types.UnionType):
        huge = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1))
        return huge if path in SIGNED_INTS else st.one_of(huge, st.integers(max_value=-1))
    if get_origin(tp) is list and get_args(tp)[0] is float:
        return st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=3)
    return None


def assert_names_field(err: ConfigError, path: str) -> None:
    """The message names the field: its dotted path, or (a cross-field check) its section and name."""
    msg = str(err)
    section, _, leaf = path.rpartition(".")
    assert path in msg or (section in msg and leaf in msg), f"{path} not named in: {msg}"


@pytest.mark.parametrize("name,path,tp", FIELDS, ids=[f"{n}:{p}" for n, p, _ in FIELDS])
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_field_refuses_wrong_types_and_out_of_range_values(name, path, tp, data, tmp_path):
    bad = out_of_range(path, tp)
    strategy = wrong_type(tp) if bad is None else st.one_of(wrong_type(tp), bad)
    value = data.draw(strategy, label=path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(put(base(name, tmp_path), path, value)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(CLASSES[name], cfg)
    assert_names_field(info.value, path)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_set_overrides_of_random_fields_fail_cleanly(data, tmp_path):
    """``--set key=text``: any text for any field either loads a valid config or raises ConfigError
    naming the key (never another exception); unknown keys name the closest valid one."""
    name, path, _ = data.draw(st.sampled_from(FIELDS), label="field")
    raw = data.draw(st.one_of(st.text(max_size=10), st.sampled_from(
        [".nan", ".inf", "-.inf", "-1", "1e999", "[1, 2]", "{a: 1}", "null", "~", "true", "'x'", "99999999999999999999"])),
        label="value")
    typo = data.draw(st.booleans(), label="typo")
    key = path + ("x" if typo else "")
    try:
        cfg = from_dict(CLASSES[name], apply_overrides(base(name, tmp_path), [f"{key}={raw}"]))
        validate(cfg)
    except ConfigError as e:
        if typo:  # an unknown key, or a value that is not YAML: either way the key is named
            assert key in str(e), str(e)
        else:
            assert_names_field(e, path)
    else:
        assert not typo, f"unknown key {key} was accepted"


CLI_CASES = [
    # (stage, YAML edits, --set overrides, field that must be named)
    ("stage1", {"optim": {"lr": "fast"}}, [], "optim.lr"),
    ("stage1", {}, ["model.tiny.num_attention_heads=0"], "model.tiny.num_attention_heads"),
    ("stage2", {}, ["loss.soft_labels.temperature=.nan"], "loss.soft_labels.temperature"),
]


def test_train_entry_exits_2_with_one_line_naming_the_field(tmp_path):
    """The real entry point (as the deepspeed launcher or srun starts it), in parallel processes."""
    procs = []
    for i, (name, edits, sets, field) in enumerate(CLI_CASES):
        data = base(name, tmp_path)
        for section, values in edits.items():
            data.setdefault(section, {}).update(values)
        cfg = tmp_path / f"{i}.yaml"
        cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
        cmd = [PYTHON, str(TRAIN), "--config", str(cfg)] + [a for s in sets for a in ("--set", s)]
        procs.append((field, subprocess.Popen(cmd, env=rank_env(), cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
    for field, p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, (field, out[-2000:], err[-2000:])
        lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln]
        assert "Traceback" not in err, err[-3000:]
        assert len(lines) == 1 and lines[0].startswith("llmclip train: config error: "), err[-2000:]
        assert field in lines[0], lines[0]
