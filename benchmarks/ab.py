"""D-OPSD against SFT, whole system, paired round by round: the one benchmark harness.

    python benchmarks/ab.py                     # ~22M-param Z-Image-shaped model, LoRA r64, 64 px, K=4, CPU
    python benchmarks/ab.py --rounds 4 --warmup 1 --ranks 1 --dim 128 --layers 1   # a quick look
    python benchmarks/ab.py --device cuda --dtype bfloat16 --dim 1536 --layers 12 --size 512 --batch 4
    python benchmarks/ab.py --quality           # time to quality on the toy (separate, slow: benchmarks/quality.py)

One Ray Train job (Ray Train + DeepSpeed, the learner's own code) holds one `Learner` per
ARM, each with its own DeepSpeed engine, model copy and data stream (the same data, the same
order), and the disaggregated arms their own rollout-worker actors, weight publisher and
experience queue (driver.start_rollout). Every round runs each arm's real step
(Learner.train_step: loss, backward, clip, AdamW, EMA, weight sync with the ZeRO gather) once,
in a rotating order, then the bare model's forward / forward+backward / teacher forward in
plain torch (the limit). After an arm's step the harness waits until that arm's rollout
workers have refilled its queue, so no two arms' processes compute at once: learner and
rollout seconds are each measured alone, and summed as device-seconds.

    arm                   algorithm  mode                                            batch
    sft                   SFT        colocated, cached contexts, EMA                 B
    sft_kb                SFT        colocated, cached contexts, EMA                 K*B (equal optimizer work)
    sft_plain             SFT        colocated, cached contexts, no EMA              B
    dopsd_colocated       D-OPSD     colocated (the recipe)                          B
    dopsd_onpolicy        D-OPSD     disaggregated, max_staleness 0                  B
    dopsd_async           D-OPSD     disaggregated, max_staleness 1                  B
    dopsd_async_rollout   D-OPSD     async, teacher targets on the rollout worker    B

Then, per learner world size in --ranks (a job each), the memory arms (LoRA / full FT x ZeRO-2 /
ZeRO-3 x SFT / D-OPSD, and LoRA ZeRO-3 without the context cache), 2 steps each, and the
scaling bursts (an arm alone, steps back to back, rollout overlapping: images/s and utilisation).

Everything raw (every round of every arm) goes to the JSON; the summary is computed from it
(benchmarks/ab_stats.py). Output: a table on stdout and benchmarks/results/ab-<tag>.json.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks.ab_stats import forward_equivalents, outliers, paired, summary  # noqa: E402
from benchmarks.bench_model import build_bench_zimage, init_ray  # noqa: E402
from dopsd_ray.rollout import RolloutWorker  # noqa: E402

# name -> (algorithm, mode for the arithmetic, overrides, batch multiplier (x K), keeps an EMA)
ARMS = {
    "sft": ("sft", "sft", [], 1, True),
    "sft_kb": ("sft", "sft", [], "k", True),
    "sft_plain": ("sft", "sft", [], 1, False),
    "dopsd_colocated": ("dopsd", "colocated", [], 1, True),
    "dopsd_onpolicy": ("dopsd", "disaggregated", ["runtime.mode=disaggregated", "runtime.max_staleness=0"], 1, True),
    "dopsd_async": ("dopsd", "async", ["runtime.mode=disaggregated", "runtime.max_staleness=1",
                                       "runtime.buffer_size=2"], 1, True),
    "dopsd_async_rollout": ("dopsd", "async_rollout", ["runtime.mode=disaggregated", "runtime.max_staleness=1",
                                                       "runtime.buffer_size=2", "runtime.teacher_targets=rollout"],
                            1, True),
}
SFT_BASELINES = ("sft", "sft_kb", "sft_plain")
DOPSD_ARMS = ("dopsd_colocated", "dopsd_onpolicy", "dopsd_async", "dopsd_async_rollout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="transformer width (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="main transformer blocks")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="B: images per learner step")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (each runs every arm once)")
    p.add_argument("--warmup", type=int, default=2, help="rounds first, saved but left out of the summary")
    p.add_argument("--ranks", default="1,2", help="learner world sizes for the memory arms and the bursts")
    p.add_argument("--burst", type=int, default=6, help="scaling: steps per burst (after 1 untimed)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory arms")
    p.add_argument("--arms", default=",".join(ARMS), help="the timing arms (comma list; default all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench"))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ab-<cpu|gpu>.json)")
    p.add_argument("--quality", action="store_true", help="run benchmarks/quality.py instead (time to quality)")
    p.add_argument("--table", default=None, help="print the README tables of this result JSON, and stop")
    p.add_argument("--quality-json", default=None, help="with --table: quality.py's JSON, for its row")
    return p.parse_args(argv)


# -- configurations ------------------------------------------------------------------------------


def arm_config(args, model_path: Path, name: str, algo: str, extra: list[str], batch: int, world: int) -> dict:
    from dopsd_ray.recipes import load_config

    overrides = [
        "model.tiny=false", f"model.path={model_path}", f"model.dtype={args.dtype}", f"algorithm.name={algo}",
        "algorithm.ema_decay=0.9999", f"lora.rank={args.lora_rank}", f"lora.alpha={2.0 * args.lora_rank}",
        f"data.pixel_budget={args.size * args.size}", "data.cache_contexts=true", f"train.batch_size={batch}",
        "train.steps=100000", f"train.output_dir={args.work_dir}/ab", f"train.run_name=ab-{name}-w{world}",
        "train.sample_every=100000000", "train.checkpoint_every=100000000", "runtime.max_failures=0",
        f"runtime.num_learners={world}", "runtime.torch_threads=1", "train.validation_prompts=[]", *extra]
    # every arm's actors live at once but compute one at a time (refill), so they share the devices:
    # on one GPU, learner ranks take half and each rollout worker a tenth of it
    if args.device.startswith("cuda"):
        overrides += ["runtime.learner_resources={GPU: 0.5}", "runtime.rollout_resources={GPU: 0.1}"]
    else:
        overrides += ["runtime.learner_resources={CPU: 1}", "runtime.rollout_resources={CPU: 0.25}"]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides).model_dump(mode="json")


def timing_arms(args, model_path: Path, world: int = 1, names=tuple(ARMS)) -> dict:
    out = {}
    for name in names:
        algo, mode, extra, mult, ema = ARMS[name]
        batch = args.batch * (4 if mult == "k" else mult)
        out[name] = {"config": arm_config(args, model_path, name, algo, extra, batch, world), "mode": mode, "ema": ema,
                     "batch": batch}
    return out


def two_workers(args, model_path: Path) -> dict:
    """dopsd_async_rollout with 2 rollout workers (the scaling burst's second row)."""
    algo, mode, extra, _, ema = ARMS["dopsd_async_rollout"]
    cfg = arm_config(args, model_path, "dopsd_async_rollout_2w", algo, [*extra, "runtime.num_rollout_workers=2"],
                     args.batch, 1)
    return {"dopsd_async_rollout_2w": {"config": cfg, "mode": mode, "ema": ema, "batch": args.batch}}


def memory_arms(args, model_path: Path, world: int) -> dict:
    out = {}
    for algo in ("sft", "dopsd"):
        for lora in (True, False):
            for stage in (2, 3):
                name = f"mem_{algo}_{'lora' if lora else 'full'}_z{stage}"
                extra = [f"lora.enabled={str(lora).lower()}", f"runtime.zero_stage={stage}"]
                out[name] = {"config": arm_config(args, model_path, name, algo, extra, args.batch, world),
                             "mode": "sft" if algo == "sft" else "colocated", "ema": True, "batch": args.batch}
        name = f"mem_{algo}_lora_z3_nocache"
        extra = ["data.cache_contexts=false", "runtime.zero_stage=3"]
        out[name] = {"config": arm_config(args, model_path, name, algo, extra, args.batch, world),
                     "mode": "sft" if algo == "sft" else "colocated", "ema": True, "batch": args.batch}
    return out


# -- the rollout side, in the driver process ----------------------------------------------------


class BenchRolloutWorker(RolloutWorker):
    """The real rollout worker, plus what the harness reads from it."""

    def bench_stats(self) -> dict:
        return dict(self.stats)

    def raw_get(self, refs: list) -> float:
        """Seconds to fetch the object behind refs[0] (the raw transfer the sync is set against)."""
        start = time.perf_counter()
        ray.get(refs[0])
        return time.perf_counter() - start


def start_arm_rollout(arm: dict, model_path: Path, dataset, contexts) -> None:
    from dopsd_ray.config import Config
    from dopsd_ray.driver import start_rollout

    cfg = Config.model_validate(arm["config"])
    if cfg.runtime.mode != "disaggregated":
        return
    workers, runs, publisher, queue = start_rollout(cfg, str(model_path), dataset, contexts, BenchRolloutWorker)
    arm.update(workers=workers, runs=runs, publisher=publisher, queue=queue)


# -- inside the Ray Train job ------------------------------------------------------------------


def trim_and_reset_peak(device) -> int:
    """Start a peak measurement; returns the baseline. GPU: max_memory_allocated from here. CPU:
    the process's resident set: freed heap goes back to the OS (malloc_trim), then the kernel's
    high-water mark VmHWM is reset to the current RSS (/proc/self/clear_refs = 5)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_since(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def unique_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def state_bytes(learner) -> dict:
    """This rank's training state, by unique storage: the weights DeepSpeed holds (ZeRO-3: this
    rank's partitions; LoRA: + the frozen base, whole, as buffers), the optimizer's fp32 masters
    and AdamW moments, the EMA's fp32 shadow; and the frozen modules still resident (encoders,
    VAE; data.cache_contexts releases the encoders)."""
    seen: set = set()
    module = learner.weights.module
    weights = unique_bytes([getattr(p, "ds_tensor", p) for p in module.parameters()], seen)
    weights += unique_bytes(module.buffers(), seen)
    opt = learner.engine.optimizer
    masters = unique_bytes(getattr(opt, "fp32_partitioned_groups_flat", None)
                           or getattr(opt, "single_partition_of_fp32_groups", None) or [], seen)
    inner = getattr(opt, "optimizer", opt)
    moments = unique_bytes([v for s in inner.state.values() for v in s.values()], seen)
    ema = unique_bytes(learner.ema.shadow, seen)
    family = getattr(learner.family, "family", learner.family)  # CachedContexts wraps the family
    frozen = unique_bytes([t for name, m in vars(family).items() if isinstance(m, torch.nn.Module)
                           and name != "transformer" for t in [*m.parameters(), *m.buffers()]], seen)
    vlm = getattr(family, "_vlm", None)
    if vlm is not None:
        frozen += unique_bytes([*vlm.model.parameters()], seen)
    return {"weights": weights, "fp32_masters": masters, "adamw": moments, "ema_shadow": ema,
            "frozen_modules": frozen, "total": weights + masters + moments + ema + frozen}


class GcClock:
    """Seconds spent in Python's garbage collector (gc.callbacks), for the outlier notes."""

    def __init__(self):
        self.seconds, self.collections, self._start = 0.0, 0, None
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections += 1
            self._start = None


