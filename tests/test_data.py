"""Data path: folders / JSONL / CSV / parquet tables -> parquet shards -> Ray Data stream -> bucketed batches.

Pure checks first (no Ray); the stream tests share the module's local Ray (conftest.local_ray).
"""

import csv
import functools
import io
import json
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import re
import torch
from PIL import Image

from dopsd_ray.config import ConfigError
from dopsd_ray.recipes import load_config
from dopsd_ray.data.bundled import write_bundled
from dopsd_ray.data.shards import SCHEMA, list_sources, load_row, open_image, prepare_shards
from dopsd_ray.preflight import check_paths
from dopsd_ray.data.batches import iter_batches
from dopsd_ray.data.stream import (
    StreamSpec, choose_bucket, decode_batch, decode_row, make_buckets, read_shards,
    bundled_dataset_path, take_validation,
)

REPO = Path(__file__).resolve().parents[1]
BUDGET, MULTIPLE = 4096, 16  # 64 x 64


def png(width: int, height: int, colour=(200, 30, 30), mode="RGB", noise=False) -> bytes:
    if noise:  # incompressible, so a truncated copy really lacks pixel data
        pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new(mode, (width, height), colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, pixel_data: bytes = b"") -> bytes:
    """A PNG whose header says width x height (RGB 8-bit), with `pixel_data` as its one IDAT."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + (png_chunk(b"IDAT", pixel_data) if pixel_data else b"") + png_chunk(b"IEND", b""))


@functools.lru_cache
def bomb_png(side: int = 5000) -> bytes:
    """A decompression bomb: a valid all-black side x side PNG, ~0.3 MB that decodes to side^2 * 3 bytes."""
    deflate = zlib.compressobj(1)
    row = b"\0" * (1 + side * 3)  # filter byte + pixels
    return png_header_only(side, side, b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush())


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def write_pair(folder: Path, name: str, image: bytes | None, caption: str | None) -> None:
    path = folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if image is not None:
        path.write_bytes(image)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def read_all(out_dir: Path) -> dict[str, dict]:
    rows = {}
    for shard in sorted(out_dir.glob("shard-*.parquet")):
        table = pq.read_table(shard)
        assert table.schema.equals(SCHEMA)
        rows.update({r["id"]: r for r in table.to_pylist()})
    return rows


SIZES = {"square": (64, 64), "wide": (128, 64), "tall": (64, 128), "big": (160, 160)}  # (width, height)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    """12 images of four shapes (3 of each), 5 rows per shard -> 3 shards."""
    folder = tmp_path_factory.mktemp("images")
    for kind, (w, h) in SIZES.items():
        for i in range(3):
            write_pair(folder, f"{kind}{i}", png(w, h, (40 * i, 80, 160)), f"a {kind} picture {i}\nanother caption")
    out = tmp_path_factory.mktemp("shards")
    assert prepare_shards(folder, out, rows_per_shard=5).rows_written == 12
    return out


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    ray.data.DataContext.get_current().enable_progress_bars = False


# -- preparing shards (no Ray) -----------------------------------------------------------
def test_prepare_round_trips_a_folder(tmp_path):
    folder = tmp_path / "in"
    write_pair(folder, "a", png(64, 64), "a red square\n\n  a red block  \n")
    write_pair(folder, "sub/b", png(32, 48, (0, 255, 0)), "green")
    (folder / "c.jpg").write_bytes(jpeg(40, 30))
    (folder / "c.txt").write_text("blue jpeg")
    summary = prepare_shards(folder, tmp_path / "out", rows_per_shard=2)

    assert summary.rows_written == 3 and len(summary.shards) == 2 and not summary.skipped
    rows = read_all(tmp_path / "out")
    assert set(rows) == {"a", "sub/b", "c"}
    assert rows["a"]["image"] == (folder / "a.png").read_bytes()  # original bytes, not re-encoded
    assert rows["c"]["image"] == (folder / "c.jpg").read_bytes()
    assert rows["a"]["captions"] == ["a red square", "a red block"]
    assert rows["sub/b"]["captions"] == ["green"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_written"] == 3
    with pytest.raises(FileExistsError, match="already holds 2 shard"):
        prepare_shards(folder, tmp_path / "out")


def test_bad_rows_are_summarised_not_fatal(tmp_path):
    folder = tmp_path / "in"
    good = png(64, 64, noise=True)
    write_pair(folder, "good", good, "fine")
    write_pair(folder, "corrupt", b"\x89PNG not really an image", "x")
    write_pair(folder, "truncated", good[: len(good) // 2], "x")
    write_pair(folder, "zero_bytes", b"", "x")
    write_pair(folder, "huge", png(300, 300), "x")
    write_pair(folder, "bomb", bomb_png(), "x")
    write_pair(folder, "zero_width", png_header_only(0, 64, zlib.compress(b"\0" * 64)), "x")  # PIL refuses it
    write_pair(folder, "blank_caption", png(8, 8), "  \n\t\n")
    write_pair(folder, "no_caption", png(8, 8), None)
    summary = prepare_shards(folder, tmp_path / "out", max_pixels=200 * 200)

    assert summary.rows_written == 1 and set(read_all(tmp_path / "out")) == {"good"}
    assert dict(summary.skipped) == {"undecodable_image": 3, "empty_image": 1, "too_large": 2,
                                     "empty_caption": 1, "missing_caption": 1}
    assert any(e.endswith("truncated.png") for e in summary.examples["undecodable_image"])
    assert summary.examples["missing_caption"][0].endswith("no_caption.png")
    text = summary.format()
    for reason in summary.skipped:
        assert reason in text


def test_enormous_images_are_refused_by_pixel_count_before_decoding():
    bomb = bomb_png()  # 5000 x 5000: 0.3 MB of PNG, 75 MB of pixels
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    assert open_image(bomb, max_pixels=4096 * 4096) == (None, "too_large")
    assert open_image(png_header_only(100_000, 100_000), max_pixels=4096 * 4096) == (None, "too_large")
    assert time.perf_counter() - start < 0.5  # the header was read, the pixels never decoded
    image, reason = open_image(bomb, max_pixels=5000 * 5000)  # within the limit it decodes fully
    assert reason is None and image.size == (5000, 5000)


def test_jsonl_with_several_captions(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.png").write_bytes(png(32, 32))
    (tmp_path / "two.png").write_bytes(png(16, 48))
    lines = [
        {"image": "imgs/one.png", "captions": ["first caption", "  second caption ", "   "]},
        {"image": str(tmp_path / "two.png"), "caption": "only one", "id": "custom-id"},
        {"image": "imgs/one.png", "captions": ["dup"]},
        {"image": "imgs/one.png", "id": "x", "caption": 5},
        {"image": "imgs/missing.png", "caption": "gone"},
        {"image": "imgs/one.png", "id": "y"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{broken json\n\n"
    (tmp_path / "data.jsonl").write_text(text)
    summary = prepare_shards(tmp_path / "data.jsonl", tmp_path / "out")

    rows = read_all(tmp_path / "out")
    assert rows["imgs/one"]["captions"] == ["first caption", "second caption"]
    assert rows["custom-id"]["captions"] == ["only one"]
    assert rows["custom-id"]["image"] == (tmp_path / "two.png").read_bytes()
    assert dict(summary.skipped) == {"duplicate_id": 1, "bad_caption": 1, "missing_image": 1,
                                     "missing_caption": 1, "bad_json": 1}
    assert summary.examples["bad_json"] == [f"{tmp_path / 'data.jsonl'}:7"]


def write_tables(folder: Path) -> dict[str, tuple[Path, dict]]:
    """The same pairs as a folder, a JSONL, a CSV and two parquet tables (paths / bytes),
    each with its own bad rows; -> kind: (path, its named columns)."""
    images = {"one": png(32, 32), "sub/two": png(48, 16, (0, 255, 0))}
    for name, data in images.items():
        write_pair(folder / "pairs", name, data, {"one": "a one\nanother one", "sub/two": "a sub/two"}[name])
        write_pair(folder, name, data, None)  # the tables' images, beside them
    write_pair(folder / "pairs", "no_txt", png(8, 8), None)
    with (folder / "data.csv").open("w", newline="") as f:
        rows = [["one.png", "a one"], ["sub/two.png", "a sub/two"], ["gone.png", "x"], ["one.png", "  "]]
        csv.writer(f).writerows([["file", "text"], *rows])
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "one.png", "text": ["a one", "another one"]}, {"file": "sub/two.png", "text": "a sub/two"},
        {"file": "one.png", "id": "no-words"}]))
    pq.write_table(pa.table({"path": [str(folder / "one.png"), "sub/two.png", None],
                             "caption": ["a one", "a sub/two", "x"]}), folder / "paths.parquet")
    pq.write_table(pa.table({"id": ["one", "sub/two", "empty"], "file": list(images.values()) + [png(8, 8)],
                             "text": [["a one", "another one"], ["a sub/two"], None]}), folder / "bytes.parquet")
    named = dict(image_column="file", caption_column="text")
    return {"folder": (folder / "pairs", {}), "csv": (folder / "data.csv", named),
            "jsonl": (folder / "data.jsonl", named),
            "parquet_paths": (folder / "paths.parquet", dict(image_column="path")),
            "parquet_bytes": (folder / "bytes.parquet", named)}


def test_every_source_kind_lists_the_same_pairs_and_counts_bad_rows(tmp_path):
    expected_skips = {"folder": {"missing_caption": 1}, "csv": {"missing_image": 1, "empty_caption": 1},
                      "jsonl": {"missing_caption": 1}, "parquet_paths": {"missing_image": 1},
                      "parquet_bytes": {"missing_caption": 1}}
    for kind, (path, columns) in write_tables(tmp_path).items():
        rows, skipped = {}, {}
        for source in list_sources(path, **columns):
            row, reason = load_row(source)
            if row is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                rows[row["id"]] = row["captions"]
        one = str(tmp_path / "one") if kind == "parquet_paths" else "one"  # an absolute path's id is that path
        assert set(rows) == {one, "sub/two"}, kind
        assert rows[one][0] == "a one" and rows["sub/two"] == ["a sub/two"], (kind, rows)
        assert skipped == expected_skips[kind], kind
    # prepare_shards takes the same named columns (jobs/prepare_data.py --image-column / --caption-column)
    path, columns = write_tables(tmp_path)["csv"]
    summary = prepare_shards(path, tmp_path / "out", **columns)
    assert summary.rows_written == 2 and dict(summary.skipped) == expected_skips["csv"]
    assert read_all(tmp_path / "out")["sub/two"]["image"] == (tmp_path / "sub" / "two.png").read_bytes()


def test_a_missing_named_column_fails_listing_the_columns_the_file_has(tmp_path):
    tables = write_tables(tmp_path)
    with pytest.raises(ValueError, match=r"data.csv has no caption column 'caption' .*data.caption_column.*"
                                         r"--caption-column.*its columns are \['file', 'text'\]"):
        list_sources(tables["csv"][0], image_column="file")
    with pytest.raises(ValueError, match=r"paths.parquet has no image column 'image' .*"
                                         r"its columns are \['path', 'caption'\]"):
        list_sources(tables["parquet_paths"][0])
    # training: preflight names it before Ray starts
    data = [f"data.path={tables['csv'][0]}", "data.image_column=file"]
    with pytest.raises(ConfigError, match=r"^data.path: .*has no caption column 'txt' .*"
                                          r"its columns are \['file', 'text'\]$"):
        check_paths(load_config(None, data + ["data.caption_column=txt"]))
    check_paths(load_config(None, data + ["data.caption_column=text"]))


@pytest.mark.parametrize("template,problem", [
    ("photo of {sks}, {caption}", "has the field {sks}; the only field allowed is {caption}"),
    ("photo of sks", "must contain the field {caption} exactly once, found it 0 times"),
    ("{caption}, {caption}", "must contain the field {caption} exactly once, found it 2 times"),
    ("{caption!r}", "has the field {caption!r}"),
    ("photo of {", "not a valid template"),
])
def test_a_bad_caption_template_fails_at_load_naming_the_field(template, problem):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.caption_template={json.dumps(template)}"])
    assert f"data.caption_template: {problem}" in str(err.value) and "e.g. 'photo of sks, {caption}'" in str(err.value)
    with pytest.raises(ValueError, match=re.escape(problem)):  # StreamSpec, read_shards' own settings, too
        StreamSpec(caption_template=template)


def test_the_caption_template_is_applied_once_where_a_row_is_decoded():
    cfg = load_config(None, ["data.caption_template='photo of sks, {caption} {{x}}'", "data.caption=first",
                             "data.image_column=file", "data.caption_column=text"])
    spec = StreamSpec.from_config(cfg)
    assert (spec.caption_template, spec.image_column, spec.caption_column) == (
        "photo of sks, {caption} {{x}}", "file", "text")
    row = {"id": "r", "image": png(64, 64), "captions": ["a {brace} caption", "two"]}
    out, reason = decode_row(row, spec, make_buckets(BUDGET, MULTIPLE, 2.0))
    assert reason is None and out["caption"] == "photo of sks, a {brace} caption {x}"


# -- buckets, decoding, batching (no Ray) --------------------------------------------------
@pytest.mark.parametrize("budget,multiple,ratio", [(4096, 16, 2.0), (1024 * 1024, 16, 2.0), (512 * 512, 64, 1.5)])
def test_buckets_are_multiples_near_the_budget(budget, multiple, ratio):
    buckets = make_buckets(budget, multiple, ratio)
    assert (int(budget**0.5) // multiple * multiple,) * 2 in buckets or budget == 4096 and (64, 64) in buckets
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert max(h, w) / min(h, w) <= ratio
        assert abs(h * w - budget) / budget < 0.15
        assert (w, h) in buckets  # portrait and landscape alike
    assert choose_bucket(100, 100, buckets)[0] == choose_bucket(100, 100, buckets)[1]
    h, w = choose_bucket(100, 300, buckets)  # very wide: the widest bucket
    assert w / h == max(b[1] / b[0] for b in buckets)


def test_decode_row_float_rgba_and_caption_choice():
    row = {"id": "r", "image": png(128, 64, (0, 0, 0, 0), mode="RGBA"), "captions": ["one", "two", "three"]}
    buckets = make_buckets(BUDGET, MULTIPLE, 2.0)
    out, reason = decode_row(row, StreamSpec(pixel_budget=BUDGET, pixels="float", caption="first"), buckets)
    assert reason is None and out["caption"] == "one"
    assert out["pixels"].shape == (3, out["height"], out["width"]) and out["width"] > out["height"]
    assert out["pixels"].dtype == np.float32 and np.allclose(out["pixels"], 1.0)  # transparent -> white
    picks = {decode_row(row, StreamSpec(pixel_budget=BUDGET, seed=s), buckets)[0]["caption"] for s in range(20)}
    assert len(picks) > 1  # random over seeds ...
    spec = StreamSpec(pixel_budget=BUDGET, seed=3)
    assert decode_row(row, spec, buckets)[0]["caption"] == decode_row(row, spec, buckets)[0]["caption"]  # ... fixed per seed


def test_iter_batches_groups_buckets_and_repeats():
    def row(i, h, w):
        return {"id": str(i), "pixels": np.full((h, w, 3), 255, np.uint8), "height": h, "width": w, "caption": f"c{i}"}

    rows = [row(i, 64, 64) for i in range(5)] + [row(10 + i, 48, 80) for i in range(3)]
    batches = list(iter_batches(rows, 2, epochs=1, shuffle_buffer=4))
    for images, captions, ids in batches:
        assert images.dtype == torch.float32 and images.shape[1] == 3 and len(captions) == len(ids) == images.shape[0]
        assert torch.all(images == 1.0)
    assert sorted(i for _, _, ids in batches for i in ids) == sorted(r["id"] for r in rows)
    assert sorted(b[0].shape[0] for b in batches) == [1, 1, 2, 2, 2]  # 5 = 2+2+1, 3 = 2+1: leftovers last, smaller
    forever = list(islice(iter_batches(rows, 2), 10))  # epochs=None: repeats, part-filled buckets carry over
    assert len(forever) == 10 and all(b[0].shape[0] == 2 for b in forever)
    with pytest.raises(RuntimeError, match="no usable rows"):
        next(iter_batches([], 2))


def test_bundled_dataset_is_deterministic(tmp_path):
    write_bundled(tmp_path)
    bundled = Path(bundled_dataset_path())
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in bundled.iterdir()) and 32 <= len(made) <= 48
    assert all((tmp_path / n).read_bytes() == (bundled / n).read_bytes() for n in made)
    assert sum(p.stat().st_size for p in bundled.iterdir()) < 200_000


def test_wrong_columns_fail_at_once_naming_the_expected_ones(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "img": [b"x"], "text": ["hi"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"expected columns \['id', 'image', 'captions'\].*found \['id', 'img', 'text'\]"):
        read_shards(tmp_path)
    with pytest.raises(ValueError, match=r"expected columns \['id', 'image', 'captions'\]"):  # inside the map, too
        decode_batch(pa.table({"id": ["a"], "img": [b"x"]}), StreamSpec(), make_buckets(BUDGET, MULTIPLE, 2.0))
    # the right names with the wrong types: a caption string instead of a list, an int id
    (tmp_path / "bad.parquet").unlink()
    pq.write_table(pa.table({"id": [1], "image": [b"x"], "captions": ["hi"]}), tmp_path / "typed.parquet")
    with pytest.raises(ValueError, match=r"expected columns \['id', 'image', 'captions'\] typed .*"
                                         r"found id: int64, captions: string"):
        read_shards(tmp_path)


# -- streaming with Ray Data ---------------------------------------------------------------
def test_read_shards_yields_bucketed_batches(local_ray, shards_dir):
    dataset, stats = read_shards(shards_dir, StreamSpec(pixel_budget=BUDGET, multiple=MULTIPLE))
    batches = list(iter_batches(dataset, 3, epochs=1))
    ids = [i for _, _, batch_ids in batches for i in batch_ids]
    assert sorted(ids) == sorted(f"{k}{i}" for k in SIZES for i in range(3))
    for images, captions, batch_ids in batches:
        b, c, h, w = images.shape
        assert c == 3 and h % MULTIPLE == 0 and w % MULTIPLE == 0 and abs(h * w - BUDGET) / BUDGET < 0.15
        assert images.min() >= -1 and images.max() <= 1
        assert all(cap.startswith("a ") or cap == "another caption" for cap in captions)
        kinds = {i.rstrip("0123456789") for i in batch_ids}
        assert kinds <= {"square", "big"} if h == w else kinds == ({"wide"} if w > h else {"tall"})
    assert stats.as_dict() == {"rows_read": 12, "rows_kept": 12, "dropped": {}, "examples": {}}


def test_bad_rows_in_a_shard_are_dropped_and_counted(local_ray, tmp_path):
    rows = [
        ("good1", png(64, 64), ["ok"]),
        ("good2", png(80, 40), ["ok", "also ok"]),
        ("garbage", b"definitely not an image", ["x"]),
        ("truncated", png(64, 64, noise=True)[:3000], ["x"]),
        ("zero_width", png_header_only(0, 64, zlib.compress(b"\0" * 64)), ["x"]),
        ("zero_bytes", b"", ["x"]),
        ("huge", png(200, 200), ["x"]),
        ("bomb", bomb_png(), ["x"]),
        ("blank", png(64, 64), ["   "]),
        ("no_captions", png(64, 64), []),
        ("null_caption", png(64, 64), [None]),
    ]
    table = pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "captions": [r[2] for r in rows]},
                     schema=SCHEMA)
    pq.write_table(table, tmp_path / "shard-00000.parquet")
    dataset, stats = read_shards(tmp_path, StreamSpec(pixel_budget=BUDGET, max_pixels=150 * 150))

    assert sorted(r["id"] for r in dataset.iter_rows()) == ["good1", "good2"]
    got = stats.as_dict()
    assert got["rows_read"] == 11 and got["rows_kept"] == 2
    assert got["dropped"] == {"undecodable_image": 3, "empty_image": 1, "too_large": 2,
                              "empty_caption": 2, "bad_caption": 1}
    assert sorted(got["examples"]["undecodable_image"]) == ["garbage", "truncated", "zero_width"]
    assert sorted(got["examples"]["too_large"]) == ["bomb", "huge"]
    assert got["examples"]["bad_caption"] == ["null_caption"]
    assert sorted(got["examples"]["empty_caption"]) == ["blank", "no_captions"]


def test_streaming_split_covers_the_rows(local_ray, shards_dir):
    dataset, _ = read_shards(shards_dir, StreamSpec(pixel_budget=BUDGET, rows_per_block=2))
    splits = dataset.streaming_split(2)
    seen = [[], []]

    def consume(k):  # the splits must be read concurrently, as rollout actors do
        for _, _, ids in iter_batches(splits[k], 2, epochs=1):
            seen[k] += ids

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{k}{i}" for k in SIZES for i in range(3))


def test_webdataset_tars_and_image_folders(local_ray, tmp_path):
    members = {"a.png": png(64, 64), "a.txt": b"first line\nsecond line\n", "b.jpg": jpeg(96, 48),
               "b.txt": b"a blue jpeg", "c.png": png(64, 64)}  # c has no caption
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset, stats = read_shards(str(tmp_path / "shard-000.tar"), StreamSpec(pixel_budget=BUDGET, caption="first"))
    rows = {r["id"]: r for r in dataset.iter_rows()}
    assert set(rows) == {"a", "b"} and rows["a"]["caption"] == "first line" and rows["b"]["caption"] == "a blue jpeg"
    assert rows["b"]["pixels"].shape == (rows["b"]["height"], rows["b"]["width"], 3) and rows["b"]["width"] > 64
    assert stats.as_dict()["dropped"] == {"missing_caption": 1}

    # the bundled sample folder is read directly (the embedded default) and gives validation images
    dataset, stats = read_shards(bundled_dataset_path(), StreamSpec(pixel_budget=BUDGET))
    captions, images = take_validation(dataset, count=4)
    assert len(captions) == 4 and images.shape == (4, 3, 64, 64)


def test_tables_jsonl_and_shards_read_directly_with_the_template(local_ray, tmp_path):
    """A CSV, a parquet table, a JSONL and one of our shards as data.path, side by side: the
    shard is told apart by its columns, the others are read through the named columns."""
    tables = write_tables(tmp_path)
    prepare_shards(tables["folder"][0], tmp_path / "shards")
    spec = StreamSpec(pixel_budget=BUDGET, caption="first", caption_template="photo of sks, {caption}",
                      image_column="file", caption_column="text")
    shard = tmp_path / "shards" / "shard-00000.parquet"
    dataset, stats = read_shards([str(tables[k][0]) for k in ("csv", "parquet_bytes", "jsonl")] + [str(shard)], spec)
    dataset = dataset.materialize()  # decoded once, for both reads below
    rows = sorted((r["id"], r["caption"]) for r in dataset.iter_rows())
    assert rows == sorted([("one", "photo of sks, a one"), ("sub/two", "photo of sks, a sub/two")] * 4)
    got = stats.as_dict()
    assert got["rows_read"] == 12 and got["rows_kept"] == 8
    assert got["dropped"] == {"missing_image": 1, "empty_caption": 1, "missing_caption": 2}
    assert got["examples"]["missing_image"] == [str(tmp_path / "gone.png")]
    captions, images = take_validation(dataset, count=2)  # the sample grids' training pairs: once, too
    assert len(captions) == 2 and all(c.startswith("photo of sks, a ") and c.count("sks") == 1 for c in captions)
    with pytest.raises(ValueError, match=r"has no image column 'image' .*its columns are \['file', 'text'\]"):
        read_shards(str(tables["csv"][0]), StreamSpec())


# -- the entry script ----------------------------------------------------------------------
def test_prepare_data_script(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        write_pair(folder, f"img{i}", png(32, 32), f"caption {i}")
    write_pair(folder, "broken", b"junk", "caption")
    script = [sys.executable, str(REPO / "jobs" / "prepare_data.py")]
    done = subprocess.run(script + [str(folder), str(tmp_path / "out"), "--rows-per-shard", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 rows in 2 shard(s)" in done.stdout and "undecodable_image" in done.stdout
    assert "broken.png" in done.stdout
    assert len(list((tmp_path / "out").glob("shard-*.parquet"))) == 2

    missing = subprocess.run(script + [str(tmp_path / "nope"), str(tmp_path / "o2")], capture_output=True, text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    only_bad = tmp_path / "bad"
    write_pair(only_bad, "x", b"junk", "caption")
    nothing = subprocess.run(script + [str(only_bad), str(tmp_path / "o3")], capture_output=True, text=True)
    assert nothing.returncode != 0 and "nothing usable" in nothing.stderr

    table = str(write_tables(tmp_path / "tables")["csv"][0])
    done = subprocess.run(script + [table, str(tmp_path / "o4"), "--image-column", "file", "--caption-column", "text"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "wrote 2 rows" in done.stdout and "missing_image" in done.stdout, done.stderr
    unnamed = subprocess.run(script + [table, str(tmp_path / "o5")], capture_output=True, text=True, timeout=60)
    assert unnamed.returncode == 2 and "has no image column 'image'" in unnamed.stderr
    assert "its columns are ['file', 'text']" in unnamed.stderr


def test_shards_checked_in_several_processes_are_the_same_bytes(tmp_path):
    """write_shards(workers=2) decodes and checks the images in two processes and writes, in the
    sources' order, exactly the shards one process writes."""
    import hashlib

    from dopsd_ray.data.shards import list_sources, write_shards

    sources = list_sources(REPO / "data" / "bundled")
    one = write_shards(sources, tmp_path / "one", rows_per_shard=4, workers=1)
    two = write_shards(sources, tmp_path / "two", rows_per_shard=4, workers=2)
    digest = lambda d: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.parquet"))]  # noqa: E731
    assert one.rows_written == two.rows_written == len(sources) and len(one.shards) > 1
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
