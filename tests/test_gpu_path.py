"""The GPU path, shown on a CPU: what crosses processes, bf16 numerics, DeepSpeed settings, memory.

    rollout workers queue CPU tensors only, and Experience.to moves every tensor (every family)
    a rollout worker builds the EMA teacher only where it computes teacher targets
    snapshots are applied bucket by bucket; a half-lost one leaves the worker without a version
    the first snapshot waits runtime.startup_timeout_s, not sync_timeout_s
    bf16 under ZeRO-3: the EMA teacher follows an fp32 reference EMA (and resumes exactly)
    runtime.offload_optimizer=true trains with the learner's torch AdamW
    LoRA: the frozen base stays whole outside ZeRO-3's partitions, with unchanged outputs
    sample grids decode one image at a time, and not at all on ranks that do not show them

The device itself cannot be shown here: "meta" stands in for a GPU where only placement is
checked (Experience.to), and benchmarks/gpu_check.py repeats these checks on a real GPU.
"""

from pathlib import Path

import deepspeed
import pytest
import torch

from dopsd_ray.algorithms.steps import Batch
from dopsd_ray.checkpoint import check_checkpoint, load_checkpoint, write_checkpoint_files
from dopsd_ray.recipes import load_config
from dopsd_ray.families import build_tiny, load_family, lora_targets
from dopsd_ray.learner import deepspeed_config
from dopsd_ray.preview import student_samples, teacher_samples, validation_set
from dopsd_ray.rollout import RolloutWorker
from dopsd_ray.sync.buckets import gather_zero3_buckets
from dopsd_ray.sync.object_store import SnapshotLost, WeightStore
from dopsd_ray.tensors import tensors_in
from dopsd_ray.weights import STUDENT, TEACHER, EmaTeacher, make_weights, state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAMILIES = {
    "zimage": [],
    "flux2_klein": ["model.family=flux2_klein", "model.max_sequence_length=160", "algorithm.training_sigmas=inference"],
    "toy": ["model.family=toy", "model.max_sequence_length=12"],
}
DISAGG = ["runtime.mode=disaggregated", "runtime.torch_threads=1"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_path")
    return {name: build_tiny(load_config(TINY, o).model, root / name) for name, o in FAMILIES.items()}


def worker(tiny_dirs, family, *overrides):
    cfg = load_config(TINY, [*FAMILIES[family], *DISAGG, *overrides])
    return RolloutWorker(cfg.model_dump(mode="json"), str(tiny_dirs[family]), index=0)


def batch_for(w, n=2):
    side = w.family.pixel_multiple * 2
    images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Batch(images, ["a red circle", "a blue square"][:n], [f"id{i}" for i in range(n)])


# -- what crosses the queue ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["dopsd", "dopsd_targets_on_worker", "sft"])
def test_rollout_worker_queues_cpu_tensors_and_experience_to_moves_every_tensor(tiny_dirs, family, kind):
    overrides = {"dopsd": [], "sft": ["algorithm.name=sft"],
                 "dopsd_targets_on_worker": ["runtime.teacher_targets=rollout", "runtime.max_staleness=1"]}[kind]
    w = worker(tiny_dirs, family, *overrides)
    exp = w.rollout(batch_for(w))
    tensors = list(tensors_in(exp))
    # contexts included: Z-Image's is a list of per-caption tensors, FLUX.2's and the toy's dataclasses
    assert len(list(tensors_in(exp.student_context))) >= 1
    assert len(tensors) >= {"dopsd": 5, "dopsd_targets_on_worker": 5, "sft": 4}[kind]
    assert {t.device.type for t in tensors} == {"cpu"}
    # "meta" stands in for the learner's GPU: every tensor, however nested, must move
    moved = list(tensors_in(exp.to("meta", non_blocking=True)))
    assert len(moved) == len(tensors) and {t.device.type for t in moved} == {"meta"}
    for context in (exp.student_context, exp.teacher_context):
        if context is not None:
            assert {t.device.type for t in tensors_in(context.to("meta"))} == {"meta"}


@pytest.mark.parametrize("lora", [True, False])
def test_rollout_workers_build_the_teacher_only_where_they_compute_targets(tiny_dirs, lora):
    full = [] if lora else ["lora.enabled=false"]
    learner_side = worker(tiny_dirs, "zimage", *full)
    assert learner_side.weights.teacher_parameters() == [] and learner_side.weights.named_parameters(TEACHER) == []
    with pytest.raises(RuntimeError, match="without a teacher"):
        with learner_side.weights.teacher():
            pass
    worker_side = worker(tiny_dirs, "zimage", *full, "runtime.teacher_targets=rollout", "runtime.max_staleness=1")
    assert len(worker_side.weights.teacher_parameters()) == len(worker_side.weights.trainable_parameters())


# -- snapshots -----------------------------------------------------------------------------------------
def snapshot_buckets(state: dict, size: int) -> list[dict]:
    keys = list(state)
    return [{k: state[k] for k in keys[i:i + size]} for i in range(0, len(keys), size)]


def test_snapshots_are_applied_bucket_by_bucket_and_a_lost_one_leaves_no_version(tiny_dirs):
    w = worker(tiny_dirs, "zimage", "runtime.teacher_targets=rollout", "runtime.max_staleness=1")
    student = {k: torch.randn_like(v) for k, v in state_dict(w.weights, STUDENT).items()}
    teacher = {f"{TEACHER}/{k}": torch.randn_like(v) for k, v in state_dict(w.weights, TEACHER).items()}
    buckets = snapshot_buckets({**student, **teacher}, size=5)
    assert len(buckets) > 2

    seen = []

    def lazily(items):  # the way fetch_snapshot hands them over: one at a time
        for b in items:
            seen.append(len(seen))
            yield b

    assert w.load_snapshot(7, 3, lazily(buckets))
    assert (w.version, w.generation) == (7, 3) and seen == list(range(len(buckets)))
    assert all(torch.equal(state_dict(w.weights, STUDENT)[k], v) for k, v in student.items())
    assert all(torch.equal(state_dict(w.weights, TEACHER)[k.split("/", 1)[1]], v) for k, v in teacher.items())

    def lost_half_way():
        yield buckets[0]
        raise SnapshotLost("bucket 2 is gone")

    assert not w.load_snapshot(8, 3, lost_half_way())
    assert w.version == -1  # half-applied weights are never used under a version
    with pytest.raises(KeyError, match="misses"):
        w.load_snapshot(9, 3, iter(buckets[:-1]))
    with pytest.raises(KeyError, match="not a student weight"):
        w.load_snapshot(9, 3, iter([{"no.such.weight": torch.zeros(1)}]))


def test_the_first_snapshot_waits_the_startup_timeout(tiny_dirs):
    w = worker(tiny_dirs, "zimage", "runtime.startup_timeout_s=0.3", "runtime.sync_timeout_s=600")
    with pytest.raises(TimeoutError, match=r"runtime.startup_timeout_s=0.3"):
        w.wait_for_snapshot(WeightStore(), per_version=1)  # nothing is ever published


# -- DeepSpeed in this process: bf16 EMA, offload, the frozen base -----------------------------------
def full(named) -> dict[str, torch.Tensor]:
    """Whole tensors from ZeRO-3 partitions, as the learner's checkpoints gather them."""
    return {k: v for b in gather_zero3_buckets(list(named), 10**9) for k, v in b.items()}


def gathered(named) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in full(named).items()}