def build_learner(name: str, arm: dict):
    """The arm's real learner through its public constructor: its source (its own copy of the data
    stream, in the same order, or its rollout workers' queue), its snapshots, and no EMA for
    plain SFT; set up, with the first snapshot published (Learner.start)."""
    from dopsd_ray.config import Config
    from dopsd_ray.learner import DataStream, ExperienceQueue, Learner, LearnerInputs, Snapshots
    from dopsd_ray.checkpoint import experiment_uri
    from dopsd_ray.learner.context import RayTrainContext

    cfg = Config.model_validate(arm["config"])
    inputs = LearnerInputs(arm["config"], arm["model_path"], contexts=arm.get("contexts"),
                           source=ExperienceQueue(arm["queue"]) if "queue" in arm else DataStream(f"arm_{name}"))
    if "publisher" in arm:
        inputs.snapshots = Snapshots(arm["publisher"])
    context = RayTrainContext(experiment_uri(cfg))
    learner = Learner(inputs, context, keep_ema=arm["ema"]).setup()
    learner.start()
    return learner


def refill(arm: dict, timeout_s: float = 300.0) -> float:
    """Wait until the arm's rollout workers have filled its queue (on-policy: one step's worth),
    so they are idle while another arm is timed; returns the seconds waited."""
    queue = arm.get("queue")
    if queue is None:
        return 0.0
    rt = arm["config"]["runtime"]
    want = rt["buffer_size"] if rt["max_staleness"] > 0 else rt["num_learners"] * arm["config"]["train"]["grad_accum"]
    start = time.perf_counter()
    while queue.qsize() < want:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"arm {arm['name']}: its rollout workers did not refill the queue in {timeout_s} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def worker_sync_seconds(arm: dict) -> float:
    return sum(s["sync_seconds"] for s in ray.get([w.bench_stats.remote() for w in arm.get("workers", [])]))


