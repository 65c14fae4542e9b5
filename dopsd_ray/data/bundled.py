"""The bundled dataset (what runs train on when data.path is unset): small procedurally drawn shapes with captions.

    python -m dopsd_ray.data.bundled data/bundled

Writes 24 PNGs (20 square 64x64, 4 landscape 96x64, so more than one aspect-ratio
bucket is exercised) and a same-name .txt with two captions each, e.g.
"a red circle on a blue background". Deterministic: the same files every run.
"""

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 210), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
FOREGROUNDS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("white", "black", "blue", "orange", "yellow")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) // 2, (top + bottom) // 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def bundled_items() -> list[dict]:
    """24 (shape, colour, background, size) combinations in a fixed order.

    4 shapes x 5 colours cycle together (coprime lengths: the first 20 are all distinct pairs).
    """
    items = []
    for i in range(24):
        shape, colour = SHAPES[i % len(SHAPES)], FOREGROUNDS[i % len(FOREGROUNDS)]
        k = i + 2 + i // len(FOREGROUNDS)
        background = BACKGROUNDS[k % len(BACKGROUNDS)]
        if background == colour:
            background = BACKGROUNDS[(k + 1) % len(BACKGROUNDS)]
        size = (96, 64) if i >= 20 else (64, 64)  # (width, height)
        items.append({"name": f"{i:02d}_{colour}_{shape}", "shape": shape, "colour": colour,
                      "background": background, "size": size})
    return items


def render(item: dict) -> Image.Image:
    width, height = item["size"]
    image = Image.new("RGB", (width, height), COLOURS[item["background"]])
    side = int(min(width, height) * 0.6)
    left, top = (width - side) // 2, (height - side) // 2
    draw_shape(ImageDraw.Draw(image), item["shape"], (left, top, left + side, top + side), COLOURS[item["colour"]])
    return image


def captions(item: dict) -> list[str]:
    article = "an" if item["colour"][0] in "aeiou" else "a"
    background = ("an " if item["background"][0] in "aeiou" else "a ") + item["background"]
    return [f"{article} {item['colour']} {item['shape']} on {background} background",
            f"{item['colour']} {item['shape']}, {item['background']} backdrop, simple flat illustration"]


def write_bundled(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in bundled_items():
        path = out_dir / f"{item['name']}.png"
        render(item).save(path, optimize=True)
        path.with_suffix(".txt").write_text("\n".join(captions(item)) + "\n")
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the PNGs and .txt captions into")
    args = parser.parse_args(argv)
    written = write_bundled(args.out_dir)
    print(f"wrote {len(written)} images + captions to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
