"""Batches in the consumer (a learner rank, a rollout worker, the context fill): decoded rows of
the stream (stream.py) grouped by bucket, collated to tensors. Plain Python and torch, no Ray.

    iter_batches(data, batch_size, seed)   (images, captions, ids) batches, one bucket each
    collate(rows)                          rows of one bucket -> (images, captions, ids)
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch


def to_image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or float (3, H, W) in [-1, 1] -> float32 (3, H, W) in [-1, 1]."""
    import torch
    if pixels.dtype == np.uint8:
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0  # a writable copy
    return torch.as_tensor(pixels, dtype=torch.float32)


def collate(rows: list[dict]) -> tuple[torch.Tensor, list[str], list[str]]:
    """Rows of one bucket -> (images (B, 3, H, W) in [-1, 1], captions, ids)."""
    import torch
    images = [to_image_tensor(r["pixels"]) for r in rows]
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) != 1:
        raise ValueError(f"a batch must share one bucket, got shapes {sorted(shapes)}")
    return torch.stack(images), [str(r["caption"]) for r in rows], [str(r["id"]) for r in rows]


class BucketBatcher:
    """Groups rows by (height, width); hands out a full batch as soon as a bucket has one."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.pending: dict[tuple[int, int], list[dict]] = defaultdict(list)

    def add(self, row: dict) -> list[dict] | None:
        key = (int(row["height"]), int(row["width"]))
        self.pending[key].append(row)
        if len(self.pending[key]) == self.batch_size:
            return self.pending.pop(key)
        return None

    def leftovers(self) -> list[list[dict]]:
        out = [rows for _, rows in sorted(self.pending.items())]
        self.pending.clear()
        return out


def shuffled(rows: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """A local shuffle buffer: yields rows in a seeded random order within a window."""
    buffer = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def iter_batches(
    data: Any,
    batch_size: int,
    seed: int = 0,
    epochs: int | None = None,
    shuffle_buffer: int = 64,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, list[str], list[str]]]:
    """(images (B, 3, H, W) in [-1, 1], captions, ids) batches, every image of a batch in one bucket.

    `data`: a Ray Dataset of decoded rows, a DataIterator (dataset.streaming_split(n)[i]
    or ray.train.get_dataset_shard), or any iterable of decoded rows. epochs=None repeats
    forever and carries part-filled buckets over to the next epoch; with a finite number
    the part-filled buckets come last as smaller batches unless drop_last.
    """
    rng = random.Random(seed)
    batcher = BucketBatcher(batch_size)
    epoch, empty_epochs = 0, 0
    while epochs is None or epoch < epochs:
        rows = data.iter_rows() if hasattr(data, "iter_rows") else iter(data)
        if shuffle_buffer > 1:
            rows = shuffled(rows, shuffle_buffer, rng)
        seen = 0
        for row in rows:
            seen += 1
            full = batcher.add(row)
            if full is not None:
                yield collate(full)
        epoch += 1
        empty_epochs = 0 if seen else empty_epochs + 1
        if empty_epochs >= 3:
            raise RuntimeError(
                "the data stream gave no usable rows for 3 epochs in a row: check the dropped counts "
                "(read_shards' stats), or give the stream more shards than consumers (--rows-per-shard)")
    if not drop_last:
        for rows in batcher.leftovers():
            yield collate(rows)
