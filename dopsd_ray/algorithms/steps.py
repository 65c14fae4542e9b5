"""From a batch of (images, captions) to a loss, for every mode.

This is where the algorithm meets a model family and its weights: contexts are built,
noise is drawn, velocity functions are bound to (weights, context), and the pure
functions in dopsd.py / sft.py do the math. Still no Ray, MLflow or DeepSpeed here:
the learner calls these functions and owns backward / clip / optimizer step / EMA.

    colocated (the recipe):    loss = colocated_loss(..., backward)
    disaggregated, rollout:    exp = make_experience(...)       (no grad, frozen snapshot)
    disaggregated, learner:    loss = experience_loss(exp, ..., backward)

`backward(loss_share, last)`: the learner's backward, called on each trained state's share
of the loss as soon as it is scored (dopsd.py), once for SFT; the returned loss is then
detached. Without it the returned loss carries the graph and the caller backpropagates it.
"""

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .dopsd import Backward, choose_states, scored, dopsd_loss_on_states, dopsd_step, rollout_states, teacher_targets
from .schedules import sample_sft_sigmas
from .sft import sft_loss
from ..tensors import to_device


def velocity_fn(family, model, context):
    """Bind (family, weights, context) into v(x, sigma) for the pure algorithm."""
    return lambda x, sigma: family.velocity(model, x, sigma, context)


