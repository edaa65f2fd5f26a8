"""The embedding cache: one fp16 sidecar of stage-1 embeddings per shard, keyed and fingerprinted.

``reader`` (the format, ``EmbeddingCache``: what stage 2 reads), ``build`` (``build_cache``: the
frozen encoder over every report, distributed and resumable), ``commands`` (``llmclip cache
build | verify``). The reader's public names are re-exported here.
"""

from llmclip.cache.reader import (
    DTYPES,
    FORMAT,
    META,
    CacheIdentity,
    CacheMismatch,
    EmbeddingCache,
    emb_path,
    keys_path,
    load_rows,
    read_meta,
    read_sidecar_keys,
    shard_keys,
    shard_name,
    sidecar_names,
    sidecar_state,
    write_meta,
    write_sidecar,
)

__all__ = [
    "DTYPES", "FORMAT", "META", "CacheIdentity", "CacheMismatch", "EmbeddingCache", "emb_path",
    "keys_path", "load_rows", "read_meta", "read_sidecar_keys", "shard_keys", "shard_name",
    "sidecar_names", "sidecar_state", "write_meta", "write_sidecar",
]
