"""DeepSpeed around the learner's trainable weights: its config, one backward per loss share,
and the step. No Ray here: benchmarks/gpu_check.py and the tests build it in one process.

    engine = Engine(weights, cfg, frozen_base)   AdamW + deepspeed.initialize (ZeRO-3 by default)
    finite = engine.backward(loss, last)         a local flag tensor: no host sync, no collective
    applied = engine.finish(finite, ranks)       clip + AdamW; False (nothing changed) when any
                                                 rank's loss or gradients were not finite

A non-finite loss loses the whole step, but the step's earlier backwards are accumulated
already, and where depends on the ZeRO stage. So its share is backpropagated times NaN:
the gradients become NaN, the gradient reduction spreads them to every rank, and the
overflow check at the step's end skips it on every rank (DeepSpeed's own check for ZeRO
1-3, agreed inside DeepSpeed; stage 0, plain data parallel, never checks, so finish()
checks the gradients there, the one agreement of ours inside a step).
"""

import math

import deepspeed
import torch
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from ..config import Config
from ..ranks import LearnerRanks


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's settings, all in one place.

    - bf16 with check_grad_overflow: ZeRO-1/2 apply non-finite gradients without it (it is
      DeepSpeed 0.19's default, not older versions'; ZeRO-3 always checks).
    - offload_optimizer with our torch AdamW: DeepSpeed refuses a torch optimizer with
      offload unless zero_force_ds_cpu_optimizer is off. torch's AdamW then steps the
      fp32 masters on the CPU (slower than DeepSpeedCPUAdam, but it needs no compiled op
      and keeps one optimizer for every setting).
    """
    rt = cfg.runtime
    zero = {"stage": rt.zero_stage}
    if rt.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16", "check_grad_overflow": True},
        "steps_per_print": 10**9,
    }


def peak_memory_bytes() -> int:
    """Peak GPU memory of this rank, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def backward_micro(engine, loss: torch.Tensor, last: bool) -> torch.Tensor:
    """engine.backward of one loss (a micro-batch's SFT loss, or one D-OPSD state's share of a
    micro-batch's loss); returns whether it was finite, as a bool tensor on its device.

    A non-finite loss is backpropagated times NaN (module docstring). `last`: the step's last
    backward, which reduces the gradients (DeepSpeed's accumulation boundary); set on every
    call, so it never depends on DeepSpeed's own count of micro-batches, which a skipped
    stage-0 step breaks.
    """
    finite = torch.isfinite(loss.detach())
    if isinstance(engine.optimizer, ZeROOptimizer):
        # What engine.forward does first. The learner calls the module itself (the family's
        # velocity), and without this ZeRO-3 takes every backward of a step for the step's first
        # and overwrites the gradients accumulated so far with its own.
        engine.optimizer.clear_backward_seen_flag()
    engine.set_gradient_accumulation_boundary(last)
    scale = torch.where(finite, 1.0, math.nan).to(loss.dtype)
    engine.backward(loss * scale)  # scaled by 1 / grad_accum: the mean gradient
    return finite


def finish_step(engine, ranks: LearnerRanks, zero_stage: int, finite: torch.Tensor | bool) -> bool:
    """The optimizer step after the step's last backward_micro; False if nothing was applied.

    `finite`: this rank's micro-batch losses were all finite. With ZeRO stages 1-3 DeepSpeed
    itself skips the optimizer step when the global grad norm is not finite (fp32, and bf16
    with check_grad_overflow) and says so in was_step_applied(), the same on every rank;
    stage 0 never checks, so its gradients are checked here and dropped before the step.
    """
    if zero_stage == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        flag = torch.where(torch.as_tensor(finite), 0.0, math.nan)  # NaN where this rank's loss was not finite
        if not ranks.all_finite([flag, *grads]):
            engine.optimizer.zero_grad()  # drop them: the optimizer's accumulation (bf16) ...
            engine.zero_grad()  # ... and the module's; no optimizer step
            return False
    engine.step()  # clips to optim.grad_clip, AdamW step, zero grads
    return engine.was_step_applied()


def release_stale_gathers(params) -> None:
    """Drop the whole copies ZeRO-3 keeps of small parameters, so their next use re-gathers.

    Parameters under stage3_param_persistence_threshold stay gathered between steps, and
    DeepSpeed re-gathers them right after the optimizer step: before the EMA writes the
    teacher's shards. Without this the teacher forward (and every gather for a sync or a
    checkpoint) would read its small tensors one EMA step late. Freeing a whole copy is
    local to each rank (no collective); every rank calls this.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    stale = [p for p in params if getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE]
    if stale:
        stale[0].partition(param_list=stale)


class Engine:
    """The DeepSpeed engine of `weights` (a Weights), with torch AdamW over its trainable
    parameters. With LoRA (`frozen_base`) the base stays whole on every rank, outside ZeRO;
    otherwise ZeRO-3 partitions the CPU copy as it places it."""

    def __init__(self, weights, cfg: Config, ranks: LearnerRanks, frozen_base: bool):
        self.cfg, self.ranks = cfg, ranks
        ds_config = deepspeed_config(cfg)
        if cfg.runtime.zero_stage == 3 and not frozen_base:
            # Partition the CPU copy one parameter at a time, each moved to this GPU only for its own
            # partitioning: without this, deepspeed.initialize moves the whole module (student and
            # EMA teacher) onto every GPU first.
            deepspeed.zero.Init(module=weights.module, config_dict_or_path=ds_config)
        optim = cfg.optim
        adamw = torch.optim.AdamW(weights.trainable_parameters(), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps, weight_decay=optim.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=weights.module, optimizer=adamw,
                                                                 config=ds_config)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor, last: bool) -> torch.Tensor:
        return backward_micro(self.engine, loss, last)

    def finish(self, finite: torch.Tensor) -> bool:
        return finish_step(self.engine, self.ranks, self.cfg.runtime.zero_stage, finite)

    def grad_norm(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)