def timed_step(name: str, learner, arm: dict, device, gc_clock: GcClock, rank0: bool, memory: bool = False) -> dict:
    """One real learner step of `arm`, with everything the summary needs. `memory`: also its
    peak above the baseline (this runs a full GC and malloc_trim first: only in the memory
    rounds, so the timed rounds keep training's own GC pattern)."""
    before_sync = worker_sync_seconds(arm) if rank0 and "workers" in arm else 0.0
    base = trim_and_reset_peak(device) if memory else 0
    gc0, gcn0 = gc_clock.seconds, gc_clock.collections
    step = learner.train_step()
    peak = peak_since(device) - base if memory else None
    row = {"step_s": step.step_seconds, "compute_s": step.compute_seconds, "fetch_s": step.fetch_seconds,
           "waited_s": step.waited, "rollout_s": step.rollout_seconds * learner.cfg.train.grad_accum,
           "sync_s": step.sync.get("sync/seconds", 0.0), "sync_bytes": step.sync.get("sync/bytes", 0),
           "images": step.images, "states": step.metrics["trained_states"], "step_peak_bytes": peak,
           "gc_s": gc_clock.seconds - gc0, "gc_collections": gc_clock.collections - gcn0,
           "applied": step.applied}
    if rank0 and "workers" in arm:
        refill(arm)
        row["worker_sync_s"] = worker_sync_seconds(arm) - before_sync  # fetch + apply of this step's snapshot
        if row["sync_bytes"]:  # the raw transfer of the same bytes between the same two processes
            t0 = time.perf_counter()
            ref = ray.put(torch.empty(row["sync_bytes"], dtype=torch.uint8))
            put_s = time.perf_counter() - t0
            row["raw_transfer_s"] = put_s + ray.get(arm["workers"][0].raw_get.remote([ref]))
            del ref
    return row


