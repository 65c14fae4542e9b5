"""Image-text sources -> validated parquet shards (jobs/prepare_data.py).

Inputs (list_sources; training reads the same ones directly, see data/stream.py):
  - a folder: every image (png, jpg, jpeg, webp, bmp; subfolders too) with a same-name
    .txt next to it, one caption per line (several lines = several captions);
  - a JSONL file, one object a line: {"image": path, "caption": str} or
    {"image": path, "captions": [str, ...]} (optional "id");
  - a CSV or parquet file with named columns: the image column (default "image") and the
    caption column (default "caption"), optional "id". A CSV cell holds one caption; a
    parquet caption cell a string or a list of strings, and its image cell a path, the
    image's bytes, or a Hugging Face `datasets` image {"bytes", "path"}.
The JSONL keys are the same named columns (its "captions" list is read as well). Image
paths are relative to the JSONL / CSV / parquet file's folder, or absolute. A row's id is
its "id", else its image path without the extension, else file:row. A named column the
CSV / parquet file lacks is a setup error (check_table), raised before anything is read.

Output: shard-00000.parquet, shard-00001.parquet, ... with the columns of SCHEMA:
id (string), image (binary: the original encoded bytes, never re-encoded) and
captions (list<string>), plus summary.json. Every row is checked first (the image
decodes fully, is not empty or absurdly large, has at least one non-empty string
caption); a row that fails is skipped and counted under one of REASONS, with a few
example paths, so one bad file never stops a long conversion.

    sources = list_sources("photos/")          # cheap: paths and captions only
    sources = list_sources("pairs.csv", image_column="file", caption_column="text")
    summary = write_shards(sources, "shards/", rows_per_shard=1000)
    print(summary.format())
"""

import csv
import functools
import io
import itertools
import json
import multiprocessing
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..storage import Storage

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("captions", pa.list_(pa.string()))])
COLUMNS = tuple(SCHEMA.names)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JSONL_EXTENSIONS = (".jsonl", ".json")
TABLE_EXTENSIONS = (".csv", ".parquet")
DEFAULT_MAX_PIXELS = 8192 * 8192  # beyond this an image is "too_large" (checked before decoding)
SHARD_PATTERN = "shard-{:05d}.parquet"
EXAMPLES_PER_REASON = 5

# Why a row was skipped (here) or dropped (data/stream.py), and what that means.
REASONS = {
    "missing_image": "the image file does not exist, or the row names no image",
    "empty_image": "the image has zero bytes or zero width/height",
    "undecodable_image": "PIL cannot decode the image (corrupt, truncated, a header it refuses, or not an image)",
    "too_large": "the image has more pixels than max_pixels (read from the header, never decoded)",
    "missing_caption": "no same-name .txt next to the image, or no caption in the JSONL line / table row",
    "empty_caption": "every caption is empty or whitespace",
    "bad_caption": "a caption is not a string (or the .txt is not UTF-8)",
    "bad_json": "the JSONL line is not a JSON object",
    "duplicate_id": "the same id appears twice (the first one is kept)",
}


# -- listing -------------------------------------------------------------------------
@dataclass
class Source:
    """One candidate row before it is read: where the image is and its raw captions."""

    id: str
    image_path: Path | None
    captions: Any = None  # raw: validated by clean_captions
    problem: str | None = None  # a reason already known while listing (bad JSON, no .txt)
    image_bytes: bytes | None = None  # the image itself (a parquet cell), instead of a path


