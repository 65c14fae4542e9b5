"""Did it work? The base and each export sample the same prompts from the same noise, and
are scored side by side: few-step retention, prior drift, sharpness, plus plug-in metrics.

    prompts = load_prompts("prompts.jsonl")
    settings = Settings(seeds=[1000, 2000], steps=8, size=512, reference_steps=32)
    result = evaluate(family, {"dopsd": "outputs/dopsd/export"}, prompts, settings, metrics=[clip])
    result.scores["dopsd"]["prior_drift/ssim"]      # one value per seed
    result.summary(), markdown_table(result.summary()), preview_grids(result)

Prompts. A prompt file is JSONL, one {"kind": ..., "prompt": ...} per line (optional
"samples": n, else Settings.samples_per_prompt), or text, one "kind: prompt" per line (blank
lines and lines starting with # skipped). Kinds:
    train    the training captions: does it render what it was shown
    heldout  new prompts with the concept: does the concept generalise
    prior    prompts without the concept: did the rest of the model stay where it was
(evaluation_job.py: with no file, the training captions are the train prompts.)

Noise. Every model samples every prompt `samples` times, from the same noise: kind k at seed s
is drawn at once on the CPU from torch.Generator().manual_seed(s + NOISE_STREAM[k]) (samples
of one prompt consecutive), then sampled in chunks of Settings.batch_size.

Metrics per (model, seed), images in [0, 1] (data range 1), over every kind unless said:
    retention/{latent_mse,mse,psnr,ssim}    the model's K-step vs its own many-step samples of the
                                            same noise (with reference_steps); the base row is the
                                            base's own figure, what a model should hold
    prior_drift/{latent_mse,mse,psnr,ssim}  the model's vs the base's K-step samples of the prior
                                            prompts (exports only)
    sharpness                               high-frequency energy (mean squared Laplacian) of the
                                            K-step samples over the base's (base: 1)
    + each plug-in Metric's: CLIP-T, CLIP-I, DINO, FD (embeddings.py), the toy's (toy/scoring.py)
The table and the logged numbers are mean and std over seeds. PSNR is capped at PSNR_CAP dB
(identical images), so every number stays finite in JSON and MLflow.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .algorithms.sampling import euler_sample
from .algorithms.steps import velocity_fn
from .exports import applied, base_mismatch, export_problem
from .grid import sample_grid
from .preview import decode_one_by_one

KINDS = ("train", "heldout", "prior")  # the table's and the grid's order
# Noise streams: heldout and prior are the miniature's draws (seed, seed + 1) of its scoring loop.
NOISE_STREAM = {"heldout": 0, "prior": 1, "train": 2}
BASE = "base"
PSNR_CAP = 100.0
PREVIEW_COLUMNS = 8
TABLE_ORDER = ("retention/", "prior_drift/", "sharpness")  # the built-in rows first, then the plug-ins'


# -- image metrics (images in [-1, 1]; scores on [0, 1], data range 1) ------------------------

def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image mean squared error, (B,)."""
    return (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB, at most PSNR_CAP (identical images)."""
    return (10 * torch.log10(1 / mse(a, b).clamp_min(10 ** (-PSNR_CAP / 10)))).clamp_max(PSNR_CAP)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # summing to 1 in float64 (ssim)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image SSIM (Wang et al. 2004): gaussian 11x11 window, sigma 1.5, K1 .01, K2 .03,
    per channel over the valid region, then averaged. Images smaller than the window use a
    window of their size. In float64: E[x^2] - E[x]^2 in float32 is off by ~1e-7, and C2 is
    only 9e-4."""
    x, y = _unit(a).double(), _unit(b).double()
    size = min(window, *x.shape[-2:])
    channels = x.shape[1]
    w = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Per image mean squared Laplacian (per channel, valid region): falls when images blur."""
    x = _unit(images)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device)
    lap = F.conv2d(x, kernel.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    return lap.pow(2).flatten(1).mean(1)


def distances(prefix: str, a: torch.Tensor, b: torch.Tensor, latents_a: torch.Tensor,
              latents_b: torch.Tensor) -> dict[str, float]:
    """prefix/{latent_mse, mse, psnr, ssim} between two sample sets of the same noise."""
    return {f"{prefix}/latent_mse": (latents_a.float() - latents_b.float()).pow(2).mean().item(),
            f"{prefix}/mse": mse(a, b).mean().item(), f"{prefix}/psnr": psnr(a, b).mean().item(),
            f"{prefix}/ssim": ssim(a, b).mean().item()}


# -- prompts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    kind: str  # one of KINDS
    text: str
    samples: int | None = None  # None: Settings.samples_per_prompt


def _row(value, where: str) -> Prompt:
    """A prompt from a parsed row, or ValueError naming `where` and the expected form."""
    form = 'expected {"kind": "train|heldout|prior", "prompt": "...", "samples": n (optional)}'
    if not isinstance(value, dict) or set(value) - {"kind", "prompt", "samples"}:
        raise ValueError(f"{where}: {form}")
    kind, text, samples = value.get("kind"), value.get("prompt"), value.get("samples")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string ({form})")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise ValueError(f"{where}: samples must be a whole number >= 1, got {samples!r}")
    return Prompt(kind, text.strip(), samples)


def load_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL or text prompt file (module docstring); ValueError naming the
    file and line of the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval.prompts={str(path)!r}: no such file (a .jsonl or text prompt file)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: not a JSON object") from None
        else:
            kind, sep, text = line.partition(":")
            if not sep:
                raise ValueError(f"{where}: expected 'kind: prompt' with kind one of {', '.join(KINDS)}")
            value = {"kind": kind.strip(), "prompt": text}
        prompts.append(_row(value, where))
    if not prompts:
        raise ValueError(f"eval.prompts={str(path)!r} holds no prompts")
    return prompts


# -- sampling and scoring ---------------------------------------------------------------------

@dataclass
class Settings:
    seeds: list[int]
    steps: int  # the few-step setting that is scored
    size: int  # square image side, pixels
    samples_per_prompt: int = 1
    reference_steps: int | None = None  # many-step reference of the same noise; None: no retention
    batch_size: int = 4


@dataclass
class Samples:
    """One model's samples of one kind at one seed, on the CPU; images in [-1, 1]."""

    prompts: list[str]  # one per sample
    images: torch.Tensor  # K-step, (N, 3, H, W)
    latents: torch.Tensor
    reference_images: torch.Tensor | None = None  # the same noise in reference_steps
    reference_latents: torch.Tensor | None = None


class Metric(Protocol):
    """A plug-in score: samples by kind -> named numbers (embeddings.py, toy/scoring.py)."""

    def __call__(self, samples: dict[str, Samples]) -> dict[str, float]: ...


@dataclass
class Evaluation:
    settings: Settings
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> metric -> per seed
    previews: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> kind -> first samples
    preview_prompts: dict[str, list[str]] = field(default_factory=dict)  # kind -> their prompts
    models: dict[str, str] = field(default_factory=dict)  # name -> where its weights came from

    def summary(self) -> dict[str, dict[str, dict]]:
        """model -> metric -> {"mean", "std" (population, over seeds), "per_seed"}."""
        return {model: {k: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "per_seed": v}
                        for k, v in metrics.items()} for model, metrics in self.scores.items()}


