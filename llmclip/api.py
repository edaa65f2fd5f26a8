"""Use a trained stage-2 model the way open_clip's models are used:

    import llmclip
    from PIL import Image

    model, preprocess = llmclip.load("runs/demo/stage2")        # RUN or RUN/final
    image = preprocess(Image.open("film.jpg")).unsqueeze(0)      # [1, C, S, S]
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(["Right lower lobe pneumonia.", "The lungs are clear."])
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(-1)

There is no tokenizer: ``encode_text`` takes strings and runs the frozen stage-1 LLM encoder the
model was trained against (found from ``clip.json``, relative to the run, or by fingerprint beside
it: ``state.find_encoder``; a folder whose fingerprint differs from the training cache's is
refused). ``preprocess`` is the training loader's own transform (``llmclip.data.images``: grey,
shorter side to the model's size, centre crop) and normalisation (``model.normalize_pixels``, with
the statistics the run recorded), so an image is seen as in training.

Internal callers that want the module only use ``load_model``. This module sits above both
stages (it joins the stage-2 model with the stage-1 encoder), so ``llmclip.clip`` never imports the
LLM code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmclip.clip.model import CLIPModel, ModelConfig, normalize_pixels
from llmclip.config import ConfigError, from_dict


def final_dir(run: str | Path) -> Path:
    p = Path(run)
    if (p / "final" / "clip.json").is_file():
        return p / "final"
    if (p / "clip.json").is_file():
        return p
    raise ConfigError(f"{run} is not a finished stage-2 run (no final/clip.json)", "model")


class ImageTransform:
    """``preprocess``: a PIL image -> float [C, S, S], the tensor training fed the tower.

    The same steps as training, in the same code: ``images.pil_pixels`` (grey, shorter side to
    ``size``, centre crop; a JPEG opened and not yet loaded is decoded at reduced size exactly as a
    shard member) and ``model.normalize_pixels`` (``/255``, grey repeated to the tower's channels,
    ``(x - mean) / std``). Plain attributes only, so DataLoader workers can pickle it.
    """

    def __init__(self, size: int, in_chans: int, mean: list[float], std: list[float]):
        self.size, self.in_chans = int(size), int(in_chans)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        from llmclip.data.images import pil_pixels

        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess takes a PIL image, got {type(image).__name__}; a uint8 batch "
                "[B, C, S, S] from the shard loader goes to model.encode_image as it is"
            )
        grey = torch.from_numpy(pil_pixels(image, self.size).copy())[None, None]
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        # The loader hands training 3 identical channels; normalize_pixels maps them to in_chans.
        return normalize_pixels(grey.expand(1, 3, -1, -1), mean, std, self.in_chans, self.size)[0]

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, grey -> shorter side {self.size} -> centre crop, "
            f"in_chans={self.in_chans}, mean={self.mean}, std={self.std})"
        )


class CLIP(nn.Module):
    """A loaded stage-2 model: image tower, text adapter on stage-1 embeddings, temperature.

    ``logit_scale`` is the log of the similarity multiplier, as in open_clip
    (``model.logit_scale.exp()``; clamped at load to the ``max_logit_scale`` training used). The
    stage-1 LLM is loaded on first use of ``encode_text``, kept outside the module's parameters
    (its weights are not the model's), on the device the model is on then.
    """

    def __init__(
        self,
        model: CLIPModel,
        meta: dict[str, Any],
        encoder_dir: str | Path | None,
        encoder_tried: list[str] | None = None,
    ):
        super().__init__()
        self.model = model
        self.meta = meta
        self.encoder_dir = str(encoder_dir) if encoder_dir else None
        self._encoder_tried = list(encoder_tried or [])
        vision = model.cfg.vision
        self.preprocess = ImageTransform(model.image_size, vision.in_chans, vision.mean, vision.std)
        # Not a submodule: the LLM stays out of state_dict(), parameters() and .to().
        self.__dict__["_encoder"] = None
        self.eval()  # inference: dropout and drop-path off, BatchNorm on its running statistics

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings [B, embed_dim] of ``preprocess`` outputs stacked to [B, C, S, S] (or of
        a uint8 batch as the shard loader yields it). Unit length unless ``normalize=False``
        (open_clip's default is False; code that normalises again gets the same vectors)."""
        if image.dtype == torch.uint8:
            image = self.model.preprocess(image)
        m = self.model
        if normalize:
            return m.encode_image(image.to(self.device)).float()
        pixels = image.to(self.device, m.image_proj.weight.dtype)
        return m.image_proj(m.visual(pixels)).float()

    @torch.no_grad()
    def encode_text_embeddings(self, emb: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings [B, embed_dim] from stage-1 (cached) report embeddings [B, text_dim]."""
        emb = emb.to(self.device).float()
        if normalize:
            return self.model.encode_text(emb).float()
        return self.model.text_adapter(emb.to(self.model.image_proj.weight.dtype)).float()

    def text_encoder(self) -> Any:
        """The stage-1 ``LLMEncoder`` (loaded once), checked against the training cache."""
        enc = self.__dict__["_encoder"]
        if enc is not None and next(enc.parameters()).device != self.device:
            enc = None  # the model moved since: follow it
        if enc is None:
            if not self.encoder_dir:
                looked = ", ".join(self._encoder_tried[:6]) or "nothing recorded"
                raise ConfigError(
                    "no stage-1 encoder found for this model (looked at: "
                    f"{looked}); pass the encoder folder (llmclip eval --encoder DIR, or "
                    "llmclip.load(run, encoder=DIR))",
                    "encoder",
                )
            from llmclip.text.encoder import LLMEncoder

            enc = LLMEncoder.from_dir(self.encoder_dir, device=self.device, dtype=torch.float32)
            want = self.meta.get("cache_fingerprint")
            if want and enc.fingerprint != want:
                raise ConfigError(
                    f"encoder {self.encoder_dir} has fingerprint {enc.fingerprint[:16]}..., but the model "
                    f"was trained on a cache of {want[:16]}...",
                    "encoder",
                )
            self.__dict__["_encoder"] = enc
        return enc

    @torch.inference_mode()
    def embed_reports(self, texts: list[str]) -> torch.Tensor:
        """Stage-1 embeddings [B, text_dim] of texts, with the instruction the cache used."""
        if not texts:
            return torch.zeros(0, int(self.meta["text_dim"]))
        return (
            self.text_encoder()
            .encode(list(texts), instruction=self.meta.get("instruction"))
            .float()
        )

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Text embeddings [B, embed_dim] of free text (runs the stage-1 encoder online); unit
        length unless ``normalize=False``. A single string counts as a list of one."""
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_text_embeddings(self.embed_reports(list(texts)), normalize=normalize)

    def forward(
        self, image: torch.Tensor | None = None, text: list[str] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """open_clip's ``(image_features, text_features, logit_scale.exp())``."""
        img = self.encode_image(image) if image is not None else None
        txt = self.encode_text(text) if text is not None else None
        return img, txt, self.logit_scale.exp()


def load_model(run: str | Path, device: str = "cpu", encoder: str | None = None) -> CLIP:
    """The ``CLIP`` module of ``RUN/final`` (weights via safetensors, config from clip.json;
    nothing is unpickled). ``encoder``: the stage-1 folder, else found from the run."""
    from safetensors.torch import load_file

    from llmclip.clip.state import find_encoder

    d = final_dir(run)
    try:
        meta = json.loads((d / "clip.json").read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, meta["model"], prefix="model")
        text_dim, image_size = int(meta["text_dim"]), int(meta["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{d / 'clip.json'} is unreadable: {e!r}", "model") from None
    # The weights come from the run; the normalisation statistics from clip.json (the trainer wrote
    # the ones it used, the tower's own for pretrained towers, into model.vision.mean/std).
    cfg.vision.pretrained = False
    cfg.vision.stats = "config"
    model = CLIPModel(cfg, text_dim, image_size)
    try:  # a broken header or a tensor of the wrong shape: refused, naming the file
        weights = load_file(str(d / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, RuntimeError (size mismatch)
        why = " ".join(str(e).split())[:400]
        raise ConfigError(
            f"{d / 'model.safetensors'}: refused ({type(e).__name__}: {why})", "model"
        ) from None
    if missing or unexpected:
        raise ConfigError(
            f"{d / 'model.safetensors'} does not fit clip.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "model",
        )
    with torch.no_grad():  # training used min(exp(logit_scale), max): make .exp() say the same
        model.logit_scale.clamp_(max=math.log(cfg.max_logit_scale))
    tried: list[str] = []
    if encoder:
        found: Path | str | None = encoder
    else:
        found, tried = find_encoder(d, meta)
    return CLIP(model, meta, found, tried).to(device)


def load(
    run: str | Path, device: str = "cpu", encoder: str | None = None
) -> tuple[CLIP, ImageTransform]:
    """``model, preprocess`` of a finished stage-2 run, like open_clip's
    ``create_model_and_transforms`` (the model in eval mode; no tokenizer: text is strings)."""
    model = load_model(run, device=device, encoder=encoder)
    return model, model.preprocess


__all__ = ["CLIP", "ImageTransform", "final_dir", "load", "load_model"]