def bare_model(family, weights, batch: dict, k: int, device) -> dict:
    """The limit, in plain torch on a separate copy of the same model (no DeepSpeed, no loss
    bookkeeping): student forward, forward+backward at B and K*B, teacher forward."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = {}
    for tag, n in (("b", 1), ("kb", k)):
        x, ctx = batch[f"x_{tag}"], batch[f"c_{tag}"]
        sigma = torch.full((x.shape[0],), 0.5, device=device)
        sync()
        t0 = time.perf_counter()
        loss = family.velocity(weights.model, x, sigma, ctx).pow(2).mean()
        loss.backward()
        sync()
        out[f"fwd_bwd_{tag}_s"] = time.perf_counter() - t0
        for p in weights.trainable_parameters():
            p.grad = None
        if tag == "b":
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                family.velocity(weights.model, x, sigma, ctx)
                sync()
                out["fwd_b_s"] = time.perf_counter() - t0
                with weights.teacher() as teacher:
                    t0 = time.perf_counter()
                    family.velocity(teacher, x, sigma, batch["ct_b"])
                    sync()
                    out["teacher_fwd_b_s"] = time.perf_counter() - t0
    return out


def bare_setup(arm: dict, sample: dict, k: int, device):
    from dopsd_ray.config import Config
    from dopsd_ray.contexts import cached_contexts
    from dopsd_ray.families import load_family, lora_targets
    from dopsd_ray.weights import make_weights

    cfg = Config.model_validate(arm["config"])
    family = load_family(cfg.model, arm["model_path"], device=device)
    if arm.get("contexts") is not None:
        family = cached_contexts(family, arm["contexts"])
    weights = make_weights(family.transformer, cfg.lora, lora_targets(cfg.model.family))
    weights.module.to(device)
    images, captions = sample["images"].to(device), sample["captions"]
    b = len(captions)
    _, _, h, w = images.shape
    with torch.no_grad():
        c_b = family.student_context(captions)
        c_kb = family.student_context(captions * k)
        ct_b = family.teacher_context(captions, images)
    gen = torch.Generator().manual_seed(0)
    return family, weights, {
        "x_b": torch.randn(family.latent_shape(b, h, w), generator=gen).to(device),
        "x_kb": torch.randn(family.latent_shape(b * k, h, w), generator=gen).to(device),
        "c_b": c_b, "c_kb": c_kb, "ct_b": ct_b}


def bench_loop(config: dict) -> None:
    """Every rank: build every arm's learner, run the rounds, then the bursts; rank 0 writes."""
    import ray.train

    ctx = ray.train.get_context()
    rank0 = ctx.get_world_rank() == 0
    torch.set_num_threads(1)
    gc_clock = GcClock()
    arms, timing = config["arms"], config["timing"]
    t0 = time.perf_counter()
    learners = {name: build_learner(name, arm) for name, arm in arms.items()}
    if rank0:
        print(f"{len(learners)} learners set up in {time.perf_counter() - t0:.0f} s", flush=True)
    device = next(iter(learners.values())).device
    result = {"world": ctx.get_world_size(), "rounds": [], "memory_state": {}, "bursts": {}}
    bare = bare_setup(arms[timing[0]], config["sample"], config["k"], device) if timing and rank0 else None
    for name in timing:  # rollout workers idle before the first round
        refill(arms[name])
    for r in range(config["rounds"] + config["warmup"] if timing else 0):
        order = timing[r % len(timing):] + timing[:r % len(timing)]  # rotate: no arm always runs first
        row = {}
        for position, name in enumerate(order):
            row[name] = {**timed_step(name, learners[name], arms[name], device, gc_clock, rank0), "position": position}
        if bare is not None:
            row["bare"] = bare_model(*bare, config["k"], device)
        result["rounds"].append(row)
        if rank0:
            print(f"round {r + 1}/{config['rounds'] + config['warmup']}"
                  + (" (warm-up)" if r < config["warmup"] else ""), flush=True)
    memory = [*timing, *config["memory"]]  # every arm: a few steps each, its peak measured
    if rank0 and config["memory_steps"]:
        print(f"memory rounds: {config['memory_steps']} steps of {len(memory)} arms", flush=True)
    result["memory_rounds"] = [{name: timed_step(name, learners[name], arms[name], device, gc_clock, rank0, True)
                                for name in memory} for _ in range(config["memory_steps"] if memory else 0)]
    result["memory_state"] = {name: state_bytes(learners[name]) for name in [*timing, *memory]}
    for name in config["bursts"] if config["burst"] else []:  # an arm alone, back to back: the rollout overlaps the learner
        learner, arm = learners[name], arms[name]
        if rank0:
            print(f"burst: {name}, {config['burst']} steps", flush=True)
        timed_step(name, learner, arm, device, gc_clock, False)  # untimed: the pipeline fills
        t0 = time.perf_counter()
        rows = [timed_step(name, learner, arm, device, gc_clock, False) for _ in range(config["burst"])]
        result["bursts"][name] = {"seconds": time.perf_counter() - t0, "steps": rows}
    import resource

    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if rank0:
        Path(config["result_file"]).write_text(json.dumps(result))


# -- the driver ------------------------------------------------------------------------------------


def run_job(args, model_path: Path, arms: dict, timing: list[str], memory: list[str], bursts: list[str], world: int,
            sample: dict, memory_steps: int = 2) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dopsd_ray.config import Config
    from dopsd_ray.contexts import fill_context_cache
    from dopsd_ray.data.stream import bundled_dataset_path, read_shards
    from dopsd_ray.driver import stop_workers

    # one fill for every arm (the same model settings): with an SFT config, so it holds the latents too
    first = Config.model_validate(next((a for a in arms.values() if a["config"]["algorithm"]["name"] == "sft"),
                                       next(iter(arms.values())))["config"])
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset, _ = read_shards(bundled_dataset_path(), first)
    dataset = dataset.materialize()
    contexts = fill_context_cache(first.model_dump(mode="json"), str(model_path), dataset,
                                  str(Path(args.work_dir) / "ab_context_cache"))
    datasets = {"train": dataset}
    for name, arm in arms.items():
        arm.update(name=name, model_path=str(model_path))
        if arm["config"]["data"]["cache_contexts"]:
            arm["contexts"] = contexts
        start_arm_rollout(arm, model_path, dataset, arm.get("contexts"))
        if "queue" not in arm:
            datasets[f"arm_{name}"] = dataset
    use_gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        loop = {"arms": {n: {k: v for k, v in a.items() if k != "runs"} for n, a in arms.items()},
                "timing": timing, "memory": memory, "bursts": bursts, "burst": args.burst, "rounds": args.rounds,
                "warmup": args.warmup, "memory_steps": memory_steps, "k": 4, "sample": sample,
                "result_file": result_file}
        trainer = TorchTrainer(
            bench_loop, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                         resources_per_worker=first.runtime.learner_resources),
            run_config=RunConfig(name=f"ab-w{world}-{int(time.time())}", storage_path=os.path.join(tmp, "ray_train")),
            datasets=datasets, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"))
        try:
            trainer.fit()
        finally:
            for arm in arms.values():
                if "workers" in arm:
                    arm["worker_stats"] = stop_workers(arm["workers"], arm["runs"])
        return json.loads(Path(result_file).read_text())