def batch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """Noise and state-subset randomness for batch `index` of data stream `stream`.

    Colocated learner rank r and rollout worker r draw the same numbers for the same
    batch, so both modes can be compared step for step.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + stream * 10_007 + index)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], one bucket
    captions: list[str]
    ids: list[str]
    index: int = 0  # position in its data stream (seeds the noise)
    stream: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.shape[0] != len(self.captions):
            raise ValueError(
                f"batch has {tuple(self.images.shape)} images for {len(self.captions)} captions: "
                "give one (3, H, W) image per caption, stacked to (B, 3, H, W)")
        empty = [i for i, c in enumerate(self.captions) if not isinstance(c, str) or not c.strip()]
        if empty:
            raise ValueError(f"captions at positions {empty} are empty or not strings: every image needs a caption")

    @property
    def generator(self) -> torch.Generator:
        return batch_generator(self.seed, self.stream, self.index)


@dataclass(frozen=True)
class RolloutRestart:
    """Put in the experience queue by a rollout worker that is a restarted process (the
    learner counts it: `count/rollout_restarts`)."""

    index: int


@dataclass(frozen=True)
class RolloutLost:
    """Put in the experience queue by the driver (nodes.RolloutWatch), one per learner rank, when
    a rollout worker did not come back after losing its process or node: the learners stop."""

    message: str


@dataclass
class Experience:
    """What a rollout worker hands the learner: one roll-out of one batch."""

    ids: list[str]
    version: int  # weight snapshot that produced it: the learner step it was taken at
    algorithm: str  # "dopsd" | "sft"
    student_context: Any
    teacher_context: Any = None
    sigmas: torch.Tensor | None = None  # dopsd: (K + 1,)
    states: torch.Tensor | None = None  # dopsd: (K, *latent)
    train_states: list[int] = field(default_factory=list)
    targets: torch.Tensor | None = None  # teacher velocities, when computed on the worker
    latents: torch.Tensor | None = None  # sft: x0
    noise: torch.Tensor | None = None  # sft: eps
    sft_sigmas: torch.Tensor | None = None  # sft: (B,)
    rollout_seconds: float = 0.0
    snapshot_digest: str | None = None  # debug: fingerprint of the worker's student weights
    generation: int = 0  # which learner process published that snapshot (Learner.generation)

    def to(self, device, non_blocking: bool = False) -> "Experience":
        """A copy with every tensor (contexts included) on `device`: rollout workers queue CPU
        tensors, the learner moves them onto its own GPU."""
        return to_device(self, device, non_blocking)

    @property
    def num_trained_states(self) -> int:
        batch = len(self.ids)
        return batch * (len(self.train_states) if self.algorithm == "dopsd" else 1)


@torch.no_grad()
def _inputs(family, batch: Batch, sigmas: torch.Tensor, algo) -> dict:
    """What a step starts from, for both the learner (colocated) and a rollout worker: the
    student context, then for SFT (x0, eps, sigmas), for D-OPSD the teacher context, the
    noise and the trained states. Random draws come from the batch's generator in this one
    order, so both sides draw the same numbers for the same batch."""
    family.check_images(batch.images)
    gen = batch.generator
    _, _, height, width = batch.images.shape
    images = batch.images.to(family.device)
    out = {"c_s": family.student_context(batch.captions)}
    if algo.name == "sft":
        out["x0"], out["noise"], out["sft_sigmas"] = _sft_inputs(family, images, gen, algo)
        return out
    out["c_t"] = family.teacher_context(batch.captions, images)
    # noise is drawn on the CPU (the same numbers on every device), then moved to the model
    out["noise"] = torch.randn(family.latent_shape(len(batch.captions), height, width), generator=gen).to(family.device)
    out["train"] = choose_states(len(sigmas) - 1, algo.states_per_rollout, gen)
    return out


def colocated_loss(family, weights, batch: Batch, sigmas: torch.Tensor, algo,
                   backward: Backward | None = None) -> tuple[torch.Tensor, dict]:
    """One step of the released recipe (dopsd) or of baseline SFT, computed by the learner."""
    inputs = _inputs(family, batch, sigmas, algo)
    if algo.name == "sft":
        return _sft(family, weights, inputs["c_s"], inputs["x0"], inputs["noise"], inputs["sft_sigmas"], backward)
    c_s, c_t, noise, train = inputs["c_s"], inputs["c_t"], inputs["noise"], inputs["train"]

    def teacher(x, sigma):
        with weights.teacher() as model:
            return family.velocity(model, x, sigma, c_t)

    out = dopsd_step(velocity_fn(family, weights.model, c_s), teacher, noise, sigmas, algo.loss_space, train, backward)
    return out.loss, _dopsd_metrics(out.state_losses, sigmas, train, len(batch.captions))


def _sft_inputs(family, images, gen, algo):
    """x0 = latents of the target images, eps, and per-sample logit-normal shifted sigmas."""
    _, _, height, width = images.shape
    x0 = family.encode_images(images)
    noise = torch.randn(x0.shape, generator=gen).to(family.device)
    sigmas = sample_sft_sigmas(family, x0.shape[0], height, width, algo.inference_steps, gen,
                               algo.sft_logit_mean, algo.sft_logit_std)
    return x0, noise, sigmas


def _sft(family, weights, c_s, x0, noise, sft_sigmas, backward: Backward | None):
    loss = scored(sft_loss(velocity_fn(family, weights.model, c_s), x0, noise, sft_sigmas), 1, True, backward)
    return loss, {"loss/sft": loss.item(), "trained_states": x0.shape[0]}


def _dopsd_metrics(state_losses: list[float], sigmas, train, batch_size: int) -> dict:
    metrics = {"loss/dopsd": sum(state_losses) / len(state_losses), "trained_states": batch_size * len(train)}
    for k, l in zip(train, state_losses):
        metrics[f"loss/state_{k}_sigma_{float(sigmas[k]):.3f}"] = l
    return metrics


@torch.no_grad()
def make_experience(family, weights, batch: Batch, sigmas: torch.Tensor, algo, version: int, with_targets: bool) -> Experience:
    """A rollout worker's job: contexts, K student steps without grad, optional teacher targets."""
    start = time.perf_counter()
    inputs = _inputs(family, batch, sigmas, algo)
    c_s = inputs["c_s"]
    if algo.name == "sft":
        return Experience(batch.ids, version, "sft", c_s, latents=inputs["x0"], noise=inputs["noise"],
                          sft_sigmas=inputs["sft_sigmas"], rollout_seconds=time.perf_counter() - start)
    c_t, noise, train = inputs["c_t"], inputs["noise"], inputs["train"]
    states = rollout_states(velocity_fn(family, weights.model, c_s), noise, sigmas)
    targets = None
    if with_targets:
        with weights.teacher() as model:
            targets = teacher_targets(velocity_fn(family, model, c_t), states, sigmas, train)
        c_t = None  # the learner no longer needs the teacher context
    return Experience(batch.ids, version, "dopsd", c_s, c_t, sigmas, states, train, targets,
                      rollout_seconds=time.perf_counter() - start)


def experience_loss(family, weights, exp: Experience, algo,
                    backward: Backward | None = None) -> tuple[torch.Tensor, dict]:
    """The learner's side of a disaggregated step."""
    if exp.algorithm == "sft":
        return _sft(family, weights, exp.student_context, exp.latents, exp.noise, exp.sft_sigmas, backward)
    student = velocity_fn(family, weights.model, exp.student_context)
    if exp.targets is not None:
        loss, state_losses = dopsd_loss_on_states(
            student, exp.states, exp.sigmas, exp.train_states, targets=exp.targets, loss_space=algo.loss_space,
            backward=backward)
    else:
        def teacher(x, sigma):
            with weights.teacher() as model:
                return family.velocity(model, x, sigma, exp.teacher_context)

        loss, state_losses = dopsd_loss_on_states(
            student, exp.states, exp.sigmas, exp.train_states, teacher=teacher, loss_space=algo.loss_space,
            backward=backward)
    return loss, _dopsd_metrics(state_losses, exp.sigmas, exp.train_states, len(exp.ids))
