"""How the miniature is scored: a small classifier trained on rendered images, and
pixel statistics that fall when few-step samples blur.

    clf = Evaluator.load(path)              # or train_evaluator(...) then .save(path)
    scores = evaluate(clf, samples, items)  # items: what each sample should show
    scores["accuracy"]        # colour, shape and background all right
    scores["subject"]         # colour and shape right (a bound concept's identity)
    scores["confidence"]      # mean classifier probability of its own answers
    scores["palette_share"]   # share of pixels within PALETTE_TOL of a world colour

Clean renders have palette_share 1.0; a blurry sample mixes colours at every edge and
in flat areas, so its share drops. "Quality" in the README table is palette_share.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import world

HEADS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "background": tuple(world.BACKGROUNDS)}
PALETTE_TOL = 0.25  # max per-channel distance in [-1, 1] units (~32 of 255)


class Evaluator(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(64, len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (world.SIZE, world.SIZE):
            images = F.interpolate(images, size=(world.SIZE, world.SIZE), mode="area")
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Evaluator":
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)


def labels(items: list[world.Item]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([names.index(getattr(i, k)) for i in items]) for k, names in HEADS.items()}


def rendered_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[world.Item]]:
    items = world.random_items(n, generator)
    return torch.stack([world.render(i.colour, i.shape, i.background, generator) for i in items]), items


def train_evaluator(steps: int = 2000, batch_size: int = 64, seed: int = 0, log=print) -> Evaluator:
    """Train on renders with mild noise and blur, so slightly imperfect samples still classify."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        images, items = rendered_batch(batch_size, g)
        noise = torch.rand(batch_size, 1, 1, 1, generator=g) * 0.3
        images = images + noise * torch.randn(images.shape, generator=g)
        if step % 2:
            images = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
        out = model(images.clamp(-1, 1))
        loss = sum(F.cross_entropy(out[k], v) for k, v in labels(items).items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"evaluator step {step}: loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def palette_share(images: torch.Tensor, tol: float = PALETTE_TOL) -> torch.Tensor:
    """Per image, the share of pixels within `tol` (per channel) of some world colour."""
    pixels = images.float().clamp(-1, 1).permute(0, 2, 3, 1).unsqueeze(-2)  # (B, H, W, 1, 3)
    near = ((pixels - world.palette()).abs().amax(-1) <= tol).any(-1)  # (B, H, W)
    return near.float().flatten(1).mean(1)


@torch.no_grad()
def predict(model: Evaluator, images: torch.Tensor) -> tuple[dict[str, list[str]], torch.Tensor]:
    """Predicted names per head, and per image the mean over heads of the top probability."""
    out = model(images.float().clamp(-1, 1))
    names = {k: [HEADS[k][i] for i in v.argmax(1).tolist()] for k, v in out.items()}
    confidence = torch.stack([v.softmax(1).amax(1) for v in out.values()]).mean(0)
    return names, confidence


def evaluate(model: Evaluator, images: torch.Tensor, items: list[world.Item]) -> dict[str, float]:
    names, confidence = predict(model, images)
    right = {k: torch.tensor([n == getattr(i, k) for n, i in zip(names[k], items)]) for k in HEADS}
    return {
        "accuracy": (right["colour"] & right["shape"] & right["background"]).float().mean().item(),
        "subject": (right["colour"] & right["shape"]).float().mean().item(),
        **{f"{k}_accuracy": v.float().mean().item() for k, v in right.items()},
        "confidence": confidence.mean().item(),
        "palette_share": palette_share(images).mean().item(),
    }


def agreement(model: Evaluator, a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of image pairs the classifier labels identically on every head (e.g. 4-step vs 32-step)."""
    na, _ = predict(model, a)
    nb, _ = predict(model, b)
    same = torch.ones(len(a), dtype=torch.bool)
    for k in HEADS:
        same &= torch.tensor([x == y for x, y in zip(na[k], nb[k])])
    return same.float().mean().item()


if __name__ == "__main__":  # python -m dopsd_ray.toy.evaluator models/toy/evaluator.safetensors
    import sys

    torch.set_num_threads(1)
    train_evaluator().save(sys.argv[1])
