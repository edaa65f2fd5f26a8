"""``llmclip.distributed.exit_process``: the exit every entry point (train.py, selftest, the CLI)
takes, so a rank that finished its work ends with its own exit code, its ``atexit`` work done and its
output flushed, whether or not it holds a process group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import atexit, sys
from pathlib import Path
import torch.distributed as dist
from llmclip.distributed import exit_process

marker, group = Path(sys.argv[1]), sys.argv[2] == "group"
if group:
    dist.init_process_group("gloo", init_method=f"file://{marker}.store", rank=0, world_size=1)
atexit.register(marker.write_text, "atexit ran")
sys.stdout.write("unflushed line without a newline")
exit_process(7)
"""


@pytest.mark.parametrize("group", ["group", "none"])
def test_exit_code_atexit_and_output_survive(tmp_path: Path, group: str) -> None:
    marker = tmp_path / "marker"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(marker), group], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "unflushed line without a newline"
    assert marker.read_text() == "atexit ran"
