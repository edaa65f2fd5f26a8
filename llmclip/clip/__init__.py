"""Stage 2: the dual tower (vision tower + adapter on cached LLM report embeddings) and its losses."""
