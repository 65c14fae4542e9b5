"""Shards -> decoded, bucketed training batches with Ray Data.

    dataset, stats = read_shards("s3://bucket/shards/", StreamSpec(pixel_budget=1024 * 1024))
    splits = dataset.streaming_split(n)                 # one DataIterator per rollout worker
    for images, captions, ids in iter_batches(splits[i], batch_size=4):
        ...                                             # images: (B, 3, H, W) in [-1, 1]
    stats.as_dict()   # {"rows_read", "rows_kept", "dropped": {reason: n}, "examples": {reason: [ids]}}

Sources: parquet shards written by jobs/prepare_data.py (columns id, image, captions;
a directory, files, a list, or s3:// URIs), webdataset tars (jpg/jpeg/png/webp + txt,
one caption per line), or, local and read into memory (small sets such as the bundled
sample; use prepare_data for anything big), whatever prepare_data reads (data/shards.py
list_sources): a folder of images + .txt captions, a .jsonl, or a .csv / .parquet table
whose image and caption columns StreamSpec names (data.image_column, data.caption_column).
A parquet file with exactly the columns id, image, captions is a shard; any other is a
table. A table lacking a named column fails before any Ray work, listing its columns.

One decoded row (the map stage's output, one per usable shard row):
    {"id": str, "pixels": uint8 (H, W, 3) or float32 (3, H, W) in [-1, 1],
     "height": int, "width": int, "caption": str}
H x W is an aspect-ratio bucket: sides are multiples of `multiple`, the area is near
`pixel_budget`, the aspect ratio at most `max_aspect_ratio`; each image goes to the
bucket of nearest aspect ratio, resized to cover it and center-cropped.

`caption_template` (data.caption_template, e.g. "photo of sks, {caption}") is applied
to the picked caption in decode_row, the one place: every training row and the
take_validation pairs shown in sample grids carry it, exactly once.

Rows the map stage cannot use (undecodable, empty or too large images; missing, empty
or non-string captions) are dropped, never fatal, and counted per reason in a small
DropCounter actor that every map task reports to; `stats.as_dict()` reads it at any
time. Counts accumulate over every pass of the data (each epoch decodes again).
A shard whose columns are not id, image, captions (typed string, binary, list<string>)
is a setup error: it fails at once, naming the expected columns. An image is checked by
its header's pixel count before it is decoded, so a decompression bomb (a small file that
would decode to gigabytes) is dropped as "too_large" without being decoded.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from PIL import Image, ImageOps

from ..config import check_caption_template
from ..nodes import on_driver_node
from ..storage import is_uri, local_copy
from .batches import collate
from .shards import (
    COLUMNS, DEFAULT_MAX_PIXELS, EXAMPLES_PER_REASON, IMAGE_EXTENSIONS, DropCounter, Source, clean_captions,
    is_caption_file, list_sources, load_row, open_image,
)

if TYPE_CHECKING:
    import torch  # imported where batches are built (the consumer): map workers stay light

PARQUET_EXTENSIONS = (".parquet",)
TAR_EXTENSIONS = (".tar",)
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class StreamSpec:
    pixel_budget: int = 1024 * 1024  # target area of a bucket, in pixels
    multiple: int = 16  # bucket sides are multiples of this (the family's pixel_multiple)
    max_aspect_ratio: float = 2.0  # long side / short side of the most extreme bucket
    caption: str = "random"  # "random": one caption per row, seeded by (seed, id); "first"
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger source images are dropped as "too_large"
    pixels: str = "uint8"  # "uint8": (H, W, 3) uint8; "float": (3, H, W) float32 in [-1, 1]
    rows_per_block: int = 16  # rows per Ray block and map call: bounds decoded block size, lets splits share
    shuffle_files: bool = True  # shard order reshuffled every epoch (seeded)
    caption_template: str | None = None  # e.g. "photo of sks, {caption}"; None: captions as they are
    image_column: str = "image"  # a .csv / .parquet table's (or a .jsonl's) image column
    caption_column: str = "caption"  # ... and its caption column

    def __post_init__(self):
        if self.caption_template is not None:
            check_caption_template(self.caption_template)
        if self.caption not in ("random", "first"):
            raise ValueError(f"caption must be 'random' or 'first', got {self.caption!r}")
        if self.pixels not in ("uint8", "float"):
            raise ValueError(f"pixels must be 'uint8' or 'float', got {self.pixels!r}")
        if self.multiple < 1 or self.pixel_budget < self.multiple**2:
            raise ValueError(f"pixel_budget {self.pixel_budget} is below one {self.multiple}x{self.multiple} bucket")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    @classmethod
    def from_config(cls, cfg, multiple: int = 16) -> "StreamSpec":
        """From the typed Config (data section + train.seed); `multiple`: the family's pixel_multiple."""
        d = cfg.data
        return cls(pixel_budget=d.pixel_budget, multiple=multiple, max_aspect_ratio=d.max_aspect_ratio,
                   caption=d.caption, seed=cfg.train.seed, caption_template=d.caption_template,
                   image_column=d.image_column, caption_column=d.caption_column)


