"""The ``llmclip`` command. Each command group lives beside the code it drives and registers itself.

A command module defines ``register(subparsers)`` which adds its sub-parser(s) and sets
``func=callable(args) -> int``. ``ConfigError`` anywhere becomes one line on stderr and exit code 2,
raised before any heavy work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmclip.config import EXIT_CONFIG, ConfigError

# Command group -> module that registers it. Imported lazily so `llmclip --help` stays fast-ish and
# a heavy import (deepspeed, transformers) only happens for the command that needs it.
COMMANDS: dict[str, str] = {
    "assets": "llmclip.assets",
    "cache": "llmclip.cache.commands",
    "shards": "llmclip.data.commands",
    "labels": "llmclip.labels.commands",
    "demo": "llmclip.demo",
    "plan": "llmclip.plan",
    "eval": "llmclip.eval.commands",
    "export": "llmclip.text.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmclip",
        description="Chest X-ray CLIP with an LLM report encoder: shards, stage 1, cache, stage 2, eval.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not e.name or not module.startswith(e.name):
                raise
            # A group whose module is absent (a partial install) is reported, not fatal for others.
            print(f"llmclip: command group '{group}' unavailable: {module} not found", file=sys.stderr)
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"llmclip: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def run() -> None:
    """The ``llmclip`` command's entry point: ``main`` and its exit code, through
    ``llmclip.distributed.exit_process`` (a rank of ``cache build`` under torchrun holds a group)."""
    from llmclip.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
