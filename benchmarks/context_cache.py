"""What the context cache (data.cache_contexts) saves a learner: seconds per step and encoder memory.

    python benchmarks/context_cache.py                      # tiny Z-Image (VLM teacher) and the toy, CPU
    python benchmarks/context_cache.py --device cuda --rounds 20

For each model, one learner step as the colocated learner takes it (contexts, D-OPSD loss
over all K states, backward, AdamW on the LoRA adapters, EMA teacher), timed in paired
rounds: the same batch through a family computing its contexts and through one reading
them from a filled cache (contexts.cached_contexts), the order alternating every round so
both see the same machine state. Plain torch in one process (no Ray, no DeepSpeed): the
cache changes only the context part of a step, and that is what is measured.

    zimage-tiny-vlm   configs/tiny.yaml: the tiny random Z-Image, its tiny Qwen3-VL teacher
                      encoder, the bundled data at 64 x 64, batch 2
    toy               configs/toy.yaml: the committed toy base (models/toy), the toy concept
                      images at 32 x 32, batch 4

Per model: step seconds with and without the cache (median, max) and their paired ratio;
the seconds one step's contexts take alone, computed and looked up; the bytes of encoder
parameters and buffers released (Family.release_encoders); this process's resident memory
before and after the release; with CUDA, the GPU memory allocated before and after it and
each variant's peak over its steps. The fill (the one pass computing every context) is
timed too. Both variants must give the same losses: checked every round.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_model import write_result  # noqa: E402
from dopsd_ray.algorithms.schedules import training_sigmas  # noqa: E402
from dopsd_ray.algorithms.steps import Batch, colocated_loss  # noqa: E402
from dopsd_ray.recipes import load_config  # noqa: E402
from dopsd_ray.contexts import cached_contexts, fill_context_cache  # noqa: E402
from dopsd_ray.data.shards import list_sources, load_row  # noqa: E402
from dopsd_ray.data.batches import collate  # noqa: E402
from dopsd_ray.data.stream import StreamSpec, bundled_dataset_path, decode_row, make_buckets  # noqa: E402
from dopsd_ray.families import build_tiny, load_family, lora_targets  # noqa: E402
from dopsd_ray.weights import EmaTeacher, make_weights  # noqa: E402

MODELS = {"zimage-tiny-vlm": ROOT / "configs" / "tiny.yaml", "toy": ROOT / "configs" / "toy.yaml"}


def decoded_rows(cfg, multiple: int) -> list[dict]:
    """The data's rows through the real decode (data/stream.py), without Ray."""
    spec = StreamSpec.from_config(cfg, multiple=multiple)
    buckets = make_buckets(spec.pixel_budget, spec.multiple, spec.max_aspect_ratio)
    rows = []
    for source in list_sources(cfg.data.path or bundled_dataset_path()):
        row, _ = load_row(source)
        decoded, _ = decode_row(row, spec, buckets) if row else (None, None)
        if decoded:
            rows.append(decoded)
    return rows


def rss() -> int:
    return psutil.Process().memory_info().rss


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "min": min(values), "n": len(values)}


class Learner:
    """One variant's weights, optimizer and EMA teacher over a family (cached or not)."""

    def __init__(self, family, cfg, device):
        torch.manual_seed(cfg.train.seed)  # the same initial adapters for both variants
        self.family, self.cfg = family, cfg
        self.weights = make_weights(family.transformer, cfg.lora, lora_targets(cfg.model.family))
        self.weights.module.to(device)
        self.optimizer = torch.optim.AdamW(self.weights.trainable_parameters(), lr=cfg.optim.lr)
        self.ema = EmaTeacher(self.weights)

    def step(self, batch: Batch, sigmas) -> tuple[float, float]:
        """(loss, seconds)"""
        sync()
        start = time.perf_counter()
        loss, _ = colocated_loss(self.family, self.weights, batch, sigmas, self.cfg.algorithm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.weights.trainable_parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.cfg.algorithm.ema_decay)
        sync()
        return loss.item(), time.perf_counter() - start


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def context_seconds(family, batch: Batch) -> float:
    sync()
    start = time.perf_counter()
    family.student_context(batch.captions)
    family.teacher_context(batch.captions, batch.images.to(family.device))
    sync()
    return time.perf_counter() - start


