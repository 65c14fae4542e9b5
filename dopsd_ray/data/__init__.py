"""Data: image-text sources -> parquet shards (shards.py) -> Ray Data stream of bucketed
batches (stream.py); the bundled sample set (sample.py).

stream.py imports Ray; shards.py and sample.py do not, so preparing data needs no cluster.
"""

from .shards import COLUMNS, REASONS, SCHEMA, Summary, list_sources, prepare_shards, write_shards

__all__ = ["COLUMNS", "REASONS", "SCHEMA", "Summary", "list_sources", "prepare_shards", "write_shards"]
