"""The learner's loop: one rank r of N, training with DeepSpeed (ZeRO-3 by default).

    setup()   config, family, weights -> Engine; resume from the last complete checkpoint
    start()   the first snapshot (disaggregated), the step-0 grid or a resumed run's base row
    train()   the loop, read top to bottom:
                  train_step(): train.grad_accum micro-batches from the source (agreed: none is
                      a RolloutLost) -> loss -> backward per trained share -> clip + AdamW step
                      -> EMA teacher -> snapshot when due -> ONE agreement (loss, counts,
                      "sync interrupted", "stop requested") -> metrics
                  sample grids, checkpoints, exports when due
              then export the student.

Faults (README "Faults and what happens"):
- a non-finite loss or non-finite gradients skip the whole step, EMA included, and count it,
  even when one micro-batch of one rank was the cause (engine.py); after
  optim.max_consecutive_skips in a row every rank stops cleanly, and the driver raises
  FloatingPointError naming the last checkpoint. No checkpoint is written during a streak.
- a killed learner rank: Ray Train restarts the group (FailureConfig) and setup() resumes
  from the newest complete checkpoint, in the same MLflow run; `learner/resumed_from_step`
  marks where. It re-publishes its weights at the resumed step under a new generation (every
  learner process picks its own), and experiences made with another generation's snapshots
  are dropped and counted with the stale ones (sources.py).
- SIGTERM / SIGINT to the driver (stop.py): learner rank 0 sees the driver's stop flag
  (stop.StopWatch, polled beside the loop) and the step's agreement tells every rank; every
  rank checkpoints the current step (unless the last checkpoint is that step, or it is step
  0: the base) and returns.
- a rollout worker lost for good (nodes.RolloutWatch) shows as a RolloutLost in the queue:
  every rank stops cleanly (no retry: a learner restart brings no node back).

Every ZeRO-3 gather is a collective: all ranks take part in publishing, sampling,
checkpointing and export; only rank 0 writes (reporter.py). GPU memory at scale: encoders
load onto the GPU (and leave it with data.cache_contexts), the transformer stays on the CPU
until DeepSpeed places it; with LoRA the frozen base stays out of ZeRO-3's partitioning.
"""

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import process
from ..algorithms.lr_schedule import lr_at
from ..checkpoint import experiment_uri, load_checkpoint, write_checkpoint_files
from ..contexts import ContextCache
from ..plan import check_this_gpu
from ..preview import BASE_FILE, ValidationSet, student_samples, teacher_samples
from ..storage import join, local_copy
from ..weights import STUDENT, TEACHER, EmaTeacher, make_weights
from ..families import lora_targets
from .engine import Engine, peak_memory_bytes, release_stale_gathers
from .publishing import NoSnapshots, Snapshots, full_state
from .reporter import Quiet, Reporter, step_row
from .sources import DataStream, ExperienceQueue


@dataclass
class LearnerInputs:
    """What the driver hands every learner rank (Ray Train's train_loop_config={"inputs": ...})."""

    config: dict  # Config.model_dump(mode="json")
    model_path: str
    source: DataStream | ExperienceQueue = field(default_factory=DataStream)  # the driver's pick
    snapshots: Snapshots | NoSnapshots = field(default_factory=NoSnapshots)  # disaggregated: Snapshots
    validation: ValidationSet | None = None  # the sample grids' columns (preview.validation_set)
    tracking: Any = None  # (tracking_uri, run_id) of the driver's MLflow run, or a MetricSink
    contexts: ContextCache | None = None  # data.cache_contexts: the filled cache
    progress: Any = None  # the queue the driver draws its progress bar from (rank 0 puts)
    stop: Any = None  # stop.StopWatch on the driver's stop flag (rank 0 reads it)


@dataclass
class StepResult:
    """One train_step, on this rank. `sums`: the mean micro-batch loss, trained states and images,
    each summed over every rank (the step's agreement); `loss`: the rank-averaged loss."""

    applied: bool = False
    loss: float = math.nan
    metrics: dict = field(default_factory=dict)
    images: int = 0
    staleness: int = 0
    rollout_seconds: float = 0.0
    fetch_seconds: float = 0.0
    waited: float = 0.0
    dropped: int = 0
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    sync: dict = field(default_factory=dict)
    sums: list = field(default_factory=list)
    lost: bool = False  # a rollout worker is lost for good: no step was taken
    stop: bool = False  # the driver asked for a stop (a signal)


