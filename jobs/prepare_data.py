"""Turn images + captions into parquet shards for training (data.path=OUT_DIR).

    python jobs/prepare_data.py photos/ shards/                  # image.png + image.txt pairs
    python jobs/prepare_data.py captions.jsonl shards/ --rows-per-shard 500
    python jobs/prepare_data.py pairs.csv shards/ --image-column file --caption-column text

INPUT is one of:
  - a folder of images with same-name .txt captions (one caption per line);
  - a JSONL of {"image": path, "caption": str} / {"image": path, "captions": [str, ...]}
    (optional "id");
  - a CSV or parquet file with named columns: --image-column (default "image") and
    --caption-column (default "caption"), optional "id". A CSV cell holds one caption;
    a parquet caption cell a string or a list of strings, its image cell a path, the
    image bytes, or a Hugging Face datasets image {"bytes", "path"}. A JSONL's keys are
    the same named columns. A missing column fails at once, listing the file's columns.
Image paths are relative to the JSONL / CSV / parquet file's folder, or absolute.
Unusable rows (corrupt or huge images, missing images, missing or empty captions) are
skipped and listed with the reason; the shards hold the original image bytes. Upload
OUT_DIR (e.g. to s3://bucket/shards/) for clusters. Small sets need no shards: training
reads the same inputs directly as data.path (with data.image_column / data.caption_column).
Trigger words are added at training time (data.caption_template), not stored here.
"""

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from dopsd_ray.data.shards import DEFAULT_MAX_PIXELS, list_sources, write_shards  # noqa: E402
from dopsd_ray.storage import Storage  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder of images + .txt captions, or a .jsonl, .csv or .parquet file")
    parser.add_argument("out_dir", help="folder (or s3://bucket/prefix) for shard-00000.parquet, ... and summary.json")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="rows per parquet file (default 1000)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and check the images (default: the CPUs, at most 8)")
    parser.add_argument("--image-column", default="image",
                        help="a .csv / .parquet (or .jsonl) input's image column: paths or image bytes (default image)")
    parser.add_argument("--caption-column", default="caption",
                        help="its caption column: a string or a list of strings (default caption)")
    args = parser.parse_args(argv)
    if args.rows_per_shard < 1:
        parser.error("--rows-per-shard must be at least 1")

    if not Path(args.input).exists():
        print(f"error: {args.input} does not exist", file=sys.stderr)
        return 2
    try:
        sources = list_sources(args.input, args.image_column, args.caption_column)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not sources:
        print(f"error: nothing found in {args.input}: no images (.png .jpg .jpeg .webp .bmp) or JSONL / table rows",
              file=sys.stderr)
        return 1
    try:
        summary = write_shards(sources, args.out_dir, args.rows_per_shard, args.max_pixels, args.overwrite,
                               workers=args.workers, progress=lambda rows: tqdm(
                                   rows, total=len(sources), desc="checking + writing", unit="img"))
    except FileExistsError as err:
        print(f"error: {err} (--overwrite replaces them)", file=sys.stderr)
        return 2

    print(summary.format())
    if summary.rows_written == 0:
        print(f"error: nothing usable in {args.input}: every row was skipped (reasons above)", file=sys.stderr)
        return 1
    print(f"train on it with: python jobs/train.py data.path={Storage(args.out_dir).uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