def measure(name: str, args, work: Path) -> dict:
    cfg = load_config(MODELS[name], [f"train.seed={args.seed}"])
    device = torch.device(args.device)
    model_path = str(build_tiny(cfg.model, work / name / "model", cfg.train.seed)) if cfg.model.tiny else cfg.model.path
    plain = load_family(cfg.model, model_path, device=device)
    rows = decoded_rows(cfg, plain.pixel_multiple)
    fill = fill_context_cache(cfg.model_dump(mode="json"), model_path, rows, str(work / name / "cache"))
    if hasattr(plain, "vlm") and cfg.model.teacher_context == "vlm":
        plain.vlm  # noqa: B018 - load the VLM now, as a learner's first teacher context would
    family = load_family(cfg.model, model_path, device=device)
    if hasattr(family, "vlm") and cfg.model.teacher_context == "vlm":
        family.vlm  # noqa: B018 - held until released, like a learner without the cache
    gc.collect()
    rss_before, gpu_before = rss(), torch.cuda.memory_allocated() if device.type == "cuda" else None
    cached = cached_contexts(family, fill)
    rss_after, gpu_after = rss(), torch.cuda.memory_allocated() if device.type == "cuda" else None

    variants = {"computed": Learner(plain, cfg, device), "cached": Learner(cached, cfg, device)}
    b = cfg.train.batch_size
    buckets = {}
    for row in rows:
        buckets.setdefault((row["height"], row["width"]), []).append(row)
    batches = [collate(group[i:i + b]) for group in buckets.values() for i in range(0, len(group) - b + 1, b)]
    seconds = {k: [] for k in variants}
    peaks = {k: 0 for k in variants}
    contexts_s, max_loss_gap = {"computed": [], "cached": []}, 0.0
    for r in range(args.warmup + args.rounds):
        images, captions, ids = batches[r % len(batches)]
        batch = Batch(images, captions, ids, index=r, seed=cfg.train.seed)
        algo = cfg.algorithm
        sigmas = training_sigmas(algo.training_sigmas, plain, *images.shape[-2:], algo.inference_steps)
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        losses = {}
        for key in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            losses[key], step_s = variants[key].step(batch, sigmas)
            if device.type == "cuda":
                peaks[key] = max(peaks[key], torch.cuda.max_memory_allocated())
            if r >= args.warmup:
                seconds[key].append(step_s)
        if r >= args.warmup:
            contexts_s["computed"].append(context_seconds(plain, batch))
            contexts_s["cached"].append(context_seconds(cached, batch))
        gap = abs(losses["cached"] - losses["computed"]) / max(abs(losses["computed"]), 1e-12)
        max_loss_gap = max(max_loss_gap, gap)
    ratios = [c / p for c, p in zip(seconds["cached"], seconds["computed"])]
    result = {
        "family": cfg.model.family,
        "teacher_context": cfg.model.teacher_context,
        "batch_size": b,
        "images": sorted({tuple(images.shape[-2:]) for images, _, _ in batches}),
        "batches": len(batches),
        "states_per_step": len(sigmas) - 1,
        "rows": len(rows),
        "fill": {"contexts": fill.entries, "seconds": fill.seconds},
        "step_seconds": {k: summary(v) for k, v in seconds.items()},
        "ratio_cached_to_computed": summary(ratios),
        "context_seconds_per_step": {k: summary(v) for k, v in contexts_s.items()},
        "max_relative_loss_gap": max_loss_gap,
        "encoder_bytes_released": cached.released_bytes,
        "rss_bytes": {"before_release": rss_before, "after_release": rss_after, "freed": rss_before - rss_after},
        "cache_hits": cached.hits,
    }
    if device.type == "cuda":
        result["gpu_bytes"] = {"allocated_before_release": gpu_before, "allocated_after_release": gpu_after,
                               "freed": gpu_before - gpu_after, "peak_step_computed": peaks["computed"],
                               "peak_step_cached": peaks["cached"]}
    print(json.dumps({name: {k: result[k] for k in ("step_seconds", "ratio_cached_to_computed",
                                                    "encoder_bytes_released", "max_relative_loss_gap")}}, indent=1))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--out", default=None, help="default benchmarks/results/context_cache-<cpu|gpu>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        models = {name: measure(name, args, Path(work)) for name in args.models}
    kind = "cpu" if args.device == "cpu" else "gpu"
    out = args.out or str(ROOT / "benchmarks" / "results" / f"context_cache-{kind}.json")
    write_result({"args": vars(args), "device": args.device, "cpu_count": psutil.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "models": models}, out, "context_cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
