"""llmclip: chest X-ray CLIP with an LLM report encoder."""
__version__ = "0.1.0"


def load(run: str, device: str = "cpu", encoder: str | None = None):
    """A trained stage-2 model (``RUN`` or ``RUN/final``): ``encode_image``, ``encode_text``,
    ``preprocess`` (see ``llmclip.clip.inference``). Imported lazily: ``import llmclip`` stays light."""
    from llmclip.clip.inference import load as _load

    return _load(run, device=device, encoder=encoder)
