"""The learner: one Ray Train worker, rank r of N, training with DeepSpeed (ZeRO-3 by default).

    setup()  family + weights -> DeepSpeed engine; resume from the last checkpoint
    train()  the loop, written out; a step is one optimizer update:
                 lr = lr_at(step)   (a pure function of the step: a resume continues it exactly)
                 train.grad_accum times: batch (colocated: own data shard) or experience
                     (disaggregated: buffer) -> loss -> backward (the gradients accumulate;
                     D-OPSD: a backward per trained state, as soon as it is scored)
                 clip + AdamW step (engine) -> EMA teacher
                 every sync_every: gathered weights -> rollout workers, with a version
                     (through a WeightPublisher: object store or collective, runtime.sync_transport)
                 metrics (rank 0 -> MLflow, and progress -> the driver's progress bar),
                 sample grids, checkpoints
             then export the student.

Faults (README "Faults and what happens"):
- a non-finite loss (checked on every rank before backward) or non-finite gradients
  (DeepSpeed ZeRO 1-3 skip the optimizer step when the global grad norm is not finite;
  stage 0 is checked here) skip the whole step, EMA included, and count it, even when
  one micro-batch of an accumulation on one rank was the cause (backward_micro); after
  optim.max_consecutive_skips in a row every rank stops cleanly, and the driver raises
  FloatingPointError naming the last checkpoint. No checkpoint is written during a streak.
- a killed learner rank: Ray Train restarts the group (FailureConfig) and setup()
  resumes from the newest complete checkpoint (checkpoint.usable_checkpoint), in the
  same MLflow run; `learner/resumed_from_step` marks where. It re-publishes its weights
  at the resumed step under a new generation (every learner process picks its own, so
  no snapshot of a dead learner shares a (version, generation) with a live one's);
  experiences made with another generation's snapshots are dropped and counted with the
  stale ones, whatever their version.
- SIGTERM / SIGINT to the driver (stop.py): learner rank 0 reads the driver's stop flag
  before every step and tells the other ranks; every rank checkpoints the current step
  (unless the last checkpoint is that step, or it is step 0: the base) and returns.
- a restarted rollout worker announces itself with a RolloutRestart in the experience
  queue: counted in `count/rollout_restarts`.
- a rollout worker lost for good (its node gone, none to replace it: nodes.RolloutWatch)
  shows as a RolloutLost in the queue: every rank stops cleanly (no FailureConfig retry: a
  learner restart brings no node back) and the driver raises, naming the missing resources.

Every ZeRO-3 gather is a collective: all ranks take part in publishing, sampling,
checkpointing and export; only rank 0 writes, and only rank 0 decodes sample grids.
Every other agreement between ranks (finite loss and gradients, the generation, the
step statistics) goes through ranks.LearnerRanks, on the learner's device.

GPU memory at scale (6-9B): encoders load onto the GPU (and leave it at once with
data.cache_contexts: contexts.py), the transformer stays on the CPU until DeepSpeed places
it; with LoRA the frozen base is kept out of ZeRO-3's partitioning
(weights.LoraWeights.base_as_buffers) so it is not re-gathered for every forward;
experiences arrive as CPU tensors and are moved here (Experience.to).
"""

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
from deepspeed.runtime.base_optimizer import ZeROOptimizer
import ray.train
import ray.train.torch
import torch

from .algorithms.lr_schedule import lr_at
from .algorithms.schedules import training_sigmas
from .algorithms.steps import Batch, RolloutLost, RolloutRestart, colocated_loss, experience_loss
from .checkpoint import load_checkpoint, ray_upload_fn, save_checkpoint, usable_checkpoint, checkpoint_dir_name
from .config import Config
from .contexts import ContextCache, cached_contexts
from .data.stream import iter_batches
from .families import comfyui_keys, lora_targets, load_family, pipeline_class
from .families.base import Family
from .plan import check_this_gpu
from .preview import BASE_FILE, ValidationSet, load_base, save_base, student_samples, teacher_samples, validation_grid
from .progress import progress_report
from .ranks import LearnerRanks
from .sync import SyncInterrupted, WeightPublisher
from .sync.buckets import gather_zero3_buckets, weights_digest
from .tracking import MetricSink, MlflowRun
from .weights import STUDENT, TEACHER, EmaTeacher, Weights, make_weights


