"""Labelled image grids for sample previews (logged to MLflow by the learner).

    grid = sample_grid(
        rows=[student_images, teacher_context_images],   # one list per row
        row_labels=["student", "teacher context"],
        col_labels=captions,
    )

Cells are image tensors in [-1, 1] shaped (3, H, W) (or (1, 3, H, W), or (1, H, W) for
grey; uint8 tensors are pixels as they are), PIL images, or None for an empty cell. Cells are as large as the largest image, at
least MIN_CELL pixels on the short side; smaller images are upscaled by an integer factor
with nearest-neighbour, so tiny 32 px test samples stay visible pixel for pixel. No torch math here beyond the conversion.
"""

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # smallest short side of a cell, in pixels
PAD = 6
MAX_LABEL_LINES = 4
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
EMPTY = (230, 230, 230)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 pixels of the same shape, on the CPU (NaN -> grey): the one
    conversion, so a grid of saved uint8 pixels shows exactly what the floats showed."""
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) / (1, 3, H, W) / (1, H, W) / (H, W) tensor in [-1, 1] (or uint8 pixels) -> RGB PIL image."""
    x = image.detach().cpu()
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of shape {tuple(x.shape)}")
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    pixels = x if x.dtype == torch.uint8 else to_uint8(x)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def _to_pil(cell: Any) -> Image.Image | None:
    if cell is None:
        return None
    if isinstance(cell, Image.Image):
        return cell.convert("RGB")
    if isinstance(cell, torch.Tensor):
        return tensor_to_pil(cell)
    raise TypeError(f"grid cells must be image tensors, PIL images or None, got {type(cell).__name__}")


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most MAX_LABEL_LINES lines (ellipsis after)."""
    avg = max(1, _text_width(draw, "abcdefghij", font) // 10)
    chars = max(4, width // avg)
    lines = textwrap.wrap(text, width=chars) or [""]
    # The average-width guess can overshoot for wide glyphs: shrink lines that do not fit.
    while chars > 4 and any(_text_width(draw, ln, font) > width for ln in lines):
        chars -= 1
        lines = textwrap.wrap(text, width=chars) or [""]
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines


def sample_grid(
    rows: Sequence[Sequence[Any]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A labelled grid: rows[r][c] goes in row r, column c; labels left and on top."""
    if not rows or not rows[0]:
        raise ValueError("sample_grid needs at least one row with at least one image")
    n_cols = len(rows[0])
    if any(len(r) != n_cols for r in rows):
        raise ValueError(f"every row needs the same number of images; got {[len(r) for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")

    # 1. Convert cells and pick one cell size: the largest image, upscaled (integer
    #    factor) so its short side reaches MIN_CELL. Each image is then upscaled by the
    #    largest integer factor that fits the cell (nearest, so pixels stay crisp).
    cells = [[_to_pil(c) for c in row] for row in rows]
    present = [im for row in cells for im in row if im is not None]
    if not present:
        raise ValueError("sample_grid got no images (every cell is None)")
    cell_w = max(im.width for im in present)
    cell_h = max(im.height for im in present)
    scale = max(1, math.ceil(MIN_CELL / min(cell_w, cell_h)))
    cell_w, cell_h = cell_w * scale, cell_h * scale

    # 2. Lay out the label strips.
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    col_lines = [_wrap(measure, str(t), font, cell_w) for t in col_labels] if col_labels else []
    top = (max(len(ls) for ls in col_lines) * line_h + PAD) if col_lines else 0
    row_w = min(max(MIN_CELL, cell_w // 2), 200)  # row labels wrap within this width
    row_lines = [_wrap(measure, str(t), font, row_w) for t in row_labels] if row_labels else []
    left = (max(_text_width(measure, ln, font) for ls in row_lines for ln in ls) + PAD) if row_lines else 0

    # 3. Paste the cells (centred when an image is smaller than the cell) and draw labels.
    width = PAD + left + n_cols * (cell_w + PAD)
    height = PAD + top + len(rows) * (cell_h + PAD)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        x = PAD + left + c * (cell_w + PAD)
        for i, ln in enumerate(lines):
            draw.text((x, PAD + i * line_h), ln, fill=TEXT, font=font)
    for r, row in enumerate(cells):
        y = PAD + top + r * (cell_h + PAD)
        if row_lines:
            text_h = len(row_lines[r]) * line_h
            for i, ln in enumerate(row_lines[r]):
                draw.text((PAD, y + (cell_h - text_h) // 2 + i * line_h), ln, fill=TEXT, font=font)
        for c, im in enumerate(row):
            x = PAD + left + c * (cell_w + PAD)
            if im is None:
                draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=EMPTY)
                continue
            k = min(cell_w // im.width, cell_h // im.height)
            if k > 1:
                im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
            grid.paste(im, (x + (cell_w - im.width) // 2, y + (cell_h - im.height) // 2))
    return grid
