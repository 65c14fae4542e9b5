"""A concept to bind to a new token, DreamBooth style, and the prompts it is judged on.

    concept = Concept(token="sks", colour="yellow", shape="triangle")
    write_concept_dataset("data/toy_concept", concept)   # 4 PNGs + .txt captions
    concept.train_items / concept.heldout_items / prior_items(concept)

Training captions name the subject only by the token ("a sks on a black background"),
on `train_backgrounds`; held-out prompts put the token on the other backgrounds. Prior
retention is judged on held-in prompts of the world that do not show the concept.

    python -m dopsd_ray.toy.concept data/toy_concept --token sks --colour yellow --shape triangle
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ..grid import tensor_to_pil
from . import world


@dataclass(frozen=True)
class Concept:
    token: str = "sks"
    colour: str = "yellow"
    shape: str = "triangle"
    train_backgrounds: tuple[str, ...] = ("black", "white")
    images: int = 4

    def __post_init__(self):
        for b in self.train_backgrounds:
            world.check_item(self.colour, self.shape, b)
        if not self.token or " " in self.token:
            raise ValueError(f"concept token must be one word, got {self.token!r}")
        if self.token in (*world.COLOURS, *world.SHAPES, *world.BACKGROUNDS, *world.PLACEHOLDERS):
            raise ValueError(f"concept token {self.token!r} already means something in the toy world; "
                             f"pick a new word such as {', '.join(world.CONCEPT_TOKENS)}")

    @property
    def heldout_backgrounds(self) -> tuple[str, ...]:
        return tuple(b for b in world.BACKGROUNDS if b not in self.train_backgrounds)

    def prompt(self, background: str) -> str:
        return world.concept_caption(self.token, background)

    @property
    def train_items(self) -> list[world.Item]:
        bgs = self.train_backgrounds
        return [world.Item(self.colour, self.shape, bgs[i % len(bgs)]) for i in range(self.images)]

    @property
    def heldout_items(self) -> list[world.Item]:
        return [world.Item(self.colour, self.shape, b) for b in self.heldout_backgrounds]


def prior_items(concept: Concept, n: int = 16, seed: int = 7) -> list[world.Item]:
    """Held-in prompts: world items of neither the concept's colour nor its shape."""
    items = [i for i in world.all_items() if i.colour != concept.colour and i.shape != concept.shape]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:n]]


def write_concept_dataset(folder: str | Path, concept: Concept, seed: int = 0) -> Path:
    """The concept's training images as an image folder (PNG + same-name .txt caption)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, item in enumerate(concept.train_items):
        stem = folder / f"{i:02d}_{concept.token}_{item.background}"
        tensor_to_pil(world.render(item.colour, item.shape, item.background, g)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(concept.prompt(item.background) + "\n")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--colour", default="yellow")
    parser.add_argument("--shape", default="triangle")
    args = parser.parse_args(argv)
    print(write_concept_dataset(args.folder, Concept(args.token, args.colour, args.shape)))


if __name__ == "__main__":
    main()
