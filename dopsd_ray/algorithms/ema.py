"""EMA teacher update: teacher <- decay * teacher + (1 - decay) * student."""

from typing import Iterable

import torch


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], decay: float) -> None:
    """In place, after every optimizer step. decay 0 copies the student."""
    for t, s in zip(teacher, student, strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