def sample_batch(args, model_path: Path) -> dict:
    """The first B bundled images at the bench size, for the bare-model timing."""
    from dopsd_ray.config import Config
    from dopsd_ray.data.batches import iter_batches
    from dopsd_ray.data.stream import bundled_dataset_path, read_shards

    cfg = Config.model_validate(arm_config(args, model_path, "sample", "sft", [], args.batch, 1))
    dataset, _ = read_shards(bundled_dataset_path(), cfg)
    images, captions, _ = next(iter_batches(dataset, args.batch, seed=0))
    return {"images": images, "captions": captions}


# -- the summary (from the raw rounds alone) ------------------------------------------------------


def arm_series(rounds: list[dict], name: str) -> dict[str, list[float]]:
    """Per round: learner device-seconds (the step, less time blocked on the experience queue),
    rollout device-seconds (make_experience + the worker's snapshot fetch and apply), and both
    per image and per trained state."""
    rows = [r[name] for r in rounds]
    learner = [x["step_s"] - x["waited_s"] for x in rows]
    rollout = [x["rollout_s"] + x.get("worker_sync_s", 0.0) for x in rows]
    device = [a + b for a, b in zip(learner, rollout)]
    return {"learner": learner, "rollout": rollout, "device": device,
            "per_image": [d / x["images"] for d, x in zip(device, rows)],
            "per_state": [d / x["states"] for d, x in zip(device, rows)]}


def limits(bare: dict, mode: str, k: int) -> tuple[float, float]:
    """(learner, rollout) seconds of the bare model for one step of `mode` at batch B (sft_kb: K*B)."""
    fb, f, t = bare["fwd_bwd_b_s"], bare["fwd_b_s"], bare["teacher_fwd_b_s"]
    return {"sft": (fb, 0.0), "sft_kb": (bare["fwd_bwd_kb_s"], 0.0), "colocated": (k * (fb + t), 0.0),
            "disaggregated": (k * (fb + t), k * f), "async": (k * (fb + t), k * f),
            "async_rollout": (k * fb, k * (f + t))}[mode]


def explain(row: dict, median: float, warmup: bool) -> str:
    """What an outlier round's own record shows (the notes are the rows' fields, not guesses)."""
    excess = row["step_s"] - median
    notes = []
    if warmup:
        notes.append("warm-up round (first shapes: allocator growth, DeepSpeed's first gathers, Ray Data start)")
    for key, what in (("gc_s", "Python GC"), ("fetch_s", "data fetch (Ray Data)"), ("waited_s", "waiting on the "
                      "experience queue"), ("sync_s", "weight sync (gather + publish)")):
        if row.get(key, 0.0) > 0.3 * excess:
            notes.append(f"{what} {row[key]:.3f} s")
    return "; ".join(notes) or "none of GC, data fetch, queue wait or sync: compute itself (machine load?)"


