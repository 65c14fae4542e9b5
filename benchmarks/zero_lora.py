"""Where the frozen base lives in a LoRA learner: ZeRO-3 partitions, whole on each rank, or ZeRO-2.

    python benchmarks/zero_lora.py                       # 2 ranks, bench transformer dim 512 x 4 layers
    python benchmarks/zero_lora.py --gpu --dim 3840 --layers 4 --ranks 2

ZeRO-3 partitions every parameter of the module it wraps, frozen ones included, and
gathers each one for every forward and backward. A D-OPSD learner step with K states
runs K teacher forwards, K student forwards and their backward: with the frozen base
partitioned that is ~3K gathers of the whole base per step, to train a few hundred MB
of adapters. Three layouts, each a real DeepSpeed engine in every rank of one Ray
TorchTrainer (gloo on CPU, NCCL on GPU), stepped in interleaved rounds (A/B/C, A/B/C,
...) so that every layout sees the same machine state:

    zero3_partitioned_base   ZeRO-3 over everything (the learner before this change)
    zero3_whole_base         ZeRO-3 over the adapters only; the frozen base as buffers,
                             whole on every rank (weights.LoraWeights.base_as_buffers: the default)
    zero2                    ZeRO-2 (adapters' gradients and optimizer state partitioned)

Per layout: step seconds (median, interquartile range, mean, max over rounds, and the
paired per-round ratio to zero3_partitioned_base), and this rank's parameter bytes. On a
CPU, gloo gathers between two processes on one machine are cheap next to the compute:
what this shows here is that the layouts train alike and what each holds; the speed
question belongs to a GPU cluster, where the command above answers it.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks.bench_model import init_ray, write_result  # noqa: E402

LAYOUTS = ("zero3_partitioned_base", "zero3_whole_base", "zero2")


def train_loop(config: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from benchmarks.bench_model import make_transformer
    from benchmarks.bench_model import count_rank_memory
    from dopsd_ray.recipes import load_config
    from dopsd_ray.families.zimage import LORA_TARGETS
    from dopsd_ray.learner import deepspeed_config
    from dopsd_ray.weights import make_weights

    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    engines = {}
    for layout in LAYOUTS:
        cfg = load_config(None, ["model.tiny=true", f"lora.rank={config['lora_rank']}", "train.batch_size=1",
                                 f"runtime.zero_stage={2 if layout == 'zero2' else 3}",
                                 f"model.dtype={'bfloat16' if config['bf16'] else 'float32'}"])
        transformer = make_transformer(config["dim"], config["layers"]).to(dtype)
        weights = make_weights(transformer, cfg.lora, LORA_TARGETS)
        if layout != "zero3_partitioned_base":
            weights.base_as_buffers()
        weights.module.to(device)
        optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=1e-5)
        engine, *_ = deepspeed.initialize(model=weights.module, optimizer=optimizer, config=deepspeed_config(cfg))
        engines[layout] = (weights, engine)

    size, k = config["latent"], config["k"]
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(16, 1, size, size, generator=gen).to(device, dtype) for _ in range(k)]
    caption = [torch.randn(64, 16, generator=gen).to(device, dtype)]

    def step(weights, engine) -> float:
        """One D-OPSD learner step on K pre-rolled states: K teacher forwards, K student
        forward+backward, optimizer step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = 0.0
        for i, x in enumerate(states):
            t = torch.tensor([1.0 - (i + 1) / (k + 1)], device=device)
            with weights.teacher() as teacher:
                target = teacher([x], t, caption, return_dict=False)[0][0]
            out = weights.model([x], t, caption, return_dict=False)[0][0]
            loss = loss + (out.float() - target.float()).pow(2).mean() / k
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {layout: [] for layout in LAYOUTS}
    for r in range(config["warmup"] + config["rounds"]):
        for layout in LAYOUTS:
            seconds = step(*engines[layout])
            if r >= config["warmup"]:
                times[layout].append(seconds)
    mine = {"rank": dist.get_rank(), "times": times,
            "memory": {layout: count_rank_memory(w.module, e) for layout, (w, e) in engines.items()},
            "frozen_base_bytes_per_rank": {
                layout: sum(b.numel() * b.element_size() for b in w.module.buffers()) for layout, (w, e) in engines.items()}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(config["result_file"]).write_text(json.dumps(everyone))


def summarize(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "iqr": [q[0], q[2]], "mean": statistics.fmean(values),
            "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    p.add_argument("--k", type=int, default=4, help="trained states per step")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="one GPU per rank, NCCL, bf16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    init_ray(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "ranks.json")
            config = {"dim": args.dim, "layers": args.layers, "latent": args.latent, "k": args.k,
                      "lora_rank": args.lora_rank, "rounds": args.rounds, "warmup": args.warmup,
                      "bf16": args.gpu, "result_file": result_file}
            TorchTrainer(
                train_loop, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=args.ranks, use_gpu=args.gpu, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="zero-lora", storage_path=os.path.join(tmp, "ray_train")),
                torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
            ).fit()
            ranks = json.loads(Path(result_file).read_text())
    finally:
        ray.shutdown()

    # a step ends when the slowest rank ends: per round, the max over ranks
    per_round = {layout: [max(r["times"][layout][i] for r in ranks) for i in range(args.rounds)] for layout in LAYOUTS}
    base = per_round["zero3_partitioned_base"]
    rows = {}
    print(f"\n{args.ranks} ranks, dim {args.dim} x {args.layers} layers, K={args.k}, {args.rounds} rounds")
    print(f"{'layout':24s} {'median s':>9s} {'mean s':>8s} {'max s':>8s} {'ratio (paired median)':>22s} "
          f"{'params MB/rank':>15s} {'base MB/rank':>13s}")
    for layout in LAYOUTS:
        ratios = [a / b for a, b in zip(per_round[layout], base)]
        rows[layout] = {"step_seconds": summarize(per_round[layout]),
                        "ratio_to_partitioned_base": summarize(ratios),
                        "param_bytes_rank0": ranks[0]["memory"][layout]["params"],
                        "frozen_base_buffer_bytes_rank0": ranks[0]["frozen_base_bytes_per_rank"][layout]}
        s = rows[layout]["step_seconds"]
        print(f"{layout:24s} {s['median']:9.3f} {s['mean']:8.3f} {s['max']:8.3f} "
              f"{rows[layout]['ratio_to_partitioned_base']['median']:22.3f} "
              f"{rows[layout]['param_bytes_rank0'] / 1e6:15.1f} {rows[layout]['frozen_base_buffer_bytes_rank0'] / 1e6:13.1f}")
    result = {"args": vars(args), "device": "gpu" if args.gpu else "cpu", "cpu_count": os.cpu_count(),
              "layouts": rows, "raw_seconds_per_round": per_round, "seconds": time.time() - started}
    write_result(result, args.out, "zero_lora")
    return 0


if __name__ == "__main__":
    sys.exit(main())