def list_sources(input_path: str | Path, image_column: str = "image", caption_column: str = "caption") -> list[Source]:
    """Candidates from a folder of images + .txt captions, or a .jsonl, .csv or .parquet file."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return folder_sources(input_path)
    suffix = input_path.suffix.lower()
    if input_path.is_file() and suffix in JSONL_EXTENSIONS:
        return jsonl_sources(input_path, image_column, caption_column)
    if input_path.is_file() and suffix in TABLE_EXTENSIONS:
        return table_sources(input_path, image_column, caption_column)
    if input_path.is_file():
        raise ValueError(f"{input_path}: expected a folder of images + .txt captions, "
                         "or a .jsonl, .csv or .parquet file")
    raise FileNotFoundError(f"{input_path} does not exist")


def is_table(path: Path) -> bool:
    """A CSV, or a parquet file that is not one of our shards (a shard has exactly the
    SCHEMA columns; any other parquet file is a table read through the named columns)."""
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in TABLE_EXTENSIONS:
        return False
    return suffix == ".csv" or set(pq.read_schema(path).names) != set(COLUMNS)


def is_caption_file(path: Path) -> bool:
    """A file that list_sources reads (a JSONL or a table), not a shard."""
    return (path.is_file() and path.suffix.lower() in JSONL_EXTENSIONS) or is_table(path)


def folder_sources(folder: Path) -> list[Source]:
    sources = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        id_ = path.relative_to(folder).with_suffix("").as_posix()
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            sources.append(Source(id_, path, problem="missing_caption"))
            continue
        try:
            lines = caption_file.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError:
            sources.append(Source(id_, path, problem="bad_caption"))
            continue
        sources.append(Source(id_, path, lines))  # clean_captions drops blank lines
    return sources


def record_source(record: dict, folder: Path, where: str, image_column: str,
                  caption_columns: tuple[str, ...]) -> Source:
    """One JSONL object or table row -> a Source. `where` (file:line) names it when it has no id."""
    image = record.get(image_column)
    if isinstance(image, dict):  # a Hugging Face `datasets` image: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    id_ = record.get("id") if isinstance(record.get("id"), str) and record["id"] else None
    if isinstance(image, str) and image:
        path = Path(image)
        source = Source(id_ or path.with_suffix("").as_posix(), path if path.is_absolute() else folder / path)
    elif isinstance(image, bytes):
        source = Source(id_ or where, None, image_bytes=image)
    else:
        return Source(id_ or where, None, problem="missing_image")
    present = [record[c] for c in caption_columns if record.get(c) is not None]
    if not present:
        source.problem = "missing_caption"
    else:  # each a string or a list; clean_captions fails anything else
        source.captions = [c for value in present for c in (value if isinstance(value, list) else [value])]
    return source


def jsonl_sources(path: Path, image_column: str = "image", caption_column: str = "caption") -> list[Source]:
    sources = []
    caption_columns = tuple(dict.fromkeys((caption_column, "captions")))  # the documented list key too
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            sources.append(Source(where, None, problem="bad_json"))
            continue
        sources.append(record_source(obj, path.parent, where, image_column, caption_columns))
    return sources


def table_columns(path: Path) -> list[str]:
    """The column names of a CSV (its header line) or a parquet file (its footer)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    return pq.read_schema(path).names


def check_table(path: Path, image_column: str, caption_column: str) -> None:
    """A CSV / parquet file must have the named columns: one line listing the ones it has."""
    columns = table_columns(path)
    for kind, name in (("image", image_column), ("caption", caption_column)):
        if name not in columns:
            raise ValueError(f"{path} has no {kind} column {name!r} (set data.{kind}_column, or --{kind}-column "
                             f"for jobs/prepare_data.py); its columns are {columns}")


def table_sources(path: Path, image_column: str = "image", caption_column: str = "caption") -> list[Source]:
    check_table(path, image_column, caption_column)
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    else:
        wanted = [image_column, caption_column] + (["id"] if "id" in table_columns(path) else [])
        rows = pq.read_table(path, columns=list(dict.fromkeys(wanted))).to_pylist()
    return [record_source(row, path.parent, f"{path}:{number}", image_column, (caption_column,))
            for number, row in enumerate(rows, start=1)]


