"""Build the toy base: what `python jobs/build_toy_base.py` runs (README, "The miniature").

1. a multi-step flow-matching model (below), then an evaluator (evaluator.py) trained on
   renders unless one is already in the output folder;
2. the flow-matching model is trained on the world with two kinds of context:
   text only ("a red triangle on a black background") and multimodal (caption tokens +
   image tokens of ANOTHER render with the same attributes; in half of those the caption
   names the subject with a meaningless placeholder word, so the model learns to take the
   subject from the image) - the in-context teacher D-OPSD relies on;
3. a 4-step student distilled from it: the flow model's 24-step Euler trajectories are
   recorded at the 4-step grid sigmas (1, .9, .75, .5, 0) and the student learns each
   segment in one Euler step, v = (x_{k+1} - x_k) / (s_{k+1} - s_k), for both kinds of
   context. Its 4-step samples are sharp where the flow model's 4-step samples blur;
4. figures: classifier accuracy, confidence and palette share of each model at 4 and 32
   steps, and of the teacher context (placeholder caption + image), plus a sample grid.

Each phase runs for a time budget, so the build fits a bounded background run.
"""

import copy
import json
import time
from pathlib import Path

import torch

from ..algorithms.ema import ema_update
from ..algorithms.sampling import euler_sample
from ..algorithms.steps import velocity_fn
from ..families.toy import INFERENCE_STEPS, ToyContext, ToyFamily, build_encoders, build_tokenizer, build_unet
from . import world
from .evaluator import Evaluator, agreement, evaluate, rendered_batch, train_evaluator


def render_items(items: list[world.Item], generator: torch.Generator) -> torch.Tensor:
    return torch.stack([world.render(i.colour, i.shape, i.background, generator) for i in items])


def placeholder_caption(item: world.Item, generator: torch.Generator) -> str:
    word = world.PLACEHOLDERS[torch.randint(len(world.PLACEHOLDERS), (1,), generator=generator).item()]
    return world.concept_caption(word, item.background)


def mixed_context(family: ToyFamily, items: list[world.Item], generator: torch.Generator,
                  p_multimodal: float = 0.5, p_placeholder: float = 0.5) -> ToyContext:
    """Per item: text-only, or caption (maybe a placeholder subject) + tokens of another render.

    Text-only items get the image tokens masked out of cross-attention, which is exactly
    the text-only context (masked keys get zero attention).
    """
    multimodal = torch.rand(len(items), generator=generator) < p_multimodal
    placeholder = torch.rand(len(items), generator=generator) < p_placeholder
    captions = [placeholder_caption(i, generator) if m and p else i.caption
                for i, m, p in zip(items, multimodal.tolist(), placeholder.tolist())]
    ctx = family.teacher_context(captions, render_items(items, generator))
    n_text = family.max_sequence_length
    ctx.mask[:, n_text:] &= multimodal.view(-1, 1).to(ctx.mask.device)
    return ctx


def sample(family, model, ctx: ToyContext, num_steps: int, seed: int) -> torch.Tensor:
    noise = torch.randn(family.latent_shape(len(ctx), world.SIZE, world.SIZE), generator=torch.Generator().manual_seed(seed))
    sigmas = family.inference_sigmas(num_steps, world.SIZE, world.SIZE)
    with torch.no_grad():
        return family.decode_latents(euler_sample(velocity_fn(family, model, ctx), noise, sigmas))


class Budget:
    """A wall-clock budget for a training loop: counts its steps, logs progress every 100."""

    def __init__(self, name: str, minutes: float, log=print):
        self.name, self.log, self.step = name, log, 0
        self.t0 = time.monotonic()
        self.end = self.t0 + 60 * minutes

    def left(self) -> bool:
        return time.monotonic() < self.end

    def tick(self, loss: torch.Tensor) -> None:
        self.step += 1
        if self.step % 100 == 0:
            rate = self.step / (time.monotonic() - self.t0)
            self.log(f"{self.name} step {self.step}: loss {loss.item():.4f} ({rate:.2f} steps/s)")

    def done(self) -> int:
        self.log(f"{self.name}: {self.step} steps in {(time.monotonic() - self.t0) / 60:.1f} min")
        return self.step