# -- buckets and the per-row decode (plain functions, no Ray) ----------------------------
def make_buckets(pixel_budget: int, multiple: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """(height, width) buckets: sides multiples of `multiple`, area nearest pixel_budget."""
    buckets = set()
    for width in range(multiple, pixel_budget // multiple + 1, multiple):
        height = max(multiple, round(pixel_budget / width / multiple) * multiple)
        if max(width, height) / min(width, height) <= max_aspect_ratio + 1e-9:
            buckets |= {(height, width), (width, height)}  # portrait and landscape alike
    return sorted(buckets)


def choose_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to height x width's."""
    ratio = np.log(width / height)
    return min(buckets, key=lambda b: abs(np.log(b[1] / b[0]) - ratio))


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF-rotated RGB; transparent pixels become white, not black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket, then center-crop to exactly (height, width)."""
    height, width = bucket
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def pick_caption(captions: list[str], mode: str, seed: int, id_: str) -> str:
    if mode == "first" or len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}/{id_}").choice(captions)  # same pick on any worker


def decode_row(row: dict, spec: StreamSpec, buckets: list[tuple[int, int]]) -> tuple[dict | None, str | None]:
    """One shard row {id, image, captions} -> (decoded row, None) or (None, reason)."""
    captions, reason = clean_captions(row.get("captions"))
    if reason:
        return None, reason
    data = row.get("image")
    if data is None:
        return None, "missing_image"
    image, reason = open_image(data, spec.max_pixels)
    if reason:
        return None, reason
    try:
        image = to_rgb(image)
    except Exception:  # e.g. a corrupt EXIF block
        return None, "undecodable_image"
    bucket = choose_bucket(image.height, image.width, buckets)
    pixels = np.asarray(resize_to_bucket(image, bucket), dtype=np.uint8)
    if spec.pixels == "float":
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0
    id_ = str(row.get("id"))
    caption = pick_caption(captions, spec.caption, spec.seed, id_)
    if spec.caption_template is not None:  # the one place the template is applied
        caption = spec.caption_template.format(caption=caption)
    return {"id": id_, "pixels": pixels, "height": bucket[0], "width": bucket[1], "caption": caption}, None


def local_rows(path: str, spec: StreamSpec) -> list[dict]:
    """The decoded rows of a local folder, JSONL or table (data/shards.py's list_sources), read in
    this process without Ray Data (tests, the learner in one process); unusable rows are left out."""
    buckets = make_buckets(spec.pixel_budget, spec.multiple, spec.max_aspect_ratio)
    rows = (load_row(source, spec.max_pixels)[0]
            for source in list_sources(path, spec.image_column, spec.caption_column))
    return [decoded for row in rows if row is not None and (decoded := decode_row(row, spec, buckets)[0])]


# -- counting dropped rows inside Ray Data ----------------------------------------------
# Every map task reports its counts to one DropCounter actor per stream (the plain class
# lives in shards.py, which imports neither torch nor Ray Data: the actor starts fast).
class StreamStats:
    """The caller's view of a stream's DropCounter (picklable: it holds an actor handle)."""

    def __init__(self, counter):
        self.counter = counter

    def as_dict(self) -> dict:
        return ray.get(self.counter.snapshot.remote())

    def __repr__(self) -> str:
        return f"StreamStats({self.as_dict()})"


def check_columns(names: Iterable[str], where: str) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{where}: expected columns {list(COLUMNS)} (write shards with jobs/prepare_data.py), "
            f"found {list(names)}; missing {missing}")


def decode_batch(batch, spec: StreamSpec, buckets: list[tuple[int, int]], counter=None) -> dict[str, np.ndarray]:
    """The map_batches function: decode the usable rows, count and drop the others."""
    check_columns(batch.column_names, "shard batch")
    kept, dropped, examples = [], Counter(), defaultdict(list)
    for row in batch.select(list(COLUMNS)).to_pylist():
        out, reason = decode_row(row, spec, buckets)
        if out is None:
            dropped[reason] += 1
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append(str(row.get("id")))
        else:
            kept.append(out)
    if counter is not None:
        ray.get(counter.add.remote(batch.num_rows, len(kept), dict(dropped), dict(examples)))
    pixels = np.empty(len(kept), dtype=object)  # ragged: buckets differ within a batch
    for i, row in enumerate(kept):
        pixels[i] = row["pixels"]
    return {
        "id": np.array([r["id"] for r in kept], dtype=object),
        "pixels": pixels,
        "height": np.array([r["height"] for r in kept], dtype=np.int64),
        "width": np.array([r["width"] for r in kept], dtype=np.int64),
        "caption": np.array([r["caption"] for r in kept], dtype=object),
    }


# -- reading -----------------------------------------------------------------------------
def list_files(uri: str) -> list[str]:
    """Files under `uri` (a file, a directory, local or s3://...), with their scheme kept."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        prefix = uri.split("://", 1)[0] + "://"
    else:
        fs, path, prefix = pafs.LocalFileSystem(), str(Path(uri).resolve()), ""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist; make shards with jobs/prepare_data.py")
    if info.type == pafs.FileType.File:
        return [prefix + path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def check_column_types(schema: pa.Schema, where: str) -> None:
    """id: string, image: binary, captions: list of strings (large_ variants allowed)."""
    def ok(name: str, t: pa.DataType) -> bool:
        if name == "id":
            return pa.types.is_string(t) or pa.types.is_large_string(t)
        if name == "image":
            return pa.types.is_binary(t) or pa.types.is_large_binary(t)
        return ((pa.types.is_list(t) or pa.types.is_large_list(t))
                and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))

    wrong = [f"{n}: {schema.field(n).type}" for n in COLUMNS if not ok(n, schema.field(n).type)]
    if wrong:
        raise ValueError(f"{where}: expected columns {list(COLUMNS)} typed id: string, image: binary, "
                         f"captions: list<string> (write shards with jobs/prepare_data.py); found {', '.join(wrong)}")


def check_parquet_columns(files: list[str]) -> None:
    """Every local shard's footer (cheap); only the first remote one (decode_batch checks the rest)."""
    remote = any("://" in f for f in files)
    for f in files[:1] if remote else files:
        fs, path = pafs.FileSystem.from_uri(f) if "://" in f else (None, f)
        schema = pq.read_schema(path, filesystem=fs)
        check_columns(schema.names, f)
        check_column_types(schema, f)


def webdataset_sample(sample: dict) -> dict:
    """Ray's webdataset decoder hook: raw tar members -> {id, image, text}."""
    image = next((sample[k] for k in WEBDATASET_IMAGE_KEYS if sample.get(k) is not None), None)
    return {"id": str(sample["__key__"]), "image": image, "text": sample.get("txt")}


def webdataset_rows(batch: dict) -> dict:
    """{id, image, text} -> {id, image, captions}: one caption per line of the .txt."""
    captions = np.empty(len(batch["text"]), dtype=object)
    for i, text in enumerate(batch["text"]):
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig", errors="replace")
        captions[i] = text.splitlines() if isinstance(text, str) else None  # None: "missing_caption"
    return {"id": batch["id"], "image": batch["image"], "captions": captions}


def in_memory_dataset(where: str, sources: list[Source], counter, max_pixels: int) -> ray.data.Dataset:
    """A small set listed by list_sources (a folder, JSONL, CSV or parquet table), read into
    memory as shard rows; skips counted once."""
    rows, dropped, examples = [], Counter(), defaultdict(list)
    for source in sources:
        row, reason = load_row(source, max_pixels)
        if row is None:
            dropped[reason] += 1
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append(str(source.image_path or source.id))
        else:
            rows.append(row)
    ray.get(counter.add.remote(sum(dropped.values()), 0, dict(dropped), dict(examples)))
    if not rows:
        raise ValueError(f"{where}: no usable image + caption pairs (skipped: {dict(dropped)})")
    return ray.data.from_items(rows, override_num_blocks=min(len(rows), 8))


def small_set_copy(uri: str) -> str:
    """`uri` as it is, unless it is a small set on an object store, read into memory like a local
    one (a folder of images + .txt, a .jsonl / .csv / parquet table): then a copy on this node (a
    table's whole folder, where its relative image paths point)."""
    if not is_uri(uri):
        return uri
    files = list_files(uri)
    if any(f.lower().endswith(PARQUET_EXTENSIONS + TAR_EXTENSIONS) for f in files) and not (
            files == [uri] and uri.lower().endswith(PARQUET_EXTENSIONS) and not is_shard(uri)):
        return uri  # shards: streamed from the store
    if files == [uri]:  # one file: a table whose images sit beside it
        folder, name = uri.rstrip("/").rsplit("/", 1)
        return str(Path(local_copy(folder)) / name)
    return local_copy(uri) if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files) else uri


def is_shard(uri: str) -> bool:
    fs, path = pafs.FileSystem.from_uri(uri)
    return set(pq.read_schema(path, filesystem=fs).names) == set(COLUMNS)


def read_shards(uri: str | list[str], spec=None) -> tuple[ray.data.Dataset, StreamStats]:
    """A lazy Ray Dataset of decoded rows (see the module docstring) and its drop counts.

    `spec`: a StreamSpec, or the typed Config (StreamSpec.from_config), or None (defaults).
    """
    if spec is None:
        spec = StreamSpec()
    elif not isinstance(spec, StreamSpec):
        spec = StreamSpec.from_config(spec)
    uris = [str(u) for u in ([uri] if isinstance(uri, (str, Path)) else uri)]
    if not uris:
        raise ValueError("no data paths given")

    # 1. find the files; fail now, before any Ray work, on missing paths or wrong columns
    parquet, tars, small = [], [], []  # small: (path, its list_sources), read into memory
    for u in uris:
        u = small_set_copy(u)  # a small set on an object store: read from a copy on this node
        if "://" not in u and is_caption_file(Path(u)):  # a .jsonl, .csv or parquet table
            small.append((u, list_sources(u, spec.image_column, spec.caption_column)))
            continue
        files = list_files(u)
        found = [f for f in files if f.lower().endswith(PARQUET_EXTENSIONS + TAR_EXTENSIONS)]
        if not found and "://" not in u and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            small.append((u, list_sources(u)))  # a folder of images + .txt
        elif not found:
            raise ValueError(f"{u}: no .parquet shards, .tar webdataset files or images found "
                             "(a .jsonl, .csv or parquet table is read when named as a file)")
        parquet += [f for f in found if f.lower().endswith(PARQUET_EXTENSIONS)]
        tars += [f for f in found if f.lower().endswith(TAR_EXTENSIONS)]
    if parquet:
        check_parquet_columns(parquet)

    # 2. one lazy dataset of {id, image, captions} rows
    counter = ray.remote(DropCounter).options(**on_driver_node()).remote()  # no lost node takes it
    shuffle = ray.data.FileShuffleConfig(seed=spec.seed) if spec.shuffle_files else None
    parts = [in_memory_dataset(u, sources, counter, spec.max_pixels) for u, sources in small]
    if parquet:
        parts.append(ray.data.read_parquet(parquet, shuffle=shuffle).select_columns(list(COLUMNS)))
    if tars:
        wds = ray.data.read_webdataset(tars, decoder=webdataset_sample, shuffle=shuffle)
        parts.append(wds.map_batches(webdataset_rows, batch_format="numpy"))
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    # 3. decode + bucket; unusable rows dropped and counted
    buckets = make_buckets(spec.pixel_budget, spec.multiple, spec.max_aspect_ratio)
    # streaming (no shuffle) re-blocking: small blocks, so decoded blocks stay small and
    # streaming_split consumers share even a single small shard
    dataset = dataset.repartition(target_num_rows_per_block=spec.rows_per_block)
    dataset = dataset.map_batches(
        decode_batch, batch_size=spec.rows_per_block, batch_format="pyarrow",
        fn_kwargs={"spec": spec, "buckets": buckets, "counter": counter})
    return dataset, StreamStats(counter)


def bundled_dataset_path() -> str:
    """The bundled sample folder (data/bundled, made by python -m dopsd_ray.data.bundled)."""
    return str(REPO / "data" / "bundled")


def take_validation(dataset: ray.data.Dataset, cfg=None, count: int = 4) -> tuple[list[str], torch.Tensor] | None:
    """Up to `count` (captions, images (N, 3, H, W)) of one bucket for sample grids, or None.

    Picks the most common bucket among the first rows; `cfg`'s train.seed (when given)
    chooses which rows of that bucket.
    """
    rows = dataset.take(max(4 * count, 32))
    if not rows:
        return None
    by_bucket = defaultdict(list)
    for row in rows:
        by_bucket[int(row["height"]), int(row["width"])].append(row)
    group = max(by_bucket.values(), key=len)
    if cfg is not None and len(group) > count:
        group = random.Random(cfg.train.seed).sample(group, count)
    images, captions, _ = collate(group[:count])
    return captions, images

