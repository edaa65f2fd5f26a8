"""Use a trained stage-2 model, in the spirit of open_clip:

    import llmclip
    model = llmclip.load("runs/stage2/demo")           # RUN or RUN/final
    img = model.encode_image(model.preprocess(uint8_images))
    txt = model.encode_text(["Small left pleural effusion."])   # runs the stage-1 encoder online
    probs = (model.logit_scale * img @ txt.T).softmax(-1)

``encode_text`` loads the stage-1 encoder the model was trained against (recorded in
``clip.json``, or given) and refuses one whose fingerprint differs from the training cache's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmclip.clip.model import CLIPModel, ModelConfig
from llmclip.config import ConfigError, from_dict


def final_dir(run: str | Path) -> Path:
    p = Path(run)
    if (p / "final" / "clip.json").is_file():
        return p / "final"
    if (p / "clip.json").is_file():
        return p
    raise ConfigError(f"{run} is not a finished stage-2 run (no final/clip.json)", "model")


class CLIP:
    """A loaded stage-2 model: image tower + text adapter, and (lazily) the stage-1 encoder."""

    def __init__(
        self, model: CLIPModel, meta: dict[str, Any], encoder_dir: str | None, device: str
    ):
        self.model = model.eval()
        self.meta = meta
        self.encoder_dir = encoder_dir
        self.device = device
        self._encoder: Any = None

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale())

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised pixels at the model's size."""
        return self.model.preprocess(images)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, embed_dim] (uint8 input is preprocessed first)."""
        if pixels.dtype == torch.uint8:
            pixels = self.preprocess(pixels)
        return self.model.encode_image(pixels.to(self.device)).float()

    @torch.inference_mode()
    def encode_text_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings from stage-1 (cached) report embeddings [B, text_dim]."""
        return self.model.encode_text(emb.to(self.device).float()).float()

    def text_encoder(self) -> Any:
        """The stage-1 ``LLMEncoder`` (loaded once), checked against the training cache."""
        if self._encoder is None:
            if not self.encoder_dir:
                raise ConfigError(
                    "this model records no stage-1 encoder; pass the encoder folder "
                    "(llmclip eval --encoder DIR, or llmclip.load(run, encoder=DIR))",
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
            self._encoder = enc
        return self._encoder

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

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings of free text (runs the stage-1 encoder online)."""
        return self.encode_text_embeddings(self.embed_reports(texts))


def load(run: str | Path, device: str = "cpu", encoder: str | None = None) -> CLIP:
    """Load ``RUN/final`` (weights via safetensors, config from clip.json; nothing is unpickled)."""
    from safetensors.torch import load_file

    d = final_dir(run)
    try:
        meta = json.loads((d / "clip.json").read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, meta["model"], prefix="model")
        text_dim, image_size = int(meta["text_dim"]), int(meta["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{d / 'clip.json'} is unreadable: {e!r}", "model") from None
    cfg.vision.pretrained = False  # the weights come from the run
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
    enc = encoder or meta.get("encoder")
    return CLIP(model.to(device), meta, enc, device)
