"""llmclip: chest X-ray CLIP with an LLM report encoder."""
__version__ = "0.1.0"