def train_step(opt, model, ema, loss: torch.Tensor, ema_decay: float) -> None:
    """backward, clip the grad norm to 1, AdamW step, EMA update (decay 0 copies)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(list(ema.parameters()), list(model.parameters()), ema_decay)


def train_flow(family, minutes, batch_size, seed, lr=1e-3, ema_decay=0.999, log=print):
    """Flow matching (v = eps - x0, sigma ~ U(0, 1)) with an EMA copy; returns the EMA model."""
    model = family.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    budget = Budget("flow", minutes, log)
    while budget.left():
        items = world.random_items(batch_size, g)
        ctx = mixed_context(family, items, g)
        x0 = family.encode_images(render_items(items, g))
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch_size, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        loss = (family.velocity(model, (1 - s) * x0 + s * eps, sigma, ctx) - (eps - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (budget.step + 1) / 200)
        train_step(opt, model, ema, loss, ema_decay if budget.step > 200 else 0.0)
        budget.tick(loss)
    return ema, budget.done()


def record_trajectories(family, teacher, n, batch_size, seed, steps=24, log=print):
    """The flow model's Euler trajectories at the 4-step grid: x (n, 5, C, h, w) + contexts."""
    g = torch.Generator().manual_seed(seed)
    sigmas = family.inference_sigmas(steps, world.SIZE, world.SIZE)
    every = steps // INFERENCE_STEPS
    xs, feats, masks = [], [], []
    for start in range(0, n, batch_size):
        ctx = mixed_context(family, world.random_items(batch_size, g), g)
        x = torch.randn(family.latent_shape(batch_size, world.SIZE, world.SIZE), generator=g)
        states = [x]
        with torch.no_grad():
            for i in range(steps):
                x = x + (sigmas[i + 1] - sigmas[i]) * family.velocity(teacher, x, sigmas[i], ctx)
                if (i + 1) % every == 0:
                    states.append(x)
        xs.append(torch.stack(states, 1))
        feats.append(ctx.features)
        masks.append(ctx.mask)
        log(f"trajectories: {start + batch_size}/{n}")
    return torch.cat(xs), torch.cat(feats), torch.cat(masks)


def distill(family, teacher, minutes, batch_size, seed, pool, lr=2e-4, ema_decay=0.999, log=print):
    """4-step student: each grid segment of the teacher's trajectory in one Euler step."""
    xs, feats, masks = pool
    grid = family.inference_sigmas(INFERENCE_STEPS, world.SIZE, world.SIZE)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    budget = Budget("distill", minutes, log)
    while budget.left():
        idx = torch.randint(len(xs), (batch_size,), generator=g)
        k = torch.randint(INFERENCE_STEPS, (batch_size,), generator=g)
        x_k, x_next = xs[idx, k], xs[idx, k + 1]
        s, s_next = grid[k], grid[k + 1]
        target = (x_next - x_k) / (s_next - s).view(-1, 1, 1, 1)
        ctx = ToyContext(feats[idx], masks[idx])
        loss = (family.velocity(student, x_k, s, ctx) - target).pow(2).mean()
        train_step(opt, student, ema, loss, ema_decay if budget.step > 100 else 0.0)
        budget.tick(loss)
    return ema, budget.done()