def engine_for(tiny_dir, *overrides):
    cfg = load_config(TINY, ["train.batch_size=1", *overrides])
    family = load_family(cfg.model, tiny_dir, transformer_device="cpu")
    weights = make_weights(family.transformer, cfg.lora, lora_targets(cfg.model.family))
    weights.base_as_buffers()
    optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=cfg.optim.lr)
    engine, optimizer, _, _ = deepspeed.initialize(model=weights.module, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    return cfg, family, weights, engine, optimizer


def train_step(family, weights, engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(family.latent_shape(1, 32, 32), generator=g)
    context = family.student_context(["a red circle"])
    loss = family.velocity(weights.model, x, torch.tensor(0.75), context).pow(2).mean()
    engine.backward(loss)
    engine.step()


def test_bf16_ema_teacher_follows_an_fp32_reference_under_zero3_and_resumes_exactly(
        deepspeed_world1, tiny_zimage_dir, tmp_path):
    """bf16 cannot hold `lerp_(student, 1 - 0.999)`: a bf16 EMA rounds most updates away. With
    the fp32 shadow the bf16 teacher is the fp32 reference EMA, rounded once."""
    decay = 0.999
    cfg, family, weights, engine, optimizer = engine_for(tiny_zimage_dir, "model.dtype=bfloat16", "optim.lr=0.05")
    assert all(hasattr(p, "ds_id") for p in weights.teacher_parameters())  # ZeRO-3 shards, bf16
    assert {p.dtype for p in weights.teacher_parameters()} == {torch.bfloat16}
    ema = EmaTeacher(weights)
    assert ema.separate
    start = gathered(weights.named_parameters(TEACHER))
    reference = dict(start)
    for step in range(40):
        train_step(family, weights, engine, step)
        ema.step(decay)
        student = gathered(weights.named_parameters(STUDENT))
        reference = {k: decay * reference[k] + (1 - decay) * student[k] for k in reference}
    teacher = gathered(weights.named_parameters(TEACHER))
    worst_error = max(((teacher[k] - reference[k]).abs() - reference[k].abs() * 2 ** -8).max().item()
                      for k in teacher)
    assert worst_error <= 1e-12, "the bf16 teacher is not the fp32 EMA rounded to bf16"
    moved = max(((reference[k] - start[k]).abs() - reference[k].abs() * 2 ** -6).max().item() for k in teacher)
    assert moved > 0, "the reference EMA moved less than bf16 rounding: the test would prove nothing"

    # the shadow is checkpointed per rank and restored bit for bit
    write_checkpoint_files(tmp_path, 0, 1, 40, {}, optimizer, full(weights.named_parameters(STUDENT)),
                           full(weights.named_parameters(TEACHER)), ema.state())
    assert check_checkpoint(tmp_path) is None and (tmp_path / "ema_rank0.safetensors").is_file()
    fresh = make_weights(load_family(cfg.model, tiny_zimage_dir).transformer, cfg.lora, lora_targets("zimage"))
    resumed = load_checkpoint(tmp_path, fresh, rank=0, world=1)
    saved = [s.clone() for s in ema.shadow]
    for s in ema.shadow:
        s.add_(1.0)
    resumed.restore_ema(ema)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, saved))
    assert all(torch.equal(t, s.to(torch.bfloat16)) for t, s in zip(ema.teacher, ema.shadow))


