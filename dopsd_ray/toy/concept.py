"""A concept to bind to a new token, DreamBooth style, and the prompts it is judged on.

    concept = Concept(token="sks", colour="yellow", shape="triangle")   # a yellow triangle
    concept = Concept(token="sks", colour="yellow")                     # anything yellow
    write_concept_dataset("data/toy_concept", concept)   # 4 PNGs + .txt captions
    concept.train_items / concept.heldout_items / prior_items(concept) / concept.shows(c, s)
    write_concept_dataset("data/c", concept, class_images=10)  # + DreamBooth prior preservation
    Concept.load("data/toy_concept")      # the concept a dataset was written for (its concept.json)

Training captions name the subject only by the token ("a sks on a black background"),
on `train_backgrounds`; held-out prompts put the token on the other backgrounds. With no
shape the concept is the colour: its training images cycle through the world's shapes.
Prior retention is judged on held-in prompts of the world that do not show the concept.
DreamBooth's prior preservation, as data: `class_images` renders of other world items
(captioned as usual, spread evenly over the other colours, none of them a prior-retention
prompt) join the training set, the same for every method.

    python -m dopsd_ray.toy.concept data/toy_concept --token sks --colour yellow --shape triangle
"""

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..grid import tensor_to_pil
from . import world


CONCEPT_FILE = "concept.json"  # beside a concept dataset's images: what they teach


@dataclass(frozen=True)
class Concept:
    token: str = "sks"
    colour: str = "yellow"
    shape: str | None = None  # None: the concept is the colour, on any shape
    train_backgrounds: tuple[str, ...] = ("black", "white")
    images: int = 4

    def __post_init__(self):
        for b in self.train_backgrounds:
            world.check_item(self.colour, self.shape or world.SHAPES[0], b)
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

    def shape_at(self, i: int) -> str:
        return self.shape or world.SHAPES[i % len(world.SHAPES)]

    @classmethod
    def load(cls, folder: str | Path) -> "Concept":
        """The concept `write_concept_dataset` wrote `folder` for (its CONCEPT_FILE)."""
        path = Path(folder) / CONCEPT_FILE
        if not path.is_file():
            raise ValueError(f"{folder} has no {CONCEPT_FILE}: not a toy concept dataset; write one with "
                             "python -m dopsd_ray.toy.concept FOLDER")
        values = json.loads(path.read_text())
        return cls(**{**values, "train_backgrounds": tuple(values["train_backgrounds"])})

    def shows(self, colour: str, shape: str) -> bool:
        """Does an image of this colour and shape show the concept?"""
        return colour == self.colour and (self.shape is None or shape == self.shape)

    @property
    def train_items(self) -> list[world.Item]:
        bgs = self.train_backgrounds
        return [world.Item(self.colour, self.shape_at(i), bgs[i % len(bgs)]) for i in range(self.images)]

    @property
    def heldout_items(self) -> list[world.Item]:
        """One per held-out background (the shape cycles when the concept has none)."""
        return [world.Item(self.colour, self.shape_at(i), b) for i, b in enumerate(self.heldout_backgrounds)]


def prior_items(concept: Concept, n: int = 16, seed: int = 7) -> list[world.Item]:
    """Held-in prompts: world items of neither the concept's colour nor its shape."""
    items = [i for i in world.all_items() if i.colour != concept.colour and i.shape != concept.shape]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:n]]


def class_items(concept: Concept, n: int, seed: int = 11) -> list[world.Item]:
    """Prior-preservation items: n world items not showing the concept and not among
    `prior_items` (retention stays judged on unseen prompts), as evenly spread over the
    other colours as n allows."""
    held = set(prior_items(concept))
    pool = [i for i in world.all_items() if i.colour != concept.colour and i not in held]
    colours = [c for c in world.COLOURS if c != concept.colour]
    quota = -(-n // len(colours))
    picked, per_colour = [], dict.fromkeys(colours, 0)
    for k in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(picked) < n and per_colour[pool[k].colour] < quota:
            picked.append(pool[k])
            per_colour[pool[k].colour] += 1
    if len(picked) < n:
        raise ValueError(f"class_images={n}: only {len(picked)} world items are neither the concept "
                         "nor a prior-retention prompt")
    return picked


def write_concept_dataset(folder: str | Path, concept: Concept, seed: int = 0, class_images: int = 0) -> Path:
    """The concept's training images (and `class_images` prior-preservation renders) as an
    image folder (PNG + same-name .txt caption)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("class_*"):  # a re-run with fewer class images must not keep stale ones
        old.unlink()
    g = torch.Generator().manual_seed(seed)
    rows = [(f"{i:02d}_{concept.token}_{item.background}", item, concept.prompt(item.background))
            for i, item in enumerate(concept.train_items)]
    rows += [(f"class_{i:02d}_{item.colour}_{item.shape}_{item.background}", item, item.caption)
             for i, item in enumerate(class_items(concept, class_images))]
    for stem, item, caption in rows:
        tensor_to_pil(world.render(item.colour, item.shape, item.background, g)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption + "\n")
    (folder / CONCEPT_FILE).write_text(json.dumps(asdict(concept)) + "\n")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--colour", default="yellow")
    parser.add_argument("--shape", default=None, help="default: none, the concept is the colour")
    parser.add_argument("--class-images", type=int, default=0, help="prior-preservation renders to add")
    args = parser.parse_args(argv)
    print(write_concept_dataset(args.folder, Concept(args.token, args.colour, args.shape),
                                class_images=args.class_images))


if __name__ == "__main__":
    main()
