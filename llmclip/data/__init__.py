"""Data: source readers -> WebDataset shards (build, verify, stats) -> a safe distributed loader.

``sources/`` one reader per dataset, ``reports.py`` section parsing, ``phantom_spec.py`` what a
synthetic image shows and ``phantom.py`` how it is drawn, ``build.py`` the resumable shard builder
(``build_options.py`` its options, ``build_worker.py`` per-record work, ``shard_writer.py`` the tar
writer), ``shards.py`` the format, ``loader.py`` the streaming loader.
"""
