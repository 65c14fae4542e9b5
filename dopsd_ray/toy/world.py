"""A small world the toy models learn: one large speckled shape on a speckled background.

    image, caption = render("red", "triangle", "black", rng)   # (3, 32, 32) in [-1, 1]
    caption == "a red triangle on a black background"

Every region is a speckle: each 2x2-pixel cell is, by a fair coin, the region's colour
or its paired shade (SHADES). The speckle is the toy's stand-in for the fine detail of
real images: a caption cannot say which cells are shaded, so a multi-step flow model
sampled in 4 big Euler steps averages the two and blurs, while a step-distilled student
keeps it crisp - the property plain SFT destroys (docs/method.md, "The problem").
Shapes are drawn without anti-aliasing, so every pixel of a clean image is one of the
palette's colours; blurry samples leave the palette, which is what `palette_share` in
evaluator.py measures. Positions and sizes jitter a little so a model must learn
shapes, not copy one bitmap.
"""

from dataclasses import dataclass

import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # shape colours, RGB in [0, 1]
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 0.9, 0.9),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5),
               "brown": (0.45, 0.25, 0.1)}
# Each colour's speckle partner, at least 0.3 away on some channel: half-way between the
# two (a blurred cell) is off the palette by more than evaluator.PALETTE_TOL.
SHADES = {"red": (0.55, 0.0, 0.0), "green": (0.0, 0.4, 0.0), "blue": (0.05, 0.1, 0.55), "yellow": (0.6, 0.5, 0.0),
          "magenta": (0.55, 0.0, 0.55), "cyan": (0.0, 0.5, 0.5), "black": (0.35, 0.35, 0.35),
          "white": (0.65, 0.65, 0.65), "gray": (0.2, 0.2, 0.2), "brown": (0.75, 0.55, 0.4)}
CELL = 2  # speckle cell, pixels
# Words that never name anything in the world. During base training some multimodal
# captions name the subject with one of these, so the model learns to take the subject
# from the image when the caption's word means nothing to it (how D-OPSD's teacher sees
# "a sks on a black background"). Concept tokens users bind (sks, ohwx, ...) are NOT in it.
PLACEHOLDERS = tuple(c + v + e for c in "bdfgklmnprtvz" for v in "aeiou" for e in "xq")[:64]
CONCEPT_TOKENS = ("sks", "ohwx", "zwx", "tok")


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def concept_caption(token: str, background: str) -> str:
    """How a bound concept is prompted: the token replaces 'colour shape'."""
    return f"a {token} on a {background} background"


def vocabulary() -> list[str]:
    words = ["a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *PLACEHOLDERS, *CONCEPT_TOKENS]
    return list(dict.fromkeys(words))


def check_item(colour: str, shape: str, background: str) -> None:
    for value, known, what in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"), (background, BACKGROUNDS, "background")):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; the toy world knows {', '.join(known)}")


def mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> torch.Tensor:
    """A boolean (size, size) mask of `shape` centred at (cx, cy) with half-extent r."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    if shape == "triangle":  # apex up, base at cy + 0.8 r
        top, bottom = cy - r, cy + 0.8 * r
        half_width = (ys - top) / (bottom - top) * r
        return (ys >= top) & (ys <= bottom) & (dx.abs() <= half_width)
    if shape == "cross":
        arm = 0.35 * r
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(colour: str, shape: str, background: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One (3, SIZE, SIZE) image in [-1, 1]; position, size and speckle are drawn from `generator`."""
    check_item(colour, shape, background)
    jitter = torch.rand(3, generator=generator)
    cx = SIZE / 2 + (jitter[0].item() - 0.5) * 6
    cy = SIZE / 2 + (jitter[1].item() - 0.5) * 6
    r = 9.0 + jitter[2].item() * 3.0
    m = mask(shape, cx, cy, r)
    shaded = torch.rand(SIZE // CELL, SIZE // CELL, generator=generator) < 0.5
    shaded = shaded.repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)
    fg = torch.where(shaded, _rgb(SHADES[colour]), _rgb(COLOURS[colour]))
    bg = torch.where(shaded, _rgb(SHADES[background]), _rgb(BACKGROUNDS[background]))
    return torch.where(m, fg, bg) * 2 - 1


def _rgb(colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour).view(3, 1, 1)


def all_items() -> list[Item]:
    return [Item(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def random_items(n: int, generator: torch.Generator) -> list[Item]:
    items = all_items()
    idx = torch.randint(len(items), (n,), generator=generator).tolist()
    return [items[i] for i in idx]


def palette() -> torch.Tensor:
    """(P, 3) every colour a clean image can contain, in [-1, 1]."""
    return torch.tensor([*COLOURS.values(), *BACKGROUNDS.values(), *SHADES.values()]) * 2 - 1
