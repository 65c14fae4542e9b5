"""Per-rank parameter + optimizer memory of the ZeRO-3 learner, with 1 and 2 ranks.

    python benchmarks/memory.py                      # bench transformer, full fine-tuning, 1 and 2 ranks
    python benchmarks/memory.py --lora --ranks 1,2,4

Each run is a Ray TorchTrainer (gloo on CPU, NCCL on GPU) whose workers build the bench
Z-Image-shaped transformer and its weights exactly as the learner does (make_weights:
full weights + full EMA teacher, or LoRA student + teacher adapters), wrap them with
deepspeed.initialize using the learner's own deepspeed_config (ZeRO-3; with LoRA the
frozen base as buffers, whole on every rank, as Learner.setup does), and take one
optimizer step so AdamW's moments exist. Then each rank counts the tensors it holds,
by unique storage (views into DeepSpeed's flat buffers are counted once):

    params       every parameter's ds_tensor (this rank's partition; student + teacher)
    fp32_master  the optimizer's fp32 partitions (DeepSpeed keeps them apart from ds_tensor)
    optimizer    AdamW state (exp_avg, exp_avg_sq) of the fp32 partitions

Also each rank's process RSS (psutil; includes Python, torch, gloo, the model before
partitioning) for reference. Target: 2 ranks <= 0.6x the per-rank bytes of 1 rank.
The learner logs its own peak per rank each step (`memory/peak_gb_rank0`).
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks.bench_model import init_ray, write_result  # noqa: E402


def _storage_key(t):
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def count_rank_memory(module, engine) -> dict:
    """Bytes this rank holds for parameters, fp32 master partitions and optimizer state."""
    seen = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not hasattr(t, "untyped_storage") or t.numel() == 0:
                continue
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            total += key[1]
        return total

    params = add(getattr(p, "ds_tensor", p) for p in module.parameters())
    opt = engine.optimizer
    fp32 = add(getattr(opt, "fp32_partitioned_groups_flat", []) or [])
    inner = getattr(opt, "optimizer", opt)
    state = add(v for s in inner.state.values() for v in s.values() if hasattr(v, "untyped_storage"))
    full = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in module.parameters())
    return {"params": params, "fp32_master": fp32, "optimizer": state, "total": params + fp32 + state,
            "full_model_bytes": full}


def train_loop(config: dict) -> None:
    import deepspeed
    import psutil
    import torch
    import torch.distributed as dist

    from benchmarks.bench_model import make_transformer
    from dopsd_ray.config import load_config
    from dopsd_ray.families.zimage import LORA_TARGETS
    from dopsd_ray.learner import deepspeed_config
    from dopsd_ray.weights import make_weights

    torch.set_num_threads(1)
    cfg = load_config(None, config["overrides"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = make_transformer(config["dim"], config["layers"]).to(device)
    weights = make_weights(transformer, cfg.lora, LORA_TARGETS)
    weights.base_as_buffers()  # as the learner: with LoRA the frozen base stays whole, outside ZeRO-3
    optimizer = torch.optim.AdamW(weights.trainable_parameters(), lr=1e-5)
    engine, optimizer, _, _ = deepspeed.initialize(model=weights.module, optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    # one step, so that the optimizer state exists
    size = config["latent"]
    latents = [torch.randn(16, 1, size, size, device=device)]
    caption = [torch.randn(32, 16, device=device)]
    out = weights.model(latents, torch.tensor([0.5], device=device), caption, return_dict=False)[0]
    loss = torch.stack(out).pow(2).mean()
    engine.backward(loss)
    engine.step()
    mine = count_rank_memory(weights.module, engine)
    mine["rss_bytes"] = psutil.Process().memory_info().rss
    mine["rank"] = dist.get_rank()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(config["result_file"]).write_text(json.dumps(everyone))


def measure(ranks: int, args) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    overrides = [f"lora.enabled={str(args.lora).lower()}", f"lora.rank={args.lora_rank}", "runtime.zero_stage=3"]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "ranks.json")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"overrides": overrides, "dim": args.dim, "layers": args.layers, "latent": 8,
                               "result_file": result_file},
            scaling_config=ScalingConfig(num_workers=ranks, use_gpu=args.gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"memory-{ranks}", storage_path=os.path.join(tmp, "ray_train")),
            torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        )
        trainer.fit()
        return json.loads(Path(result_file).read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lora", action="store_true", help="LoRA student + teacher adapters (default: full fine-tuning)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--gpu", action="store_true", help="one GPU per learner rank (NCCL)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    host = socket.gethostname()
    started = time.time()
    # PYTHONPATH: the workers import benchmarks.bench_model from this checkout
    init_ray(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    per_ranks = {}
    try:
        for n in [int(x) for x in args.ranks.split(",") if x]:
            print(f"ZeRO-3 with {n} rank(s) ...", flush=True)
            per_ranks[n] = measure(n, args)
    finally:
        ray.shutdown()

    base = max(r["total"] for r in per_ranks[min(per_ranks)])
    print(f"\n{'ranks':>5s} {'rank':>4s} {'params MB':>10s} {'fp32 MB':>9s} {'optim MB':>9s} {'total MB':>9s} "
          f"{'vs 1 rank':>9s} {'RSS MB':>8s}")
    summary = {}
    for n, rows in per_ranks.items():
        for r in rows:
            print(f"{n:5d} {r['rank']:4d} {r['params'] / 1e6:10.2f} {r['fp32_master'] / 1e6:9.2f} "
                  f"{r['optimizer'] / 1e6:9.2f} {r['total'] / 1e6:9.2f} {r['total'] / base:9.3f} {r['rss_bytes'] / 1e6:8.0f}")
        summary[n] = {"max_rank_total_bytes": max(r["total"] for r in rows),
                      "ratio_vs_first": max(r["total"] for r in rows) / base}
    targets = {}
    if 1 in per_ranks and 2 in per_ranks:
        ratio = summary[2]["max_rank_total_bytes"] / summary[1]["max_rank_total_bytes"]
        targets["zero3_2_ranks_vs_1"] = {"ratio": ratio, "target": 0.6, "met": ratio <= 0.6}
        print(f"\ntarget: per-rank params + optimizer with 2 ranks = {ratio:.3f}x of 1 rank (<= 0.6): "
              f"{'MET' if ratio <= 0.6 else 'MISSED'}")
    result = {"host": host, "cpu_count": os.cpu_count(), "args": vars(args), "ranks": per_ranks,
              "summary": summary, "targets": targets, "seconds": time.time() - started}
    write_result(result, args.out, "memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