def base_figures(family, evaluator: Evaluator, models: dict, n: int = 192, seed: int = 123) -> tuple[dict, dict]:
    """Scores of each model at 4 and 32 steps on text prompts, and of the teacher context
    (placeholder caption + an image of the subject) at 4 steps; and the samples, for a grid."""
    g = torch.Generator().manual_seed(seed)
    items = world.random_items(n, g)
    text_ctx = family.student_context([i.caption for i in items])
    teacher_ctx = family.teacher_context([placeholder_caption(i, g) for i in items], render_items(items, g))
    figures, samples = {}, {"target": render_items(items, torch.Generator().manual_seed(seed + 1))}
    for name, model in models.items():
        four, many = sample(family, model, text_ctx, INFERENCE_STEPS, seed), sample(family, model, text_ctx, 32, seed)
        teacher = sample(family, model, teacher_ctx, INFERENCE_STEPS, seed)
        figures[name] = {"4_steps": evaluate(evaluator, four, items), "32_steps": evaluate(evaluator, many, items),
                         "agreement_4_vs_32": agreement(evaluator, four, many),
                         "teacher_context_4_steps": evaluate(evaluator, teacher, items)}
        samples.update({f"{name} 4 steps": four, f"{name} 32 steps": many, f"{name} teacher ctx": teacher})
    return figures, samples


def load_or_train_evaluator(path: Path, seed: int = 0, log=print) -> Evaluator:
    """The evaluator at `path` (e.g. trained meanwhile by `python -m dopsd_ray.toy.evaluator`), or train it now."""
    if path.is_file():
        return Evaluator.load(path)
    evaluator = train_evaluator(seed=seed, log=log)
    evaluator.save(path)
    return evaluator


def build_base(out: Path, flow_minutes: float, distill_minutes: float, batch_size: int = 32, seed: int = 0,
               pool_size: int = 1536, log=print, figure_samples: int = 192) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tokenizer = build_tokenizer(world.vocabulary())
    text_encoder, vision = build_encoders(tokenizer, world.SIZE, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        unet = build_unet(world.SIZE)
    family = ToyFamily(transformer=unet, text_encoder=text_encoder, vision_encoder=vision, tokenizer=tokenizer,
                       max_sequence_length=12)
    log(f"toy UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    flow, flow_steps = train_flow(family, flow_minutes, batch_size, seed, log=log)
    family.save_pretrained(out / "flow", transformer=flow)  # the multi-step model, for reference
    pool = record_trajectories(family, flow, pool_size, 64, seed + 2, log=log)
    student, distill_steps = distill(family, flow, distill_minutes, batch_size, seed, pool, log=log)
    family.save_pretrained(out, transformer=student)
    figures = write_figures(out, family, flow, student, seed, log, figure_samples)
    figures.update({"flow_steps": flow_steps, "distill_steps": distill_steps, "batch_size": batch_size,
                    "minutes": round((time.monotonic() - t0) / 60, 1)})
    (out / "base_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def write_figures(out: Path, family, flow, student, seed: int = 0, log=print, figure_samples: int = 192) -> dict:
    """The evaluator (trained unless `out` has one) and a sample grid (base_samples.png)
    in `out`; returns the flow model's and the student's figures on `figure_samples` prompts, for
    base_figures.json."""
    from ..grid import sample_grid

    evaluator = load_or_train_evaluator(out / "evaluator.safetensors", seed, log)
    images, items = rendered_batch(512, torch.Generator().manual_seed(seed + 99))
    clean = evaluate(evaluator, images, items)
    log(f"evaluator on 512 fresh renders: accuracy {clean['accuracy']:.3f}, palette share {clean['palette_share']:.3f}")
    figures, samples = base_figures(family, evaluator, {"flow": flow, "distilled": student}, n=figure_samples)
    figures.update({"evaluator_on_renders": clean, "unet_parameters": sum(p.numel() for p in student.parameters()),
                    "sigmas_4_steps": family.inference_sigmas(INFERENCE_STEPS, world.SIZE, world.SIZE).tolist()})
    cols = 8
    rows = [list(v[:cols]) for v in samples.values()]
    sample_grid(rows, list(samples), [i.caption[2:] for i in world.random_items(cols, torch.Generator().manual_seed(123))]
                ).save(out / "base_samples.png")
    return figures
