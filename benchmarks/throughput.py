"""D-OPSD against baseline SFT on the same hardware and the same data: learner cost per step.

    python benchmarks/throughput.py                       # ~22M-param Z-Image-shaped LoRA model, 64 px, K=4
    python benchmarks/throughput.py --dim 768 --layers 6 --size 128
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --dim 1536 --layers 12 --size 512
    python benchmarks/throughput.py --modes colocated,disaggregated,async,async_rollout   # + full Ray runs

Part 1 (always): the learner's step functions in one process, side by side. Every
round runs each of these once on the same batch, in a rotating order (so load from
other processes falls on all of them alike); each time is loss + backward + grad clip +
AdamW step + EMA update, the learner's compute for one optimizer step:

    sft                     colocated_loss, algorithm sft         (SFT learner; encodes text + VAE itself)
    sft_exp                 experience_loss on an SFT experience  (SFT fed by rollout workers)
    dopsd_colocated         colocated_loss, algorithm dopsd       (the released recipe)
    dopsd_learner_targets   experience_loss, teacher on learner   (disaggregated on-policy / async default)
    dopsd_rollout_targets   experience_loss, targets precomputed  (async, runtime.teacher_targets=rollout)
    rollout[_targets]       make_experience without / with teacher targets (a rollout worker's work, no grad)

Figures are medians over the rounds after --warmup. No DeepSpeed here (one process):
the step is a plain torch AdamW on the trainable weights.

Part 2 (--modes): full driver runs (Ray Data, Ray Train + DeepSpeed, rollout actors,
weight sync) of D-OPSD and SFT per mode with the bench model, read back from MLflow.

Output: one table on stdout and benchmarks/results/throughput-<host>.json.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_model import build_bench_zimage, count_parameters, init_ray  # noqa: E402
from dopsd_ray.algorithms.schedules import RECIPE_4STEP  # noqa: E402
from dopsd_ray.algorithms.steps import Batch, colocated_loss, experience_loss, make_experience  # noqa: E402
from dopsd_ray.config import AlgorithmConfig, LoraSettings  # noqa: E402
from dopsd_ray.families.zimage import LORA_TARGETS, ZImageFamily  # noqa: E402
from dopsd_ray.weights import EmaTeacher, make_weights  # noqa: E402

CAPTIONS = [
    "a red fox sitting in fresh snow, morning light, shallow depth of field",
    "a ceramic teapot with blue glaze on a wooden table next to a window",
    "an old lighthouse on a rocky coast under a stormy sky, waves crashing",
    "a bowl of ramen with a soft egg, green onions and chili oil, top view",
]
TRAIN_MODES = ["sft", "sft_exp", "dopsd_colocated", "dopsd_learner_targets", "dopsd_rollout_targets"]
ROLLOUT_MODES = ["rollout", "rollout_targets"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="transformer width (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="main transformer blocks")
    p.add_argument("--refiner-layers", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="images per learner step")
    p.add_argument("--k", type=int, default=4, help="D-OPSD roll-out states (4: the recipe sigmas)")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (each runs every mode once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (the recipe: 64, alpha 128)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (full-parameter EMA teacher) instead of LoRA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--modes", default="", help="also full driver runs: comma list of "
                   "colocated,disaggregated,async,async_rollout (slow: Ray + DeepSpeed start per run)")
    p.add_argument("--driver-steps", type=int, default=8)
    p.add_argument("--driver-warmup", type=int, default=2)
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench"))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput-<host>.json)")
    return p.parse_args(argv)


def training_sigmas(k: int) -> torch.Tensor:
    if k == 4:
        return torch.tensor(RECIPE_4STEP, dtype=torch.float32)
    return torch.linspace(1.0, 0.0, k + 1)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- part 1: the step functions, side by side ------------------------------------------


def micro_benchmark(args, model_path: Path) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    family = ZImageFamily.from_pretrained(
        model_path, dtype=dtype, device=args.device, max_sequence_length=64, teacher_max_sequence_length=128,
        vlm_min_pixels=1024, vlm_max_pixels=4096)
    base_parameters = count_parameters(family.transformer)
    lora = LoraSettings(enabled=not args.full, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    weights = make_weights(family.transformer, lora, LORA_TARGETS)
    trainable = weights.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ema = EmaTeacher(weights)
    sigmas = training_sigmas(args.k)
    dopsd = AlgorithmConfig(name="dopsd", ema_decay=0.9999)
    sft = AlgorithmConfig(name="sft")

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    batch = Batch(images, captions, [f"bench-{i}" for i in range(args.batch)])
    # what rollout workers would hand the learner (contents do not change the cost)
    exp_sft = make_experience(family, weights, batch, sigmas, sft, 0, with_targets=False)
    exp_learner = make_experience(family, weights, batch, sigmas, dopsd, 0, with_targets=False)
    exp_rollout = make_experience(family, weights, batch, sigmas, dopsd, 0, with_targets=True)

    def train_step(compute_loss):
        loss, metrics = compute_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(dopsd.ema_decay)
        return metrics["trained_states"]

    steps = {
        "sft": lambda: train_step(lambda: colocated_loss(family, weights, batch, sigmas, sft)),
        "sft_exp": lambda: train_step(lambda: experience_loss(family, weights, exp_sft, sft)),
        "dopsd_colocated": lambda: train_step(lambda: colocated_loss(family, weights, batch, sigmas, dopsd)),
        "dopsd_learner_targets": lambda: train_step(lambda: experience_loss(family, weights, exp_learner, dopsd)),
        "dopsd_rollout_targets": lambda: train_step(lambda: experience_loss(family, weights, exp_rollout, dopsd)),
        "rollout": lambda: make_experience(family, weights, batch, sigmas, dopsd, 0, False).num_trained_states,
        "rollout_targets": lambda: make_experience(family, weights, batch, sigmas, dopsd, 0, True).num_trained_states,
    }
    names = list(steps)
    times = {n: [] for n in names}
    trained = {}
    peak = {n: [] for n in names}
    cuda = args.device.startswith("cuda")
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no mode always runs first
        for n in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            synchronize(args.device)
            t0 = time.perf_counter()
            trained[n] = steps[n]()
            synchronize(args.device)
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
                if cuda:
                    peak[n].append(torch.cuda.max_memory_allocated())
        print(f"round {r + 1}/{args.warmup + args.steps}" + (" (warm-up)" if r < args.warmup else ""), flush=True)

    rows = {}
    for n in names:
        med = statistics.median(times[n])
        rows[n] = {
            "seconds_per_step": med,
            "seconds_per_step_min": min(times[n]),
            "seconds_per_step_max": max(times[n]),
            "images_per_step": args.batch,
            "trained_states_per_step": trained[n],
            "seconds_per_sample": med / args.batch,
            "seconds_per_trained_state": med / trained[n],
            "images_per_s": args.batch / med,
            "trained_states_per_s": trained[n] / med,
            "peak_memory_bytes": max(peak[n]) if peak[n] else None,
        }
    return {
        "transformer_parameters": base_parameters,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "rows": rows,
        "targets": targets(rows, args.k),
    }


def targets(rows: dict, k: int) -> dict:
    sft, sft_exp = rows["sft"], rows["sft_exp"]
    rollout_targets = rows["dopsd_rollout_targets"]["seconds_per_trained_state"]
    ratio_exp = rollout_targets / sft_exp["seconds_per_sample"]
    ratio_sft = rollout_targets / sft["seconds_per_sample"]
    colocated = rows["dopsd_colocated"]["seconds_per_step"] / sft["seconds_per_step"]
    return {
        "async_rollout_targets_state_vs_sft_sample": {
            "ratio": ratio_exp, "ratio_vs_sft_colocated": ratio_sft, "target": 1.15, "met": ratio_exp <= 1.15,
            "what": "learner seconds per trained state (dopsd_rollout_targets) / SFT seconds per trained "
                    "sample (sft_exp: SFT fed the same way; ratio_vs_sft_colocated: SFT encoding itself)"},
        "colocated_step_vs_sft_step": {
            "ratio": colocated, "expected": "about 5x per sample for K=4 (paper: 2x wall time)", "k": k,
            "per_trained_state": rows["dopsd_colocated"]["seconds_per_trained_state"] / sft["seconds_per_sample"],
            "what": "dopsd_colocated seconds per optimizer step / sft seconds per optimizer step, same batch"},
        "learner_targets_step_vs_sft_step": {
            "ratio": rows["dopsd_learner_targets"]["seconds_per_step"] / sft_exp["seconds_per_step"],
            "what": "disaggregated with teacher targets on the learner: K teacher forwards + K student "
                    "forward/backward per step, against SFT's one forward/backward"},
    }


# -- part 2: full driver runs, read back from MLflow ------------------------------------

DRIVER_MODES = {
    "colocated": ["runtime.mode=colocated"],
    "disaggregated": ["runtime.mode=disaggregated", "runtime.max_staleness=0"],
    "async": ["runtime.mode=disaggregated", "runtime.max_staleness=1"],
    "async_rollout": ["runtime.mode=disaggregated", "runtime.max_staleness=1", "runtime.teacher_targets=rollout"],
}
DRIVER_METRICS = ["learner/compute_seconds", "learner/step_seconds", "learner/wait_fraction", "images_per_s",
                  "trained_states_per_s", "rollout_seconds", "sync/seconds", "sync/bytes", "staleness",
                  "memory/peak_gb_rank0"]


def driver_runs(args, model_path: Path, modes: list[str]) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from dopsd_ray.config import load_config
    from dopsd_ray.driver import train

    if not ray.is_initialized():
        init_ray()  # a local Ray (num_cpus=max(4, cores)), or the cluster's under RAY_ADDRESS
    out = {}
    for mode in modes:
        for algo in ("sft", "dopsd"):
            if algo == "sft" and mode == "async_rollout":
                continue  # teacher targets have no meaning for SFT: its async run is "async"
            name = f"{mode}-{algo}-{int(time.time())}"
            overrides = [
                "model.tiny=false", f"model.path={model_path}", f"algorithm.name={algo}",
                f"lora.enabled={str(not args.full).lower()}", f"lora.rank={args.lora_rank}",
                f"lora.alpha={2.0 * args.lora_rank}", f"data.pixel_budget={args.size * args.size}",
                f"train.batch_size={args.batch}", f"train.steps={args.driver_steps}",
                f"train.output_dir={args.work_dir}/runs", f"train.run_name={name}",
                "train.sample_every=1000000", "train.checkpoint_every=1000000", "runtime.max_failures=0",
                f"model.dtype={args.dtype}",
                *DRIVER_MODES[mode],
            ]
            if args.k != 4:
                overrides.append(f"algorithm.training_sigmas={training_sigmas(args.k).tolist()}")
            if args.device.startswith("cuda"):
                overrides += ["runtime.learner_resources={GPU: 1}", "runtime.rollout_resources={GPU: 1}"]
            cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
            print(f"driver run {mode} / {algo} ...", flush=True)
            summary = train(cfg)
            client = MlflowClient(summary["mlflow_tracking_uri"])
            row = {}
            for key in DRIVER_METRICS:
                history = sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)
                values = [m.value for m in history if m.step > args.driver_warmup]
                row[key] = statistics.median(values) if values else None
            row["run_seconds"] = summary["seconds"]
            out[f"{mode}/{algo}"] = row
    return out


# -- output --------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    micro = result["micro"]
    print(f"\nlearner step compute, medians of {result['args']['steps']} rounds after "
          f"{result['args']['warmup']} warm-up ({result['device']}, transformer "
          f"{micro['transformer_parameters'] / 1e6:.1f}M params, {micro['trainable_parameters'] / 1e6:.2f}M trainable)")
    head = f"{'mode':24s} {'s/step':>8s} {'states':>6s} {'s/state':>8s} {'s/sample':>9s} {'img/s':>7s} {'states/s':>9s} {'peak MB':>8s}"
    print(head)
    print("-" * len(head))
    for n, r in micro["rows"].items():
        peak = f"{r['peak_memory_bytes'] / 2**20:8.0f}" if r["peak_memory_bytes"] else f"{'-':>8s}"
        print(f"{n:24s} {r['seconds_per_step']:8.3f} {r['trained_states_per_step']:6d} "
              f"{r['seconds_per_trained_state']:8.3f} {r['seconds_per_sample']:9.3f} {r['images_per_s']:7.2f} "
              f"{r['trained_states_per_s']:9.2f} {peak}")
    t = micro["targets"]
    a = t["async_rollout_targets_state_vs_sft_sample"]
    c = t["colocated_step_vs_sft_step"]
    l = t["learner_targets_step_vs_sft_step"]
    print(f"\ntarget: async, teacher targets on rollout: learner s/state = {a['ratio']:.2f}x SFT s/sample "
          f"(vs SFT encoding itself {a['ratio_vs_sft_colocated']:.2f}x); target <= 1.15x: "
          f"{'MET' if a['met'] else 'MISSED'}")
    print(f"colocated recipe (K={c['k']}): {c['ratio']:.2f}x SFT per optimizer step / per sample "
          f"({c['per_trained_state']:.2f}x per trained state); expected ~5x per sample")
    print(f"disaggregated, teacher on learner: {l['ratio']:.2f}x SFT per optimizer step")
    if result.get("driver"):
        print("\nfull driver runs (medians from MLflow after warm-up steps)")
        keys = DRIVER_METRICS
        print(f"{'run':24s} " + " ".join(f"{k.split('/')[-1][:12]:>12s}" for k in keys))
        for name, row in result["driver"].items():
            print(f"{name:24s} " + " ".join(f"{row[k]:12.4g}" if row[k] is not None else f"{'-':>12s}" for k in keys))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    model_path = build_bench_zimage(work / f"zimage-d{args.dim}-l{args.layers}-r{args.refiner_layers}",
                                    args.dim, args.layers, args.refiner_layers)
    host = socket.gethostname()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    result = {"host": host, "device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_at_start": load, "torch": torch.__version__, "args": vars(args),
              "micro": micro_benchmark(args, model_path)}
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in DRIVER_MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; known: {', '.join(DRIVER_MODES)}")
    if modes:
        result["driver"] = driver_runs(args, model_path, modes)
    result["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["seconds"] = time.time() - started
    print_table(result)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"throughput-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
