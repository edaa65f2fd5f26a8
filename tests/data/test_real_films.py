"""16 real paediatric chest films (``llmclip assets``: pneumonia-films, Kermany et al. 2018, CC BY 4.0)
through the whole inference path: csv source -> shards -> ``preprocess`` on their real sizes and
aspect ratios -> binary zero-shot pneumonia vs normal, through ``llmclip.load`` and through
``llmclip eval``, which must agree.

The model is the tiny test run, trained on 64 px images rendered from report text: on real films it
is expected near chance. The figure is printed with its interval (run with ``-s`` to see it).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from PIL import Image

import llmclip
from llmclip.assets import pneumonia_films
from llmclip.clip.batching import unbatch
from llmclip.data.build import build
from llmclip.data.build_options import BuildOptions
from llmclip.data.loader import make_loader
from llmclip.eval.commands import evaluate
from llmclip.eval.probe import binary_zero_shot
from llmclip.eval.prompts import PROMPTS
from llmclip.eval.stats import fmt_ci


def test_real_films_shards_preprocess_and_zero_shot(stage2_runs, tmp_path):
    films = pneumonia_films()  # extracted once into the asset cache; the error says how to fetch
    rows = list(csv.DictReader(open(films / "films.csv", encoding="utf-8")))
    sizes = {r["key"]: Image.open(films / r["image"]).size for r in rows}
    assert len(rows) == 16 and sum(int(r["Pneumonia"]) for r in rows) == 8
    assert all(w != h and min(w, h) >= 592 for w, h in sizes.values())  # real, non-square films

    shards = tmp_path / "films"
    build(BuildOptions(source="csv", root=str(films / "films.csv"), out=str(shards), workers=1), progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["test"] == 16 and manifest["synthetic_images"] is False
    assert manifest["label_sources"] == {"csv": 16}

    model, preprocess = llmclip.load(stage2_runs["full"])
    loader = make_loader(f"{shards}:test", kind="image", batch_size=16, image_size=model.image_size,
                         num_workers=0, shuffle=False)
    samples = [s for b in loader for s in unbatch(b)]
    assert [s["key"] for s in samples] == [f"csv-{r['key']}" for r in rows]
    # The original files, opened with PIL, give exactly the tensors training would have fed.
    x = torch.stack([preprocess(Image.open(films / r["image"])) for r in rows])
    trained = model.model.preprocess(torch.stack([torch.as_tensor(s["image"]) for s in samples]))
    torch.testing.assert_close(x, trained, rtol=0, atol=0)

    y = np.array([s["meta"]["labels"]["Pneumonia"] for s in samples])
    assert y.tolist() == [int(r["Pneumonia"]) for r in rows]
    prompts = PROMPTS["Pneumonia"]
    api = binary_zero_shot(model.encode_image(x), y, model.encode_text(prompts["positive"]),
                           model.encode_text(prompts["negative"]))
    assert api["n"] == 16 and api["positives"] == 8 and api["lo"] <= api["value"] <= api["hi"]

    # The same figure from `llmclip eval` (shard loader, its own text path; the run's training
    # cache holds other images under the same shard name and must not be used for these).
    m = evaluate(str(stage2_runs["full"]), f"{shards}:test", tmp_path / "eval", probe_shards="none",
                 num_workers=0)
    assert m["n_images"] == 16 and m["report_embeddings"] == "online"
    ev = m["binary"]["Pneumonia"]
    for k in ("value", "lo", "hi", "n", "positives", "negatives"):
        assert ev[k] == api[k] if k in ("n", "positives", "negatives") else abs(ev[k] - api[k]) < 1e-9, k
    print(f"\nreal films, pneumonia vs normal zero-shot AUROC (tiny test run): {fmt_ci(api, pct=False, digits=3)}")