def two_rank_ema(rank: int, rendezvous: str, tiny_dir: str, out: str, release: bool) -> None:
    """One of two gloo ranks: bf16 ZeRO-3 LoRA steps with the learner's EMA; rank 0 writes
    the largest gap between the teacher and the fp32 reference EMA (in bf16 ulps)."""
    import json
    import os

    import torch.distributed as dist

    from dopsd_ray.learner import release_stale_gathers

    torch.set_num_threads(1)
    # a file rendezvous: no free port to race for with other processes on the machine; DeepSpeed
    # then takes the group as it is (its env check only wants the variables present)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    deepspeed.init_distributed(dist_backend="gloo")
    _, family, weights, engine, _ = engine_for(tiny_dir, "model.dtype=bfloat16", "optim.lr=0.05")
    ema = EmaTeacher(weights)
    reference = gathered(weights.named_parameters(TEACHER))
    for step in range(6):
        train_step(family, weights, engine, step)
        ema.step(0.9)
        if release:
            release_stale_gathers(weights.teacher_parameters())
        student = gathered(weights.named_parameters(STUDENT))
        reference = {k: 0.9 * reference[k] + 0.1 * student[k] for k in reference}
    teacher = gathered(weights.named_parameters(TEACHER))
    gap = max(((teacher[k] - reference[k]).abs() / (reference[k].abs() * 2 ** -8 + 1e-12)).max().item()
              for k in teacher)
    if rank == 0:
        Path(out).write_text(json.dumps({"gap_ulps": gap}))
    dist.destroy_process_group()


