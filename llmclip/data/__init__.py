"""Data: source readers -> WebDataset shards (build, verify, stats) -> a safe distributed loader.

``sources/`` one reader per dataset, ``reports.py`` section parsing, ``phantom.py`` synthetic images,
``build.py`` the resumable shard builder, ``shards.py`` the format, ``loader.py`` the streaming loader.
"""
