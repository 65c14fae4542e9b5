"""Agreement between learner ranks: the one place torch.distributed collectives are called.

GPU learners talk over NCCL, which has no CPU backend: a collective on a CPU tensor
raises at step 1. So every tensor here is made on the learner's device (CUDA under
NCCL, CPU under gloo), and callers pass and get plain Python values. The ZeRO-3
gathers inside DeepSpeed and the weight-sync group of sync/collective.py are their own
groups, with their own buffers, and do not come through here.
"""

import torch
import torch.distributed as dist


class LearnerRanks:
    """The learner's default process group, seen from rank `rank` of `world`."""

    def __init__(self, rank: int, world: int, device: torch.device | str):
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def all_true(self, ok: bool | torch.Tensor) -> bool:
        """True on every rank only if `ok` holds on every rank (a MAX of the "not ok" flags)."""
        bad = torch.tensor([0.0 if bool(ok) else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Every value of every tensor, on every rank, is finite (one host sync, not one per tensor)."""
        flags = [torch.isfinite(t.detach()).all().to(self.device) for t in tensors]
        return self.all_true(bool(torch.stack(flags).all()) if flags else True)

    def from_rank0(self, value: int) -> int:
        """Rank 0's integer, on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sum(self, values: list) -> list[float]:
        """Element-wise sums over the ranks of numbers, bools or one-element tensors (float64:
        step statistics, counts and flags): one collective, one host sync."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(()) for v in values])
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()