def test_two_ranks_zero3_teacher_is_not_read_one_ema_step_late(tiny_zimage_dir, tmp_path):
    """ZeRO-3 keeps small parameters gathered and re-gathers them right after the optimizer
    step, before the EMA: unless released, every read of them lags one EMA step (at one rank
    the gathered copy shares the shard's memory, so this needs two). Without
    learner.release_stale_gathers this run's gap was > 4 ulps."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "gap.json"
    mp.spawn(two_rank_ema, args=(str(tmp_path / "rendezvous"), str(tiny_zimage_dir), str(out), True), nprocs=2,
             join=True)
    gap = json.loads(out.read_text())["gap_ulps"]
    assert gap <= 1.0, f"the teacher is {gap:.1f} bf16 ulps from the fp32 EMA"


@pytest.mark.parametrize("stage", [3, 2])
def test_offloaded_optimizer_trains_with_the_learners_torch_adamw(deepspeed_world1, tiny_zimage_dir, stage):
    _, family, weights, engine, _ = engine_for(tiny_zimage_dir, "runtime.offload_optimizer=true",
                                               f"runtime.zero_stage={stage}", "optim.lr=0.01")
    before = gathered(weights.named_parameters(STUDENT))
    train_step(family, weights, engine, 0)
    assert engine.was_step_applied()
    after = gathered(weights.named_parameters(STUDENT))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_zero3_leaves_the_frozen_lora_base_whole_and_the_outputs_unchanged(deepspeed_world1, tiny_zimage_dir):
    cfg = load_config(TINY)
    family = load_family(cfg.model, tiny_zimage_dir)
    weights = make_weights(family.transformer, cfg.lora, lora_targets("zimage"))
    x = torch.randn(family.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))
    context = family.student_context(["a red circle"])
    with torch.no_grad():
        expected = family.velocity(weights.model, x, torch.tensor(0.5), context)
    base = sum(p.numel() for p in weights.module.parameters() if not p.requires_grad) - sum(
        p.numel() for p in weights.teacher_parameters())
    assert weights.base_as_buffers() == base > 0
    engine, *_ = deepspeed.initialize(model=weights.module, optimizer=torch.optim.AdamW(
        weights.trainable_parameters(), lr=1e-3), config=deepspeed_config(cfg))
    params = dict(engine.module.named_parameters())
    assert all(".student." in k or ".teacher." in k for k in params)  # nothing else is partitioned
    assert all(hasattr(p, "ds_id") for p in params.values())
    frozen = [b for k, b in engine.module.named_buffers() if k.endswith(".weight")]
    assert frozen and all(b.numel() > 0 and not hasattr(b, "ds_id") for b in frozen)  # whole, on every rank
    with torch.no_grad():
        torch.testing.assert_close(family.velocity(weights.model, x, torch.tensor(0.5), context), expected)


# -- sample grids ----------------------------------------------------------------------------------------
def test_grids_decode_one_image_at_a_time_and_only_where_shown(tiny_dirs):
    w = worker(tiny_dirs, "zimage", "runtime.teacher_targets=rollout", "runtime.max_staleness=1")
    cfg, weights, batch = w.cfg, w.weights, batch_for(w, n=2)
    val = validation_set(cfg, (batch.captions, batch.images), prompts=["a cross"])
    steps = cfg.algorithm.inference_steps
    decoded = []
    hook = w.family.vae.decoder.register_forward_hook(lambda m, args, out: decoded.append(args[0].shape[0]))
    try:
        assert student_samples(w.family, weights.model, val, steps, decode=False) is None
        assert teacher_samples(w.family, weights, val, steps, decode=False) is None
        assert decoded == []  # ranks > 0 take part in the sampling forwards, and decode nothing
        student = student_samples(w.family, weights.model, val, steps)
        teacher = teacher_samples(w.family, weights, val, steps)
    finally:
        hook.remove()
    # 3 student columns (a prompt, 2 pairs) + 2 teacher columns (the pairs), one image per decode
    assert decoded == [1] * 5 and student.shape[0] == 3 and teacher.shape[0] == 2