class NoEma:
    """benchmarks/ab.py's plain-SFT arm: no EMA teacher is kept (Learner(keep_ema=False))."""

    shadow: list = []

    def step(self, decay: float) -> None:
        pass

    def state(self) -> dict:
        return {}


def micro_mean(metrics: list[dict]) -> dict:
    """A step's metrics from its micro-batches': trained_states summed, every loss averaged
    over the micro-batches that have it (a random subset of states differs between them)."""
    keys = dict.fromkeys(k for m in metrics for k in m)
    out = {k: sum(m[k] for m in metrics if k in m) / sum(1 for m in metrics if k in m) for k in keys}
    out["trained_states"] = sum(m["trained_states"] for m in metrics)
    return out


class Learner:
    def __init__(self, inputs: LearnerInputs, context, keep_ema: bool = True):
        """`context`: context.RayTrainContext or context.LocalContext."""
        self.inputs, self.ctx, self.keep_ema = inputs, context, keep_ema
        self.cfg = process.begin(inputs.config)
        self.rank, self.world, self.device, self.ranks = context.rank, context.world, context.device, context.ranks
        self.validation = inputs.validation
        self.snapshots = inputs.snapshots
        self.step = 0
        self.consecutive_skips = 0  # non-finite steps in a row
        self.counters = {"skipped_nonfinite": 0, "dropped_stale": 0, "sync_checked": 0, "rollout_restarts": 0}
        self.resumed_from: int | None = None  # the checkpoint step this process resumed from
        self.checkpointed_step: int | None = None  # the step of the last checkpoint, written or resumed
        self.interrupted = False  # stopped early on the driver's request
        self.base_images: torch.Tensor | None = None  # rank 0: the grids' base row (uint8), once known

    # -- setup ---------------------------------------------------------------------
    def setup(self) -> "Learner":
        cfg, inputs = self.cfg, self.inputs
        # runtime.gpu_memory_gb unset: before any weight loads (a model on an object store: copied here first)
        check_this_gpu(cfg, self.device, local_copy(inputs.model_path))
        # encoders onto the GPU; the transformer stays on the CPU until DeepSpeed places it
        self.family = process.load(cfg, inputs.model_path, self.device, inputs.contexts, transformer_device="cpu")
        if self.validation is not None:  # before anything slow: a bad train.sample_size fails here
            self.validation.check_size(self.family.pixel_multiple)
        frozen_base = self._setup_weights()
        resume = self.ctx.resume_dir()
        state = load_checkpoint(resume, self.weights, self.rank, self.world) if resume else None
        self.engine = Engine(self.weights, cfg, self.ranks, frozen_base)
        self.ema = EmaTeacher(self.weights) if self.keep_ema else NoEma()  # after the engine: shards exist
        if state is not None:
            state.restore_optimizer(self.engine.optimizer)
            state.restore_ema(self.ema)
            self.step, self.counters = state.step, {**self.counters, **state.counters}
            self.resumed_from = self.checkpointed_step = state.step
        self.generation = self.ranks.from_rank0(time.time_ns())  # rank 0's clock: unique per learner process
        self.reporter = Reporter(cfg, inputs.tracking, inputs.progress, inputs.stop) if self.rank == 0 else Quiet()
        self.snapshots.open(self)
        self.source = inputs.source.open(cfg, self.rank, self.device, self.family, self.ctx.dataset, self.step,
                                         generation=self.generation, counters=self.counters,
                                         check=self.snapshots.check)
        return self

    def _setup_weights(self) -> bool:
        """The student (and EMA teacher) over the family's transformer; True if the base is frozen
        (LoRA): then it stays whole on every rank, outside ZeRO (the adapters are small)."""
        cfg = self.cfg
        if cfg.model.gradient_checkpointing:
            self.family.transformer.enable_gradient_checkpointing()
        self.weights = make_weights(self.family.transformer, cfg.lora, lora_targets(cfg.model.family))
        frozen_base = self.weights.base_as_buffers() > 0
        if frozen_base:
            self.weights.module.to(self.device)
        return frozen_base

    # -- the loop ------------------------------------------------------------------
    def start(self) -> None:
        """Before the first step: the first snapshot (so rollout workers start while the step-0
        grid is drawn), then the grid's base row."""
        self.publish()
        if self.step == 0:
            self.log_samples()  # the student before any update is the base: its row is kept
        elif self.validation is not None:
            self.base_images = self.resumed_base()
        if self.resumed_from is not None:
            self.reporter.log(self.step, {"learner/resumed_from_step": self.resumed_from})
        else:
            self.reporter.say(f"starting at step 0: no checkpoint in {self.ctx.experiment.uri}")
        if self.inputs.contexts is not None:
            self.reporter.log(self.step, {"memory/encoders_released_gb": self.family.released_bytes / 1e9})

    def train(self) -> str | None:
        """The loop; returns None, or why it stopped early (non-finite steps, lost rollout workers)."""
        cfg = self.cfg
        train = cfg.train
        self.start()
        while self.step < train.steps:
            result = self.train_step()
            if result.lost:
                return self.end(f"training stopped at step {self.step}: rollout workers were lost (the driver's "
                                "error names the resources they need)", tag="dopsd.stopped")
            if self.consecutive_skips >= cfg.optim.max_consecutive_skips:
                return self.end(self.nonfinite_message(result.loss), tag="dopsd.stopped")
            if self.step % train.sample_every == 0 or self.step == train.steps:
                self.log_samples()
            # never during a streak of skipped steps: the last checkpoint stays one after a good step
            if (self.step % train.checkpoint_every == 0 and self.consecutive_skips == 0) or self.step == train.steps:
                self.checkpoint()
            if train.export_every and self.step % train.export_every == 0 and self.step < train.steps:
                self.export(final=False)
            if result.stop and self.step < train.steps:
                return self.stop_on_request()
        self.export(final=True)
        self.snapshots.close()
        return None

    def train_step(self) -> StepResult:
        """One optimizer step (and what comes with it: EMA, snapshot, metrics); every rank
        returns the same applied / lost / stop."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        t0 = time.perf_counter()
        fetched = [self.source.fetch(self.step) for _ in range(accum)]
        fetch_s = time.perf_counter() - t0
        # every rank agrees before any backward, so none is left alone in a collective
        if not self.ranks.all_true(not any(f.lost for f in fetched)):
            return StepResult(lost=True)
        self.engine.set_lr(lr_at(self.step, cfg.optim, cfg.train.steps))
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        loss_sum, metrics = torch.zeros((), dtype=torch.float64, device=self.device), []
        for micro, f in enumerate(fetched):
            def backward(loss_share, last_state, last_micro=micro == accum - 1):
                # a backward per trained state (algorithms/dopsd.py): one state's graph alive at a time
                nonlocal finite
                finite = finite & self.engine.backward(loss_share, last=last_micro and last_state)

            loss, item_metrics = self.source.loss(self.weights, f, backward)
            loss_sum += loss.detach().to(loss_sum)
            metrics.append(item_metrics)
        applied = self.engine.finish(finite)
        if applied:
            self.ema.step(cfg.algorithm.ema_decay)
            release_stale_gathers(self.weights.teacher_parameters())
            self.consecutive_skips = 0
        else:
            self.counters["skipped_nonfinite"] += 1
            self.consecutive_skips += 1
        self.step += 1
        compute_s = time.perf_counter() - t0 - fetch_s
        sync, interrupted = self.snapshots.publish(self.step) if self.snapshots.due(self.step) else ({}, False)
        metrics, images = micro_mean(metrics), sum(f.images for f in fetched)
        # the step's one agreement: sums over the ranks, and the flags any rank raised
        *sums, interrupted, stop = self.ranks.sum(
            [loss_sum / accum, metrics["trained_states"], images, interrupted,
             self.reporter.stop_requested()])
        if interrupted:
            sync, _ = self.snapshots.publish(self.step, last=True)
        dropped = sum(f.dropped for f in fetched)
        self.counters["dropped_stale"] += dropped
        result = StepResult(
            applied=applied, loss=sums[0] / self.world, metrics=metrics,
            images=images, staleness=max(self.step - 1 - f.version for f in fetched),
            rollout_seconds=sum(f.rollout_s for f in fetched) / accum, fetch_seconds=fetch_s,
            waited=sum(f.waited_s for f in fetched), dropped=dropped, compute_seconds=compute_s,
            step_seconds=time.perf_counter() - t0, sync=sync, sums=sums, stop=stop > 0)
        if self.reporter.writes:
            self.reporter.metrics(self.step, step_row(result, sums, self.world, self.row_extra(sync)))
        return result

    def row_extra(self, sync: dict) -> dict:
        return {"grad_norm": self.engine.grad_norm(), "lr": self.engine.lr,
                "memory/peak_gb_rank0": peak_memory_bytes() / 1e9,
                **{f"count/{k}": v for k, v in self.counters.items()}, **sync}

    def publish(self) -> dict:
        """A snapshot of this step, outside a step (the first one): published again if interrupted."""
        sync, interrupted = self.snapshots.publish(self.step)
        if self.ranks.from_rank0(int(interrupted)):
            sync, _ = self.snapshots.publish(self.step, last=True)
        return sync

    # -- ending ------------------------------------------------------------------------
    def nonfinite_message(self, loss: float) -> str:
        return (f"training stopped at step {self.step}: {self.consecutive_skips} consecutive steps had a "
                f"non-finite loss or non-finite gradients (optim.max_consecutive_skips="
                f"{self.cfg.optim.max_consecutive_skips}; last loss {loss}). The skipped steps changed "
                "no weights. Lower optim.lr, check the data and the config, then re-run with the same "
                "train.run_name to resume from the last checkpoint.")

    def stop_on_request(self) -> None:
        """Checkpoint the current step (every rank, the normal path) unless the last checkpoint
        is that step or nothing was trained yet, and stop: no export, the driver ends the run."""
        if self.step not in (0, self.checkpointed_step):
            self.checkpoint()
        self.end(f"stopped on request at step {self.step}")
        self.interrupted = True
        return None

    def end(self, message: str, tag: str | None = None) -> str:
        """End the loop on every rank without an error (Ray Train does not retry it): rank 0 says
        why, the weight publisher closes. Returns `message`."""
        self.reporter.say(message, tag)
        self.snapshots.close()
        return message

    # -- weights out -----------------------------------------------------------------
    def full_state(self, which: str) -> dict:
        """Every rank gathers; rank 0 gets the whole state, the others an empty dict."""
        return full_state(self.weights, which, self.cfg.runtime.sync_bucket_numel)

    def checkpoint(self) -> None:
        self.checkpointed_step = step = self.step
        student, teacher = self.full_state(STUDENT), self.full_state(TEACHER)
        ema, counters = self.ema.state(), dict(self.counters)

        def write(directory):
            write_checkpoint_files(directory, self.rank, self.world, step, counters, self.engine.optimizer,
                                   student, teacher, ema)
        self.ctx.save(step, write)

    def export(self, final: bool) -> None:
        """The student, loadable: every rank gathers, rank 0 writes (Reporter.export)."""
        self.reporter.export(self.step, self.weights, self.full_state(STUDENT), final)

    def log_samples(self) -> None:
        """The grid of this step (preview.py). Every rank samples (ZeRO-3 gathers), rank 0 alone
        decodes and writes. At step 0 the student is the base (LoRA B = 0, full fine-tuning
        untouched): its row is kept as the base row of every later grid, and saved for resumed runs."""
        val = self.validation
        if val is None:
            return
        steps, decode = self.cfg.algorithm.inference_steps, self.reporter.writes
        student = student_samples(self.family, self.weights.model, val, steps, decode)
        teacher = teacher_samples(self.family, self.weights, val, steps, decode)
        self.base_images = self.reporter.grid(self.step, val, steps, student, teacher, base=self.base_images)

    def resumed_base(self) -> torch.Tensor | None:
        """A resumed run's base row (rank 0; None elsewhere): the one saved at step 0, or, when
        it is missing or was made for other columns, sampled again with the LoRA adapters off.
        Full fine-tuning keeps no base weights: then there is no base row, and rank 0 says why."""
        val, steps = self.validation, self.cfg.algorithm.inference_steps
        saved = self.reporter.saved_base(val, steps)
        if self.ranks.from_rank0(int(saved is not None)):  # every rank takes the same branch
            return saved
        with self.weights.base() as base:
            if base is None:
                path = join(self.cfg.run_dir, "samples", BASE_FILE)
                self.reporter.say(f"sample grids: no base row: {path} is missing or was made for other prompts, "
                                  "seeds or size, and full fine-tuning keeps no copy of the base weights to sample "
                                  "it again")
                return None
            images = student_samples(self.family, base, val, steps, decode=self.reporter.writes)
        return self.reporter.base_row(images, val, steps)


def train_loop_per_worker(loop_config: dict) -> dict:
    """Rank 0's return value reaches the driver as Result.return_value: step, counters, the
    node it ran on, "stopped" (a message) when the learners gave up (non-finite steps, or
    rollout workers lost), and "interrupted" when they stopped early because the driver
    asked them to (a signal)."""
    from .context import RayTrainContext

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    inputs = loop_config["inputs"]
    cfg = process.begin(inputs.config)
    learner = Learner(inputs, RayTrainContext(experiment_uri(cfg))).setup()
    try:
        stopped = learner.train()
    finally:
        learner.reporter.close()
    return {"step": learner.step, "counters": dict(learner.counters), "stopped": stopped,
            "interrupted": learner.interrupted, "node_id": learner.ctx.node_id()}