@dataclass
class LearnerInputs:
    """What the driver hands every learner rank (Ray Train's train_loop_config={"inputs": ...})."""

    config: dict  # Config.model_dump(mode="json")
    model_path: str
    validation: ValidationSet | None = None  # the sample grids' columns (preview.validation_set)
    tracking: tuple[str, str] | None = None  # (tracking_uri, run_id) of the driver's MLflow run
    weight_sync: WeightPublisher | None = None  # disaggregated: learner rank 0's end of the transport
    experience_queue: Any = None  # disaggregated: the ray.util.queue.Queue rollout workers fill
    contexts: ContextCache | None = None  # data.cache_contexts: the filled cache
    progress: Any = None  # the ray.util.queue.Queue the driver draws its progress bar from (rank 0 puts)
    stop: Any = None  # the driver's stop.StopFlag actor: rank 0 reads it before every step


def train_loop_per_worker(loop_config: dict) -> dict:
    """Rank 0's return value reaches the driver as Result.return_value: step, counters, the
    node it ran on, "stopped" (a message) when the learners gave up (non-finite steps, or
    rollout workers lost), and "interrupted" when they stopped early because the driver
    asked them to (a signal)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    learner = Learner(loop_config["inputs"])
    learner.setup()
    stopped = learner.train()
    return {"step": learner.step, "counters": dict(learner.counters), "stopped": stopped,
            "interrupted": learner.interrupted, "node_id": ray.get_runtime_context().get_node_id()}


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


def backward_micro(engine, loss: torch.Tensor, ranks: LearnerRanks, last: bool) -> bool:
    """engine.backward of one loss (a micro-batch's SFT loss, or one D-OPSD state's share of a
    micro-batch's loss); False if it is not finite on some rank.

    Every rank gets the same answer (`ranks`) and every rank runs a backward, so the
    collectives inside it never hang (every rank scores as many states per micro-batch). A
    non-finite loss loses the whole step, but the step's earlier backwards are accumulated
    already, and where depends on the ZeRO stage. So it is backpropagated times NaN, on every
    rank: the step's gradients become NaN, and the overflow check at its end (DeepSpeed's for
    ZeRO 1-3, finish_step's for stage 0) skips the step and drops them all. `last`: the
    step's last backward, which reduces the gradients (DeepSpeed's accumulation boundary);
    set on every call, so it never depends on DeepSpeed's own count of micro-batches, which a
    skipped stage-0 step breaks.
    """
    finite = ranks.all_finite([loss])
    if isinstance(engine.optimizer, ZeROOptimizer):
        # What engine.forward does first. The learner calls the module itself (the family's
        # velocity), and without this ZeRO-3 takes every backward of a step for the step's first
        # and overwrites the gradients accumulated so far with its own.
        engine.optimizer.clear_backward_seen_flag()
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss if finite else loss * math.nan)  # scaled by 1 / grad_accum: the mean gradient
    return finite


def finish_step(engine, ranks: LearnerRanks, zero_stage: int, finite: bool) -> bool:
    """The optimizer step after the step's last backward_micro; False if nothing was applied.

    `finite`: every micro-batch loss was finite. With ZeRO stages 1-3 DeepSpeed itself skips
    the optimizer step when the global grad norm is not finite (fp32, and bf16 with
    check_grad_overflow) and says so in was_step_applied(); stage 0 (plain data parallel)
    never checks, so its gradients are checked here and dropped before the step. Every rank
    returns the same answer.
    """
    if zero_stage == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not (finite and ranks.all_finite(grads)):
            engine.optimizer.zero_grad()  # drop them: the optimizer's accumulation (bf16) ...
            engine.zero_grad()  # ... and the module's; no optimizer step
            return False
    engine.step()  # clips to optim.grad_clip, AdamW step, zero grads
    return finite and engine.was_step_applied()


def micro_mean(metrics: list[dict]) -> dict:
    """A step's metrics from its micro-batches': trained_states summed, every loss averaged
    over the micro-batches that have it (a random subset of states differs between them)."""
    keys = dict.fromkeys(k for m in metrics for k in m)
    out = {k: sum(m[k] for m in metrics if k in m) / sum(1 for m in metrics if k in m) for k in keys}
    out["trained_states"] = sum(m["trained_states"] for m in metrics)
    return out


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


class Learner:
    family: Family
    weights: Weights
    mlflow: MetricSink | None

    def __init__(self, inputs: LearnerInputs):
        self.cfg = Config.model_validate(inputs.config)
        self.model_path = inputs.model_path
        self.publisher: WeightPublisher | None = inputs.weight_sync  # disaggregated (driver.weight_sync)
        self.queue = inputs.experience_queue  # disaggregated: where experiences come from
        self.progress = inputs.progress
        self.stop_flag = inputs.stop
        self.interrupted = False  # stopped early on the driver's request
        self.checkpointed_step: int | None = None  # the step of the last checkpoint, written or resumed
        self.validation = inputs.validation
        self.base_images: torch.Tensor | None = None  # rank 0: the grids' base row (uint8), once known
        self.tracking = inputs.tracking
        self.contexts = inputs.contexts
        self.step = 0
        self.consecutive_skips = 0  # non-finite steps in a row
        self.counters = {"skipped_nonfinite": 0, "dropped_stale": 0, "sync_checked": 0, "rollout_restarts": 0}
        self.resumed_from: int | None = None  # the checkpoint step this process resumed from
        self.generation = 0  # this learner process's stamp on its snapshots (setup)
        self.published_digests: dict[int, str] = {}  # debug_check_sync: version -> student fingerprint

    # -- setup ---------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.runtime.torch_threads:
            torch.set_num_threads(cfg.runtime.torch_threads)
        # this worker's GPU (Ray Train sets it per worker), or the CPU
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.ranks = LearnerRanks(self.rank, self.world, self.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        check_this_gpu(cfg, self.device, self.model_path)  # runtime.gpu_memory_gb unset: before any weight loads
        # encoders onto the GPU; the transformer stays on the CPU until DeepSpeed places it
        self.family = load_family(cfg.model, self.model_path, device=self.device, transformer_device="cpu")
        if self.validation is not None:  # before anything slow: a bad train.sample_size fails here
            self.validation.check_size(self.family.pixel_multiple)
        if self.contexts is not None:  # every context is in the cache: the encoders leave the GPU
            self.family = cached_contexts(self.family, self.contexts)
        if cfg.model.gradient_checkpointing:
            self.family.transformer.enable_gradient_checkpointing()
        self.weights = make_weights(self.family.transformer, cfg.lora, lora_targets(cfg.model.family))
        frozen_base = self.weights.base_as_buffers() > 0
        if frozen_base:  # LoRA: the frozen base stays whole on every rank, outside ZeRO
            self.weights.module.to(self.device)  # (the adapters are small)

        # the checkpoint Ray Train resumes from, if complete; else the newest complete one in storage
        resume = usable_checkpoint(ray.train.get_checkpoint(), self.experiment_dir())
        state = load_checkpoint(resume, self.weights, self.rank, self.world) if resume else None
        ds_config = deepspeed_config(cfg)
        if cfg.runtime.zero_stage == 3 and not frozen_base:
            # Partition the CPU copy one parameter at a time, each moved to this GPU only for its own
            # partitioning: without this, deepspeed.initialize moves the whole module (student and
            # EMA teacher) onto every GPU first.
            deepspeed.zero.Init(module=self.weights.module, config_dict_or_path=ds_config)
        optimizer = torch.optim.AdamW(
            self.weights.trainable_parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.weights.module, optimizer=optimizer, config=ds_config)
        self.ema = EmaTeacher(self.weights)  # after initialize: this rank's shards exist from here on
        if state is not None:
            state.restore_optimizer(self.optimizer)
            state.restore_ema(self.ema)
            self.step, self.counters = state.step, {**self.counters, **state.counters}
            self.resumed_from = self.checkpointed_step = state.step
        self.generation = self.ranks.from_rank0(time.time_ns())  # rank 0's clock: unique per learner process
        self.mlflow = MlflowRun.attach(*self.tracking) if self.rank == 0 and self.tracking else None
        self.data = ray.train.get_dataset_shard("train") if self.queue is None else None
        self._sigmas = {}
        if self.publisher is not None and self.rank == 0:
            self.publisher.open()  # collective: the rollout workers join the weight-sync group here

    def experiment_dir(self) -> str:
        """Ray Train's folder of this run's checkpoints (RunConfig storage_path / name)."""
        try:
            return ray.train.get_context().get_storage().experiment_fs_path
        except Exception:  # a Ray version without get_storage(): the driver's layout
            return str(Path(self.cfg.run_dir) / "ray_train" / self.cfg.train.run_name)

    def sigmas(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._sigmas:
            algo = self.cfg.algorithm
            self._sigmas[height, width] = training_sigmas(
                algo.training_sigmas, self.family, height, width, algo.inference_steps)
        return self._sigmas[height, width]

    # -- the loop ------------------------------------------------------------------
    def train(self) -> str | None:
        """The loop; returns None, or why it stopped early (non-finite steps)."""
        cfg = self.cfg
        if self.publisher is not None:  # first, so rollout workers start while the step-0 grid is drawn
            self.publish_weights()
        if self.step == 0:
            self.log_samples()  # the student before any update is the base: its row is kept
        elif self.validation is not None:
            self.base_images = self.resumed_base()
        if self.resumed_from is not None and self.mlflow:
            self.mlflow.log_metrics({"learner/resumed_from_step": self.resumed_from}, step=self.step)
        if self.contexts is not None and self.mlflow:
            self.mlflow.log_metrics({"memory/encoders_released_gb": self.family.released_bytes / 1e9}, step=self.step)
        batches = self.batches()
        while self.step < cfg.train.steps:
            if self.stop_requested():
                return self.stop_on_request()
            step = self.train_step(batches)
            if step is None:  # a rollout worker is lost for good
                return self.stop(f"training stopped at step {self.step}: rollout workers were lost "
                                 "(the driver's error names the resources they need)")
            if self.consecutive_skips >= cfg.optim.max_consecutive_skips:
                return self.stop_nonfinite(step["loss"])
            if self.step % cfg.train.sample_every == 0 or self.step == cfg.train.steps:
                self.log_samples()
            # never during a streak of skipped steps: the last checkpoint stays one after a good step
            due = self.step % cfg.train.checkpoint_every == 0 and self.consecutive_skips == 0
            if due or self.step == cfg.train.steps:
                self.checkpoint()
            if cfg.train.export_every and self.step % cfg.train.export_every == 0 and self.step < cfg.train.steps:
                self.export(final=False)
        self.export(final=True)
        if self.publisher is not None and self.rank == 0:
            self.publisher.close()
        return None

    def train_step(self, batches) -> dict:
        """One step of the loop, as train() runs it (and benchmarks/ab.py times it): the optimizer
        step, the EMA, the weight sync when due, the metrics. Returns optimizer_step's dict with
        "compute_seconds", "step_seconds" (sync included) and "sync" added; None when the
        rollout workers are lost for good."""
        cfg = self.cfg
        t0 = time.perf_counter()
        step = self.optimizer_step(batches)
        if step is None:
            return None
        if step["applied"]:
            if self.ema is not None:  # None only in benchmarks/ab.py's plain-SFT arm (no EMA kept)
                self.ema.step(cfg.algorithm.ema_decay)
                release_stale_gathers(self.weights.teacher_parameters())
            self.consecutive_skips = 0
        else:
            self.counters["skipped_nonfinite"] += 1
            self.consecutive_skips += 1
        self.step += 1
        step["compute_seconds"] = time.perf_counter() - t0 - step["fetch_seconds"]
        sync = self.publish_weights() if self.publisher is not None and self.step % cfg.runtime.sync_every == 0 else {}
        self.counters["dropped_stale"] += step["dropped"]
        step["step_seconds"], step["sync"] = time.perf_counter() - t0, sync
        self.log_step(step, step["step_seconds"], sync)
        return step

    def batches(self):
        """Yields (Batch or Experience, seconds waited, stale experiences dropped)."""
        if self.queue is None:
            # Resume: micro-batch `micro` of step s is batch s * grad_accum + micro of this rank's
            # stream; the batches before the checkpoint's step are read again and passed over, so
            # a resumed run trains on the same images with the same noise (the index seeds it) as
            # one that never stopped. (Re-reading costs the data pipeline's time, not a model's.)
            skip = self.step * self.cfg.train.grad_accum
            for index, (images, captions, ids) in enumerate(iter_batches(
                    self.data, self.cfg.train.batch_size, seed=self.cfg.train.seed + self.rank)):
                if index >= skip:
                    yield Batch(images, captions, ids, index=index, stream=self.rank, seed=self.cfg.train.seed), 0.0, 0
            raise RuntimeError("the training data ran out before train.steps; the stream should repeat")
        while True:
            start, dropped = time.perf_counter(), 0
            while True:
                exp = self.queue.get(block=True, timeout=self.cfg.runtime.sync_timeout_s)
                if isinstance(exp, RolloutRestart):  # a rollout worker came back after dying
                    self.counters["rollout_restarts"] += 1
                    print(f"rollout worker {exp.index} restarted (restarts so far: "
                          f"{self.counters['rollout_restarts']})", flush=True)
                    continue
                if isinstance(exp, RolloutLost):  # the driver gave up on a lost rollout worker
                    yield exp, time.perf_counter() - start, dropped
                    continue
                # another generation: made with a dead learner's snapshot; older than max_staleness:
                # too stale
                if (exp.generation == self.generation and 0 <= self.step - exp.version <= self.cfg.runtime.max_staleness
                        and self.check_snapshot(exp)):
                    break
                dropped += 1  # never trained on
            # it arrives as CPU tensors (rollout.py): onto this rank's device, asynchronously
            yield exp.to(self.device, non_blocking=True), time.perf_counter() - start, dropped

    def check_snapshot(self, exp) -> bool:
        """debug_check_sync: the worker's weights must be exactly this process's snapshot of
        exp.version (exp is of this generation)."""
        if exp.snapshot_digest is None or exp.version not in self.published_digests:
            return True
        if exp.snapshot_digest != self.published_digests[exp.version]:
            raise RuntimeError(f"weight sync check failed: a rollout worker's student weights for version "
                               f"{exp.version} differ from the learner's gathered snapshot")
        self.counters["sync_checked"] += 1
        return True

    def optimizer_step(self, batches) -> dict:
        """One step: the learning rate for it, train.grad_accum micro-batches from `batches`,
        each with its loss and backward (the gradients accumulate), then clip + AdamW.
        Returns what log_step needs; "applied" is False (nothing changed) if a loss or the
        gradients were not finite, on any rank for any micro-batch. Every rank agrees.
        None: some rank read a RolloutLost (disaggregated); every rank stops."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.train.grad_accum
        finite, losses, metrics, images, staleness, rollout_s = True, [], [], 0, 0, 0.0
        fetch_s = waited = dropped = 0
        for micro in range(accum):
            start = time.perf_counter()
            item, item_waited, item_dropped = next(batches)
            # every rank agrees before any backward, so none is left alone in a collective
            if self.queue is not None and not self.ranks.all_true(not isinstance(item, RolloutLost)):
                return None
            fetch_s += time.perf_counter() - start
            waited, dropped = waited + item_waited, dropped + item_dropped
            finites = []

            def backward(loss_share, last_state, last_micro=micro == accum - 1):
                # a backward per trained state (algorithms/dopsd.py): one state's graph alive at a time
                finites.append(backward_micro(self.engine, loss_share, self.ranks, last=last_micro and last_state))

            if isinstance(item, Batch):
                _, _, height, width = item.images.shape
                loss, item_metrics = colocated_loss(
                    self.family, self.weights, item, self.sigmas(height, width), cfg.algorithm, backward)
                images += len(item.captions)
            else:
                loss, item_metrics = experience_loss(self.family, self.weights, item, cfg.algorithm, backward)
                images += len(item.ids)
                # version: the optimizer step whose snapshot made it; the step logs its oldest
                staleness = max(staleness, self.step - item.version)
                rollout_s += item.rollout_seconds / accum
            finite = all(finites) and finite
            losses.append(loss.item())
            metrics.append(item_metrics)
        applied = finish_step(self.engine, self.ranks, cfg.runtime.zero_stage, finite)
        return {"applied": applied, "loss": sum(losses) / accum, "metrics": micro_mean(metrics), "images": images,
                "staleness": staleness, "rollout_seconds": rollout_s, "fetch_seconds": fetch_s, "waited": waited,
                "dropped": dropped}

    def stop_requested(self) -> bool:
        """Whether the driver asked for a stop (a signal): rank 0 reads the flag, every rank agrees."""
        asked = self.rank == 0 and self.stop_flag is not None and ray.get(self.stop_flag.get.remote()) != 0
        return bool(self.ranks.from_rank0(int(asked)))

    def stop_on_request(self) -> None:
        """Checkpoint the current step (every rank, the normal path) unless the last checkpoint
        is that step or nothing was trained yet, and stop: no export, the driver ends the run."""
        if self.step not in (0, self.checkpointed_step):
            self.checkpoint()
        self.end_loop(f"stopped on request at step {self.step}")
        self.interrupted = True
        return None

    def stop_nonfinite(self, loss: float) -> str:
        """Stop every rank cleanly (no retry by FailureConfig: it would fail the same way) and
        return why; the driver raises FloatingPointError with it and the last checkpoint's path."""
        message = (f"training stopped at step {self.step}: {self.consecutive_skips} consecutive steps had a "
                   f"non-finite loss or non-finite gradients (optim.max_consecutive_skips="
                   f"{self.cfg.optim.max_consecutive_skips}; last loss {loss}). The skipped steps changed "
                   "no weights. Lower optim.lr, check the data and the config, then re-run with the same "
                   "train.run_name to resume from the last checkpoint.")
        return self.stop(message)

    def stop(self, message: str) -> str:
        """End the loop on every rank without an error (Ray Train does not retry it); returns `message`."""
        if self.rank == 0 and self.mlflow:
            self.mlflow.set_tag("dopsd.stopped", message)
        self.end_loop(message)
        return message

    def end_loop(self, message: str) -> None:
        """Rank 0 prints why the loop ends and closes the weight publisher."""
        if self.rank == 0:
            print(message, flush=True)
            if self.publisher is not None:
                self.publisher.close()

    # -- weights out -----------------------------------------------------------------
    def gathered(self, named: list, to_cpu: bool = True, pin: bool = False):
        """Yields buckets {key: full tensor} (empty on ranks > 0); all ranks iterate it. On the
        CPU (pinned for a transfer), or on this rank's device, valid until the next bucket."""
        return gather_zero3_buckets(named, self.cfg.runtime.sync_bucket_numel, rank0_only=True,
                                    to_cpu=to_cpu, pin=pin)

    def snapshot_parameters(self) -> list:
        """(key, param) of what rollout workers get: the student, and the EMA teacher
        (keys prefixed "teacher/") when they compute teacher targets."""
        named = list(self.weights.named_parameters(STUDENT))
        if self.cfg.runtime.teacher_targets == "rollout":
            named += [(f"{TEACHER}/{k}", p) for k, p in self.weights.named_parameters(TEACHER)]
        return named

    def publish_weights(self) -> dict:
        """Gather the snapshot bucket by bucket (every rank) and publish it as version = step (rank 0).

        A sync the transport could not finish (SyncInterrupted: a rollout worker died during a
        collective sync) is gathered and published once more; every rank learns it from rank 0.
        """
        start = time.perf_counter()
        for attempt in (1, 2):
            sync, interrupted = self.publish_once(last=attempt == 2)
            if not self.ranks.from_rank0(int(interrupted)):
                break
        seconds = time.perf_counter() - start
        return {**sync, "sync/seconds": seconds, "sync/version": self.step,
                "sync/gb_per_s": sync["sync/bytes"] / max(seconds, 1e-9) / 1e9}

    def publish_once(self, last: bool) -> tuple[dict, bool]:
        """One gather + publish: (metrics, interrupted). Raises SyncInterrupted if `last`."""
        named = self.snapshot_parameters()
        debug = self.cfg.runtime.debug_check_sync
        # the collective transport packs device buckets straight into its device buffers
        buckets = self.gathered(named, to_cpu=self.publisher.host_buckets or debug, pin=True)
        if debug and self.rank == 0:
            buckets = list(buckets)
            self.published_digests[self.step] = weights_digest(
                {k: v for b in buckets for k, v in b.items() if not k.startswith(f"{TEACHER}/")})
        if self.rank != 0:
            for _ in buckets:  # take part in every gather
                pass
            return {"sync/bytes": 0}, False
        try:
            return self.publisher.publish(self.step, named, buckets, generation=self.generation), False
        except SyncInterrupted as e:  # every bucket was taken: the other ranks' gathers are done
            if last:
                raise
            print(f"weight sync of step {self.step} interrupted, publishing it again: {e}", flush=True)
            return {"sync/bytes": 0}, True

    def full_state(self, which: str) -> dict:
        state = {}
        for bucket in self.gathered(self.weights.named_parameters(which)):
            state.update(bucket)
        return state

    def checkpoint(self) -> None:
        self.checkpointed_step = self.step
        student, teacher = self.full_state(STUDENT), self.full_state(TEACHER)
        metrics = {"step": self.step}
        with save_checkpoint(self.rank, self.world, self.step, self.counters, self.optimizer,
                             student if self.rank == 0 else None, teacher if self.rank == 0 else None,
                             self.ema.state()) as ckpt:
            # each file lands in storage complete or not at all (checkpoint.upload_checkpoint)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(self.step),
                             checkpoint_upload_fn=ray_upload_fn(self.experiment_dir()))

    def export(self, final: bool) -> None:
        """The student, loadable (LoRA file or transformer folder): in <run dir>/export/step_NNNNNN
        when the step is a multiple of train.export_every, and in <run dir>/export when `final`.
        Every rank takes part in the gathers; rank 0 writes and logs to MLflow under the same paths."""
        student = self.full_state(STUDENT)
        if self.rank != 0:
            return
        every = self.cfg.train.export_every
        names = ([f"export/step_{self.step:06d}"] if every and self.step % every == 0 else []) + (
            ["export"] if final else [])
        family = self.cfg.model.family
        for name in names:
            out = Path(self.cfg.run_dir) / name
            self.weights.export(out, pipeline_class(family), state=student, comfyui=comfyui_keys(family))
            if self.mlflow:  # the files alone: export/ also holds the step_NNNNNN folders, logged each on its own
                for f in sorted(p for p in out.iterdir() if p.is_file()):
                    self.mlflow.log_artifact(str(f), name)
        if final:
            (Path(self.cfg.run_dir) / "config.resolved.json").write_text(self.cfg.model_dump_json(indent=2))

    # -- observability -------------------------------------------------------------
    def log_step(self, step: dict, step_s: float, sync: dict) -> None:
        """Rank-summed throughput, rank-averaged loss; rank 0 logs, and reports progress to the driver.

        `step`: what optimizer_step returned, every micro-batch of the step counted."""
        metrics = dict(step["metrics"])
        trained = metrics.pop("trained_states")
        # a non-finite loss stays NaN: MLflow drops it (and counts it), the step shows in count/skipped_nonfinite
        loss = step["loss"] if math.isfinite(step["loss"]) else math.nan
        stats = self.ranks.sum([loss, trained, step["images"]])
        row = {
            **metrics,
            "loss": stats[0] / self.world,
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "lr": self.optimizer.param_groups[0]["lr"],
            "staleness": step["staleness"],
            "rollout_seconds": step["rollout_seconds"],
            "learner/wait_fraction": step["waited"] / step_s if step_s else 0.0,
            "learner/compute_seconds": step["compute_seconds"],
            "learner/step_seconds": step_s,
            "images_per_s": stats[2] / step_s,
            "trained_states_per_s": stats[1] / step_s,
            "memory/peak_gb_rank0": peak_memory_bytes() / 1e9,
            **{f"count/{k}": v for k, v in self.counters.items()},
            **sync,
        }
        if self.mlflow and self.step % self.cfg.train.log_every == 0:
            self.mlflow.log_metrics(row, step=self.step)
        if self.progress is not None and self.rank == 0:  # the driver draws the bar (progress.py)
            self.progress.put(progress_report(self.step, self.cfg.train.steps, row["loss"], row["images_per_s"]))

    def log_samples(self) -> None:
        """The grid of this step (preview.py): to <run dir>/samples/step_NNNNNN.png and MLflow.
        Every rank samples (ZeRO-3 gathers), rank 0 alone decodes and writes. At step 0 the
        student is the base (LoRA B = 0, full fine-tuning untouched): its row is kept as the
        base row of every later grid, and saved for resumed runs."""
        val = self.validation
        if val is None:
            return
        steps, decode = self.cfg.algorithm.inference_steps, self.rank == 0
        student = student_samples(self.family, self.weights.model, val, steps, decode)
        teacher = teacher_samples(self.family, self.weights, val, steps, decode)
        if not decode:
            return
        samples = Path(self.cfg.run_dir) / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        if self.step == 0:
            self.base_images = save_base(samples / BASE_FILE, student, val, steps)
        grid = validation_grid(val, student, teacher, f"student step {self.step}", base=self.base_images)
        name = f"step_{self.step:06d}.png"
        grid.save(samples / name)
        if self.mlflow:
            self.mlflow.log_artifact(str(samples / name), "samples")

    def resumed_base(self) -> torch.Tensor | None:
        """A resumed run's base row (rank 0; None elsewhere): the one saved at step 0, or, when
        it is missing or was made for other columns, sampled again with the LoRA adapters off.
        Full fine-tuning keeps no base weights: then there is no base row, and rank 0 says why."""
        val, steps = self.validation, self.cfg.algorithm.inference_steps
        path = Path(self.cfg.run_dir) / "samples" / BASE_FILE
        saved = load_base(path, val, steps) if self.rank == 0 else None
        if self.ranks.from_rank0(int(saved is not None)):  # every rank takes the same branch
            return saved
        with self.weights.base() as base:
            if base is None:
                if self.rank == 0:
                    print(f"sample grids: no base row: {path} is missing or was made for other prompts, seeds or "
                          "size, and full fine-tuning keeps no copy of the base weights to sample it again",
                          flush=True)
                return None
            images = student_samples(self.family, base, val, steps, decode=self.rank == 0)
        if self.rank != 0:
            return None
        return save_base(path, images, val, steps)