def summarize(jobs: dict, warmup: int, k: int) -> dict:
    job = jobs["1"]
    rounds = job["rounds"][warmup:]
    timing = [n for n in ARMS if n in rounds[0]]
    series = {n: arm_series(rounds, n) for n in timing}
    bare = {key: [r["bare"][key] for r in rounds] for key in rounds[0]["bare"]}
    out = {"arithmetic": {}, "device_seconds": {}, "per_step": {}, "limit": {}, "sync": {}, "outliers": [],
           "memory": {}, "scaling": {}}
    fe = {n: forward_equivalents(ARMS[n][1], k) for n in timing}
    for n in timing:
        out["arithmetic"][n] = fe[n]
        s = summary(series[n]["per_state"])
        out["device_seconds"][n] = {"per_state": s, "per_image": summary(series[n]["per_image"]),
                                    "learner_per_step": summary(series[n]["learner"]),
                                    "rollout_per_step": summary(series[n]["rollout"])}
    def limit_per_state(n: str, i: int) -> float:  # the bare model's seconds per trained state, round i
        lim = limits({key: bare[key][i] for key in bare}, "sft_kb" if n == "sft_kb" else ARMS[n][1], k)
        return sum(lim) / rounds[i][n]["states"]

    for d in (n for n in DOPSD_ARMS if n in timing):
        for s in (n for n in SFT_BASELINES if n in timing):
            state = paired(series[d]["per_state"], series[s]["per_state"])
            arith = fe[d]["per_state"] / fe[s]["per_state"]
            # the same ratio for the bare model (plain torch, no system): what this hardware makes of
            # the arithmetic (a batch of K*B is cheaper than K batches of B); measured / it = the system's share
            bare_ratio = paired([limit_per_state(d, i) for i in range(len(rounds))],
                                [limit_per_state(s, i) for i in range(len(rounds))])
            out["device_seconds"][f"{d}/{s}"] = {
                "per_state": state, "per_image": paired(series[d]["per_image"], series[s]["per_image"]),
                "arithmetic_per_state": arith, "overhead": state["median"] / arith,
                "overhead_target": 1.25, "met": state["median"] / arith <= 1.25,
                "bare_model_per_state": bare_ratio, "system_overhead": state["median"] / bare_ratio["median"]}
    if "dopsd_colocated" in timing and "sft" in timing:
        out["per_step"] = {"dopsd_colocated/sft": paired([r["dopsd_colocated"]["step_s"] for r in rounds],
                                                         [r["sft"]["step_s"] for r in rounds]),
                           "arithmetic": fe["dopsd_colocated"]["total"] / fe["sft"]["total"],
                           "paper": "about 4x the FLOPs and about 2x the wall time per step"}
    for n in timing:
        mode = "sft_kb" if n == "sft_kb" else ARMS[n][1]
        lim = [limits({key: bare[key][i] for key in bare}, mode, k) for i in range(len(rounds))]
        entry = {"learner": paired(series[n]["learner"], [l[0] for l in lim])}
        if lim[0][1]:
            entry["rollout"] = paired(series[n]["rollout"], [l[1] for l in lim])
        rows = [r[n] for r in rounds]
        entry["utilisation"] = summary([(x["step_s"] - x["waited_s"] - x["sync_s"]) / x["step_s"] for x in rows])
        out["limit"][n] = entry
        if any(x["sync_bytes"] for x in rows):
            total = [x["sync_s"] + x.get("worker_sync_s", 0.0) for x in rows]
            out["sync"][n] = {"bytes": rows[0]["sync_bytes"], "sync_s": summary(total),
                              "vs_raw_transfer": paired(total, [x["raw_transfer_s"] for x in rows]),
                              "share_of_step": paired(total, series[n]["learner"]), "share_target": 0.02}
    for n in timing:  # every round, warm-up included
        times = [r[n]["step_s"] for r in job["rounds"]]
        med = summary(times[warmup:])["median"]
        for i in outliers(times):
            if times[i] > 3 * med:
                out["outliers"].append({"arm": n, "round": i, "step_s": times[i], "median_s": med,
                                        "x_median": times[i] / med, "why": explain(job["rounds"][i][n], med, i < warmup)})
    for world, j in jobs.items():  # memory per learner rank: the counted state + the measured step peak
        per_arm = {}
        for n, state in j["memory_state"].items():
            peaks = [r[n]["step_peak_bytes"] for r in j["memory_rounds"] if n in r]
            if not peaks:  # --no-memory
                continue
            peak = max(peaks[1:] or peaks)  # after the first step (which creates the AdamW moments)
            per_arm[n] = {**state, "step_peak": peak, "per_rank": state["total"] + peak}
        ratios = {}
        for n in per_arm:
            if n.startswith("mem_dopsd") and n.replace("mem_dopsd", "mem_sft") in per_arm:
                s = n.replace("mem_dopsd", "mem_sft")
                ratios[n.replace("mem_dopsd_", "")] = per_arm[n]["per_rank"] / per_arm[s]["per_rank"]
        if "dopsd_colocated" in per_arm and "sft" in per_arm:  # the timing arms: LoRA, ZeRO-3, cached
            ratios["lora_z3_timing_arms"] = per_arm["dopsd_colocated"]["per_rank"] / per_arm["sft"]["per_rank"]
        if "dopsd_colocated" in per_arm and "sft_kb" in per_arm:  # against SFT training as many states per step
            ratios["lora_z3_vs_sft_kb"] = per_arm["dopsd_colocated"]["per_rank"] / per_arm["sft_kb"]["per_rank"]
        out["memory"][f"world{world}"] = {"arms": per_arm, "dopsd_over_sft": ratios, "lora_target": 1.3,
                                          "process_max_rss_bytes": j.get("max_rss_bytes")}
        for n, b in j["bursts"].items():
            rows = b["steps"]
            busy = sum(x["step_s"] - x["waited_s"] - x["sync_s"] for x in rows)
            out["scaling"][f"{n}@world{world}"] = {
                "images_per_s": sum(x["images"] for x in rows) * int(world) / b["seconds"],
                "learner_utilisation": busy / b["seconds"], "steps": len(rows)}
    return out