def expand(prompts: list[Prompt], settings: Settings) -> dict[str, list[str]]:
    """kind -> one prompt text per sample (a prompt's samples consecutive), kinds in KINDS order."""
    texts = {}
    for kind in KINDS:
        rows = [p for p in prompts if p.kind == kind]
        if rows:
            texts[kind] = [p.text for p in rows for _ in range(p.samples or settings.samples_per_prompt)]
    return texts


@torch.no_grad()
def draw(family, model, contexts: list, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Latents (float32, CPU) of `noise` sampled chunk by chunk, each with its context."""
    out, start = [], 0
    for context in contexts:
        x = noise[start:start + len(context)].to(family.device)
        out.append(euler_sample(velocity_fn(family, model, context), x, sigmas).cpu())
        start += len(context)
    return torch.cat(out)


def sample_kind(family, model, texts: list[str], contexts: list, seed: int, kind: str,
                settings: Settings) -> Samples:
    """One model's samples of one kind at one seed (and their many-step reference)."""
    size = settings.size
    generator = torch.Generator().manual_seed(seed + NOISE_STREAM[kind])
    noise = torch.randn(family.latent_shape(len(texts), size, size), generator=generator)
    latents = draw(family, model, contexts, noise, family.inference_sigmas(settings.steps, size, size))
    samples = Samples(texts, decode_one_by_one(family, latents), latents)
    if settings.reference_steps:
        reference = draw(family, model, contexts, noise, family.inference_sigmas(settings.reference_steps, size, size))
        samples.reference_latents, samples.reference_images = reference, decode_one_by_one(family, reference)
    return samples


def builtin_scores(samples: dict[str, Samples], base_prior: Samples | None, sharpness: float) -> dict[str, float]:
    """Retention (with references), prior drift (given the base's prior samples) and sharpness."""
    every = list(samples.values())
    scores = {}
    if every[0].reference_images is not None:
        scores |= distances("retention", torch.cat([s.images for s in every]),
                            torch.cat([s.reference_images for s in every]),
                            torch.cat([s.latents for s in every]), torch.cat([s.reference_latents for s in every]))
    if base_prior is not None:
        mine = samples["prior"]
        scores |= distances("prior_drift", mine.images, base_prior.images, mine.latents, base_prior.latents)
    scores["sharpness"] = sharpness
    return scores


def evaluate(family, exports: dict[str, str | Path], prompts: list[Prompt], settings: Settings,
             metrics: list[Metric] = (), log=print) -> Evaluation:
    """The base (BASE) and every export sampled and scored (module docstring).

    Every export is checked against the base first: a ValueError naming the problem comes
    before any sampling. Models run one after another, the base first; an export is applied
    to the base for its turn only (exports.applied)."""
    for path in exports.values():
        problem = export_problem(path) or base_mismatch(family.transformer, path)
        if problem:
            raise ValueError(problem)
    texts = expand(prompts, settings)
    step = settings.batch_size
    contexts = {kind: [family.student_context(t[i:i + step]) for i in range(0, len(t), step)]
                for kind, t in texts.items()}
    result = Evaluation(settings)
    base_prior: dict[int, Samples | None] = {}  # per seed, the base's: for the exports' prior drift
    base_energy: dict[int, float] = {}  # and sharpness
    for name, path in [(BASE, None), *exports.items()]:
        with applied(family.transformer, path) as model:
            for seed in settings.seeds:
                samples = {k: sample_kind(family, model, t, contexts[k], seed, k, settings) for k, t in texts.items()}
                energy = high_frequency_energy(torch.cat([s.images for s in samples.values()])).mean().item()
                if name == BASE:
                    base_prior[seed], base_energy[seed] = samples.get("prior"), energy
                scores = builtin_scores(samples, base_prior[seed] if name != BASE else None,
                                        energy / base_energy[seed] if base_energy[seed] else 1.0)
                for metric in metrics:
                    scores |= metric(samples)
                for k, v in scores.items():
                    result.scores.setdefault(name, {}).setdefault(k, []).append(v)
                if seed == settings.seeds[0]:
                    result.previews[name] = {k: s.images[_preview_picks(len(s.images))] for k, s in samples.items()}
                    result.preview_prompts = {k: [s.prompts[i] for i in _preview_picks(len(s.images))]
                                              for k, s in samples.items()}
                log(f"eval {name} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return result


def _preview_picks(n: int) -> list[int]:
    """Up to PREVIEW_COLUMNS indices spread over n samples (one per prompt when they fit)."""
    return sorted({i * n // min(n, PREVIEW_COLUMNS) for i in range(min(n, PREVIEW_COLUMNS))})


# -- output -----------------------------------------------------------------------------------

def markdown_table(summary: dict[str, dict[str, dict]], title: str = "metric") -> str:
    """One row per metric, one column per model: mean ± std over seeds ("-" where a model has none)."""
    models = list(summary)
    seen = dict.fromkeys(k for m in models for k in summary[m])
    metrics = sorted(seen, key=lambda k: next((i for i, g in enumerate(TABLE_ORDER) if k.startswith(g)), len(TABLE_ORDER)))
    lines = [f"| {title} | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for metric in metrics:
        cells = []
        for model in models:
            s = summary[model].get(metric)
            cells.append("-" if s is None else f"{s['mean']:.4g} ± {s['std']:.2g}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preview_grids(result: Evaluation) -> dict:
    """kind -> a PIL grid of the first seed's samples: one row per model, one column per prompt."""
    steps = result.settings.steps
    return {kind: sample_grid([list(by_kind[kind]) for by_kind in result.previews.values()],
                              [f"{model} ({steps} steps)" for model in result.previews],
                              [p[:40] for p in prompts])
            for kind, prompts in result.preview_prompts.items()}
