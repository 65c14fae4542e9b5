"""The learning rate of every optimizer step: a pure function of the step.

Nothing is stateful: the learner sets lr_at(step, ...) on the optimizer before each step,
so a resumed run needs only the checkpointed step to continue the schedule exactly.

    step s: the 0-based index of the optimizer update about to be made (s = 0 is the first)
    W = optim.warmup_steps, T = train.steps (total optimizer updates)

    warm-up, s < W:   lr * (s + 1) / (W + 1)       rising linearly, W updates below lr
    after,   s >= W:  lr * f(p),  p = (s - W) / (T - W) in [0, 1)
                      constant: f = 1;  linear: f = 1 - p;  cosine: f = (1 + cos(pi p)) / 2

After the warm-up this is diffusers' get_scheduler (constant_with_warmup, linear, cosine):
the last update (s = T - 1) still uses a small, non-zero rate. During the warm-up diffusers
uses s / W, which gives the first update lr = 0, an update that changes nothing; here the
ramp is shifted by one so every one of the W warm-up updates counts.
"""

import math


def lr_at(step: int, optim, total_steps: int) -> float:
    """The learning rate of optimizer update `step` (0-based) of `total_steps`; `optim` is the
    config's optim section (lr, scheduler, warmup_steps)."""
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if optim.scheduler == "constant":
        factor = 1.0
    elif optim.scheduler == "linear":
        factor = max(0.0, 1.0 - progress)
    elif optim.scheduler == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    else:
        raise ValueError(f"optim.scheduler={optim.scheduler!r}: use constant, linear or cosine")
    return optim.lr * factor
