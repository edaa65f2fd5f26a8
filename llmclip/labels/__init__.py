"""``llmclip labels``: the clinical text package (``llmclip.clinical``) applied to files: label the
reports of shards, and score the ``Labeler`` against the MeSH terms people assigned to Open-I.
It sits above both ``clinical`` (pure text) and ``data`` (the shard format and the Open-I reader)."""
