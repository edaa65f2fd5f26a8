"""llmclip: chest X-ray CLIP with an LLM report encoder."""
__version__ = "0.1.0"


def load(run: str, device: str = "cpu", encoder: str | None = None):
    """``model, preprocess`` of a trained stage-2 run (``RUN`` or ``RUN/final``), open_clip style:
    ``model`` an ``nn.Module`` with ``encode_image``, ``encode_text(list[str])`` and
    ``logit_scale`` (log of the multiplier), ``preprocess`` PIL image -> tensor, the training
    transform (see ``llmclip.api``). Imported lazily: ``import llmclip`` stays light."""
    from llmclip.api import load as _load

    return _load(run, device=device, encoder=encoder)