# -- main --------------------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    s = res["summary"]
    print(f"\nD-OPSD / SFT, total device-seconds (learner + rollout workers), paired per round "
          f"(median [IQR] mean max), {res['args']['rounds']} rounds after {res['args']['warmup']} warm-up")
    print(f"{'pair':38s} {'per trained state':>30s} {'arith':>6s} {'overhead':>8s}  {'per image':>20s}")
    for key, v in s["device_seconds"].items():
        if "/" not in key:
            continue
        p, i = v["per_state"], v["per_image"]
        print(f"{key:38s} {p['median']:6.2f} [{p['q25']:.2f}-{p['q75']:.2f}] {p['mean']:5.2f} {p['max']:5.2f} "
              f"{v['arithmetic_per_state']:6.2f} {v['overhead']:7.2f}{'*' if not v['met'] else ' '} "
              f"{i['median']:6.2f} [{i['q25']:.2f}-{i['q75']:.2f}]")
    if s["per_step"]:
        p = s["per_step"]["dopsd_colocated/sft"]
        print(f"per step, colocated D-OPSD / SFT (batch B): {p['median']:.2f} (arithmetic "
              f"{s['per_step']['arithmetic']:.2f}; paper: ~4x FLOPs, ~2x wall)")
    print("\ndistance from the limit (learner step / bare model), learner utilisation (sync counted)")
    for n, v in s["limit"].items():
        roll = f"  rollout {v['rollout']['median']:.2f}" if "rollout" in v else ""
        print(f"  {n:24s} learner {v['learner']['median']:.2f}{roll}  utilisation {v['utilisation']['median']:.3f}")
    for n, v in s["sync"].items():
        print(f"  sync {n:20s} {v['bytes'] / 1e6:.1f} MB {v['sync_s']['median']:.3f} s; vs raw "
              f"{v['vs_raw_transfer']['median']:.2f}x; share of step {v['share_of_step']['median']:.3f}")
    for w, m in s["memory"].items():
        print(f"  memory {w}: D-OPSD/SFT per rank " + ", ".join(f"{k} {v:.2f}" for k, v in m["dopsd_over_sft"].items()))
    for n, v in s["scaling"].items():
        print(f"  burst {n:34s} {v['images_per_s']:.2f} img/s, utilisation {v['learner_utilisation']:.2f}")
    for o in s["outliers"]:
        print(f"  outlier {o['arm']} round {o['round']}: {o['step_s']:.2f} s = {o['x_median']:.1f}x median; {o['why']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quality:
        from benchmarks import quality

        return quality.main([])
    if args.table:
        q = json.loads(Path(args.quality_json).read_text()) if args.quality_json else None
        res = json.loads(Path(args.table).read_text())
        print(readme_table(res, q), memory_table(res), sep="\n\n")
        return 0
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    model_path = build_bench_zimage(work / f"zimage-d{args.dim}-l{args.layers}-r1", args.dim, args.layers, 1)
    init_ray(log_to_driver=True)  # the learner's round-by-round progress
    started = time.time()
    sample = sample_batch(args, model_path)
    worlds = [int(w) for w in args.ranks.split(",") if w]
    chosen = [n for n in args.arms.split(",") if n]
    unknown = [n for n in chosen if n not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    jobs = {}
    for world in worlds:
        if world == 1:
            timing = chosen
            arms = timing_arms(args, model_path, 1, timing)
            if "dopsd_async_rollout" in timing:
                arms.update(two_workers(args, model_path))
            bursts = [n for n in ("sft", "dopsd_colocated", "dopsd_async_rollout", "dopsd_async_rollout_2w") if n in arms]
        else:
            timing, bursts = [], [n for n in ("sft", "dopsd_colocated") if n in chosen]
            arms = timing_arms(args, model_path, world, bursts)
        memory = []
        if not args.no_memory:
            mem = memory_arms(args, model_path, world)
            arms.update(mem)
            memory = list(mem)
        print(f"\njob: {world} learner rank(s), {len(arms)} arms", flush=True)
        jobs[str(world)] = run_job(args, model_path, arms, timing, memory, bursts, world, sample,
                                   memory_steps=0 if args.no_memory else 2)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
    res = {"host": socket.gethostname(), "device": device, "torch": torch.__version__, "args": vars(args),
           "load_average": os.getloadavg(), "seconds": None, "arms": {n: {"algorithm": a[0], "mode": a[1],
           "overrides": a[2], "batch": args.batch * (4 if a[3] == "k" else a[3]), "ema": a[4]} for n, a in ARMS.items()},
           "jobs": jobs}
    res["summary"] = summarize(jobs, args.warmup, 4)
    res["seconds"] = time.time() - started
    print_table(res)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"ab-{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {out} ({res['seconds']:.0f} s)")
    return 0



def memory_label(key: str) -> str:
    """A memory ratio's key as the README table names it."""
    return key.replace("_timing_arms", " (the timing arms)").replace("_vs_sft_kb", " against SFT at K*B")


def readme_table(res: dict, quality: dict | None = None) -> str:
    """The README's headline table from a result JSON (and quality.py's), so it is refreshed, not retyped:
    python benchmarks/ab.py --table benchmarks/results/ab-cpu.json [--quality-json ...]."""
    s = res["summary"]
    d, lim, sync, mem, scal = s["device_seconds"], s["limit"], s["sync"], s["memory"], s["scaling"]

    def cell(p, fmt="{:.2f}"):
        return f"{fmt.format(p['median'])} [{fmt.format(p['q25'])}-{fmt.format(p['q75'])}], max {fmt.format(p['max'])}"

    def met(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    device = ("learner step (fetch, ZeRO gather, publish included; queue waits not) + rollout make_experience "
              "+ the worker's snapshot fetch and apply; excludes setup, grids, checkpoints")
    rows = []
    for arm, label in (("dopsd_colocated", "colocated"), ("dopsd_onpolicy", "disaggregated on-policy"),
                       ("dopsd_async", "async"), ("dopsd_async_rollout", "async, teacher targets on rollout")):
        pairs = [(base, d[f"{arm}/{base}"]) for base in ("sft", "sft_kb", "sft_plain") if f"{arm}/{base}" in d]
        if not pairs:
            continue
        short = {"sft": "B", "sft_kb": "K*B", "sft_plain": "plain"}
        measured = "; ".join(f"{short[b]}: {cell(v['per_state'])}" for b, v in pairs)
        over = ", ".join(f"{v['overhead']:.2f} ({short[b]}: {met(v['met'])})" for b, v in pairs)
        bare = ", ".join(f"{v['bare_model_per_state']['median']:.2f} ({short[b]})" for b, v in pairs)
        rows.append((f"device-s per trained state, D-OPSD {label} / SFT at batch B, K*B, plain (no EMA)", measured,
                     f"count {pairs[0][1]['arithmetic_per_state']:.2f}; measured / count {over}, target <= 1.25; "
                     f"the bare model's own ratio {bare}", device))
    if s["per_step"]:
        p = s["per_step"]
        rows.append(("seconds per step, D-OPSD colocated / SFT, same batch B", cell(p["dopsd_colocated/sft"]),
                     f"count {p['arithmetic']:.2f}; paper: ~4x the FLOPs, ~2x the wall time",
                     "the learner's whole step; SFT with cached contexts and latents"))
    for arm in ("sft", "sft_kb", "dopsd_colocated", "dopsd_async_rollout"):
        if arm in lim:
            rows.append((f"learner step / bare model, {arm}", cell(lim[arm]["learner"]), "the distance from the limit",
                         "bare: plain torch forward+backward (+ teacher forward where the learner runs it) of a "
                         "separate model copy, same round"))
    for arm in ("dopsd_onpolicy", "dopsd_async_rollout"):
        if arm in lim:
            u = lim[arm]["utilisation"]
            rows.append((f"learner utilisation, {arm}", cell(u, "{:.3f}"), f">= 0.90: {met(u['median'] >= 0.9)}",
                         "(step - queue wait - sync) / step; the harness refills the queue between arms"))
    for arm, v in sync.items():
        rows.append((f"LoRA sync / learner step, {arm} ({v['bytes'] / 1e6:.1f} MB)", cell(v["share_of_step"], "{:.3f}"),
                     f"<= 0.02: {met(v['share_of_step']['median'] <= 0.02)}; sync / raw transfer of the same bytes "
                     f"{v['vs_raw_transfer']['median']:.2f}x", "gather + publish on the learner + fetch and apply on "
                     "the worker; raw: one ray.put + ray.get between the same processes"))
    for world, m in mem.items():
        r = m["dopsd_over_sft"]
        lora = [k for k in r if k.startswith("lora")]
        rows.append((f"memory per learner rank, D-OPSD / SFT, {world.replace('world', '')} rank(s)",
                     ", ".join(f"{memory_label(k)} {v:.2f}" for k, v in r.items()),
                     f"LoRA <= 1.3: {met(all(r[k] <= 1.3 for k in lora if k != 'lora_z3_vs_sft_kb'))}",
                     "counted state (weights held, fp32 masters, AdamW, EMA shadow, resident encoders/VAE) + the "
                     "step's measured peak above it (CPU: VmHWM after malloc_trim)"))
    if "dopsd_async_rollout_2w@world1" in scal and "dopsd_async_rollout@world1" in scal:
        a, b = scal["dopsd_async_rollout@world1"], scal["dopsd_async_rollout_2w@world1"]
        rows.append(("images/s, 2 rollout workers / 1 (async, rollout targets)",
                     f"{b['images_per_s'] / a['images_per_s']:.2f} (utilisation {a['learner_utilisation']:.2f} -> "
                     f"{b['learner_utilisation']:.2f})", "2 CPU cores: shows contention, not scaling",
                     "a burst of steps back to back, rollout overlapping"))
    for arm in ("sft", "dopsd_colocated"):
        if f"{arm}@world2" in scal and f"{arm}@world1" in scal:
            rows.append((f"images/s, 2 learner ranks / 1, {arm}",
                         f"{scal[f'{arm}@world2']['images_per_s'] / scal[f'{arm}@world1']['images_per_s']:.2f}",
                         "2 CPU cores: shows contention, not scaling", "a burst of steps back to back"))
    if quality and quality.get("ratio_dopsd_over_sft") is not None:
        q, every = quality["reached"], quality["args"]["export_every"]

        def seeds(method):  # device-seconds (and the step) per seed at the first export that reached it
            runs = sorted((r for r in quality["runs"].values() if r["method"] == method), key=lambda r: r["seed"])
            return ", ".join(f"{r['reached']['device_s']:.1f} s (step {r['reached']['step']})" if r["reached"]
                             else "not reached" for r in runs)
        at_sft = [p for p in quality["dopsd_at_sft_device_s"]["points"] if p]
        rows.append(("device-s to quality, D-OPSD / SFT, toy (colocated, LoRA, batch 4)",
                     f"{quality['ratio_dopsd_over_sft']:.2f} (medians of {q['dopsd']['seeds']} seeds: D-OPSD "
                     f"{q['dopsd']['device_s_median']:.1f} s: {seeds('dopsd')}; SFT {q['sft']['device_s_median']:.1f} s: "
                     f"{seeds('sft')})",
                     "concept >= 0.95 and prior >= 0.95x base; D-OPSD at SFT's device-seconds: " +
                     (", ".join(f"concept {p['concept']:.2f}" for p in at_sft) if at_sft else
                      f"no export yet (its first, at step {every}, comes later)"),
                     "benchmarks/quality.py: the learner's step seconds (no rollout workers: colocated) up to the "
                     f"first export (every {every} steps) that reaches it; the miniature's evaluator"))
    lines = ["| ratio | measured: median [IQR], max | count, target | counts / leaves out |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    return "\n".join(lines)


def memory_table(res: dict) -> str:
    """Memory per learner rank, arm by arm (MB): the counted state and the step's measured peak above it."""
    lines = ["| ranks | arm | weights held | fp32 masters | AdamW | EMA shadow | encoders/VAE | state | "
             "step peak above it | per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for world, m in res["summary"]["memory"].items():
        for name, a in m["arms"].items():
            if not name.startswith("mem_"):
                continue
            mb = [a[k] / 1e6 for k in ("weights", "fp32_masters", "adamw", "ema_shadow", "frozen_modules", "total",
                                       "step_peak", "per_rank")]
            lines.append(f"| {world.replace('world', '')} | {name.replace('mem_', '')} | "
                         + " | ".join(f"{v:.1f}" for v in mb) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
