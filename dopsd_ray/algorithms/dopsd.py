"""The D-OPSD step (docs/method.md, "One training step"), in plain PyTorch.

The algorithm sees velocity functions only: `student(x, sigma)` and `teacher(x, sigma)`
return v = eps - x0 with their contexts already bound (steps.velocity_fn). It knows
nothing of Ray, DeepSpeed or model families.

Colocated (the released recipe): `dopsd_step` rolls out from noise with the student's
own Euler steps; the student forward that advances the chain is the one in the loss.
Disaggregated: a rollout worker calls `rollout_states` with a frozen snapshot and the
learner calls `dopsd_loss_on_states`; with the same weights both give the same loss.

Backward per trained state: given `backward`, both call it on each trained state's share of
the loss (its loss / the number of trained states) as soon as that state is scored, so one
state's graph is alive at a time instead of K: the step's activation memory is a single
state's, like SFT at the same batch. The gradients are those of the mean loss, which is
then returned detached. Without `backward` the caller backpropagates the mean loss itself.
"""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .sampling import euler_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Backward = Callable[[torch.Tensor, bool], None]  # (a state's share of the loss, is it the last one)


def state_loss(v_student: torch.Tensor, v_teacher: torch.Tensor, sigma: torch.Tensor, space: str) -> torch.Tensor:
    """D(v_S, v_T, sigma): velocity MSE (paper) or x0 MSE = sigma^2 * velocity MSE (recipe)."""
    mse = (v_student.float() - v_teacher.float()).pow(2).mean()
    if space == "velocity":
        return mse
    if space == "x0":
        return sigma.float() ** 2 * mse
    raise ValueError(f"loss space must be 'x0' or 'velocity', got {space!r}")


def choose_states(num_states: int, states_per_rollout: int | None, generator: torch.Generator | None) -> list[int]:
    """All K states (the recipe's default) or a random subset of m of them."""
    if states_per_rollout is None or states_per_rollout >= num_states:
        return list(range(num_states))
    picked = torch.randperm(num_states, generator=generator)[:states_per_rollout]
    return sorted(picked.tolist())


@dataclass
class DopsdOutput:
    loss: torch.Tensor  # mean over trained states; carries the student's graph unless backward was given
    state_losses: list[float]  # detached, one per trained state
    states: torch.Tensor  # (K, *latent) the visited states x_k, detached


def dopsd_step(
    student: VelocityFn, teacher: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
    loss_space: str = "x0", train_states: Sequence[int] | None = None, backward: Backward | None = None,
) -> DopsdOutput:
    """Roll out K student Euler steps from noise and match the teacher on every visited state.

    The caller does the backward (`out.loss.backward()`, or `backward` per state), clipping,
    the optimizer step and the EMA update.
    """
    num_states = len(sigmas) - 1
    train_states = sorted(set(range(num_states) if train_states is None else train_states))
    x = noise.float()
    states, losses = [], []
    for k in range(num_states):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        states.append(x)
        if k in train_states:
            with torch.no_grad():  # only where a loss is taken: a state not trained on needs no target
                v_teacher = teacher(x, sigma)  # the teacher sees the STUDENT's state
            v_student = student(x, sigma)
            losses.append(scored(state_loss(v_student, v_teacher, sigma, loss_space), len(train_states),
                                  k == train_states[-1], backward))
        else:
            with torch.no_grad():
                v_student = student(x, sigma)
        # the student's own Euler step; no backprop through the chain
        x = euler_step(x, sigma, sigma_next, v_student.detach())
    loss = torch.stack(losses).mean()
    return DopsdOutput(loss, [l.item() for l in losses], torch.stack(states))


def scored(loss: torch.Tensor, num_trained: int, last: bool, backward: Backward | None) -> torch.Tensor:
    """A trained state's loss (SFT: the batch's), backpropagated now as its share of the mean of
    `num_trained` when `backward` is given, and then detached."""
    if backward is None:
        return loss
    backward(loss / num_trained, last)
    return loss.detach()


@torch.no_grad()
def rollout_states(student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The K states x_0..x_{K-1} a student roll-out visits (x_0 = noise), without grad."""
    x = noise.float()
    states = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        states.append(x)
        x = euler_step(x, sigma, sigma_next, student(x, sigma))
    return torch.stack(states)


@torch.no_grad()
def teacher_targets(teacher: VelocityFn, states: torch.Tensor, sigmas: torch.Tensor, train_states: Sequence[int]) -> torch.Tensor:
    """Teacher velocities on the chosen states, (len(train_states), *latent)."""
    return torch.stack([teacher(states[k], sigmas[k]).float() for k in train_states])


def dopsd_loss_on_states(
    student: VelocityFn, states: torch.Tensor, sigmas: torch.Tensor, train_states: Sequence[int],
    teacher: VelocityFn | None = None, targets: torch.Tensor | None = None, loss_space: str = "x0",
    backward: Backward | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The learner's side of a disaggregated step: score pre-rolled states.

    Teacher velocities come from `teacher` (computed here, on the learner) or from
    `targets` (computed by the rollout worker with its EMA-teacher snapshot).
    """
    if (teacher is None) == (targets is None):
        raise ValueError("give exactly one of teacher (a velocity function) or targets (precomputed)")
    if targets is None:
        targets = teacher_targets(teacher, states, sigmas, train_states)
    losses = []
    for i, k in enumerate(train_states):
        v_student = student(states[k], sigmas[k])
        losses.append(scored(state_loss(v_student, targets[i], sigmas[k], loss_space), len(train_states),
                              i == len(train_states) - 1, backward))
    loss = torch.stack(losses).mean()
    return loss, [l.item() for l in losses]