# -- checks (shared with data/stream.py) ---------------------------------------------
def clean_captions(captions: Any) -> tuple[list[str], str | None]:
    """Stripped non-empty captions, or ([], reason). Any non-string fails the row."""
    if captions is None:
        return [], "missing_caption"
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        return [], "bad_caption"  # a caption list is required; a bare value is a schema error
    if any(not isinstance(c, str) for c in captions):
        return [], "bad_caption"
    kept = [c.strip() for c in captions if c.strip()]
    return (kept, None) if kept else ([], "empty_caption")


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Fully decoded PIL image, or (None, reason). The size is checked before decoding."""
    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels rules
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width == 0 or height == 0:
                return None, "empty_image"
            if width * height > max_pixels:
                return None, "too_large"
            image.load()  # raises on truncated / corrupt data
    except Image.DecompressionBombError:  # PIL's own hard limit, 2 * Image.MAX_IMAGE_PIXELS
        return None, "too_large"
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None, "undecodable_image"
    return image, None


def load_row(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict | None, str | None]:
    """A SCHEMA row {id, image, captions} for `source`, or (None, reason)."""
    if source.problem:
        return None, source.problem
    if source.image_bytes is None and (source.image_path is None or not source.image_path.is_file()):
        return None, "missing_image"
    captions, reason = clean_captions(source.captions)
    if reason:
        return None, reason
    data = source.image_bytes if source.image_bytes is not None else source.image_path.read_bytes()
    _, reason = open_image(data, max_pixels)
    if reason:
        return None, reason
    return {"id": source.id, "image": data, "captions": captions}, None


class DropCounter:
    """Rows read / kept / dropped per reason while streaming; a Ray actor in data/stream.py."""

    def __init__(self):
        self.read, self.kept = 0, 0
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, read: int, kept: int, dropped: dict[str, int], examples: dict[str, list[str]]) -> None:
        self.read += read
        self.kept += kept
        self.dropped.update(dropped)
        for reason, ids in examples.items():
            shown = self.examples.setdefault(reason, [])
            shown.extend(i for i in ids if i not in shown)
            del shown[EXAMPLES_PER_REASON:]

    def snapshot(self) -> dict:
        return {"rows_read": self.read, "rows_kept": self.kept, "dropped": dict(self.dropped),
                "examples": {k: list(v) for k, v in self.examples.items()}}


# -- writing -------------------------------------------------------------------------
@dataclass
class Summary:
    out_dir: str = ""
    rows_written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few paths / ids

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(example)

    def as_dict(self) -> dict:
        return {"out_dir": self.out_dir, "rows_written": self.rows_written, "shards": list(self.shards),
                "skipped": dict(self.skipped), "examples": {k: list(v) for k, v in self.examples.items()}}

    def format(self) -> str:
        lines = [f"wrote {self.rows_written} rows in {len(self.shards)} shard(s) to {self.out_dir}"]
        total = sum(self.skipped.values())
        lines.append(f"skipped {total} row(s)" + (":" if total else ""))
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<18} {count:>6}  {REASONS.get(reason, '')}")
            for example in self.examples.get(reason, []):
                lines.append(f"      e.g. {example}")
        return "\n".join(lines)


def checked(sources: Iterable[Source], max_pixels: int, workers: int = 1):
    """(source, row, reason) for every source, in order: load_row in `workers` processes when > 1
    (decoding every image to check it is the slow part of a large set)."""
    if workers <= 1:
        for source in sources:
            yield source, *load_row(source, max_pixels)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds Arrow's threads
    check, pending = functools.partial(load_row, max_pixels=max_pixels), iter(sources)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        while window := list(itertools.islice(pending, workers * 32)):  # a bounded number of rows in flight
            for source, (row, reason) in zip(window, pool.map(check, window, chunksize=4), strict=True):
                yield source, row, reason


def write_shards(
    sources: Iterable[Source],
    out_dir: str | Path,
    rows_per_shard: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    workers: int = 1,
    progress=None,
) -> Summary:
    """Check every source (in `workers` processes) and write the usable ones, in the sources'
    order, to parquet shards in out_dir (a folder, or an object-store URI such as
    s3://bucket/shards: each shard is uploaded whole as it is made). `progress`: wraps the
    checked rows (e.g. tqdm)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    store = Storage(out_dir)
    old = [n for n in store.listdir() if n.startswith("shard-") and n.endswith(".parquet")]
    if old and not overwrite:
        raise FileExistsError(f"{store.uri} already holds {len(old)} shard(s); choose another folder or overwrite")
    for name in old:
        store.remove(name)

    summary, rows, seen = Summary(out_dir=store.uri), [], set()
    results = checked(sources, max_pixels, workers)
    for source, row, reason in (progress(results) if progress else results):
        if row is not None and row["id"] in seen:
            row, reason = None, "duplicate_id"
        if row is None:
            summary.skip(reason, str(source.image_path or source.id))
            continue
        seen.add(row["id"])
        rows.append(row)
        if len(rows) == rows_per_shard:
            write_shard(rows, store, summary)
            rows = []
    if rows:
        write_shard(rows, store, summary)
    store.write("summary.json", json.dumps(summary.as_dict(), indent=2))
    return summary


def write_shard(rows: list[dict], store: Storage, summary: Summary) -> None:
    """One shard, whole or absent (a crash never leaves a half-written shard behind)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    name = SHARD_PATTERN.format(len(summary.shards))
    summary.shards.append(store.write_with(name, lambda p: pq.write_table(table, p, row_group_size=64)))  # big rows
    summary.rows_written += len(rows)


def prepare_shards(
    input_path: str | Path,
    out_dir: str | Path,
    rows_per_shard: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
) -> Summary:
    """list_sources + write_shards in one call."""
    sources = list_sources(input_path, image_column, caption_column)
    return write_shards(sources, out_dir, rows_per_shard, max_pixels, overwrite)
