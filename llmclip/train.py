"""DeepSpeed entry point for both training stages.

    deepspeed --num_gpus 2 llmclip/train.py --config configs/stage1/demo.yaml [--set a.b=v ...]

The YAML's ``stage:`` picks the trainer from ``STAGES``. The config is read, type-checked and
validated before anything heavy is imported; a bad config exits with code 2 and one line naming the
key, on every rank, before the process group or a model is touched.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `llmclip` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmclip.config import EXIT_CONFIG, ConfigError, apply_overrides, from_dict, read_yaml, validate

# stage -> (module with the trainer, its config class name, its run function name)
STAGES: dict[int, tuple[str, str, str]] = {
    1: ("llmclip.text.stage1", "Stage1Config", "run"),
    2: ("llmclip.clip.trainer", "Stage2Config", "run"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llmclip training (stage 1 or 2, chosen by the YAML)")
    p.add_argument("--config", required=True, help="recipe YAML with `stage: 1|2`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load(path: str, overrides: list[str]):
    """(config object, run function) for the stage named in the YAML."""
    data = apply_overrides(read_yaml(path), overrides)
    stage = data.get("stage")
    if stage not in STAGES:
        known = ", ".join(str(s) for s in sorted(STAGES))
        raise ConfigError(f"must be one of {known}, got {stage!r}", "stage")
    mod_name, cls_name, fn_name = STAGES[stage]
    mod = importlib.import_module(mod_name)
    cfg = from_dict(getattr(mod, cls_name), data)
    validate(cfg)
    return cfg, getattr(mod, fn_name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, run = load(args.config, args.overrides)
        rc = run(cfg)
        return rc if isinstance(rc, int) else 0
    except ConfigError as e:
        print(f"llmclip train: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    from llmclip.distributed import exit_process

    exit_process(main())
