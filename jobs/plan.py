"""Will the recipe fit? GPU memory per learner rank and per rollout worker, without any weights.

    python jobs/plan.py --config configs/zimage_turbo_lora_1gpu.yaml --gpu-memory 80
    python jobs/plan.py --config configs/flux2_klein_9b_lora.yaml --gpu-memory 24 lora.enabled=false

Builds the recipe's transformer, text encoder, VAE and teacher VLM from their config.json files
(models/configs/ for hub ids, or a local pipeline directory) on the meta device and prints, per
role, every part of its memory (dopsd_ray/plan.py says which are exact and which estimated), the
weight-sync payload, and with --gpu-memory whether the recipe fits and what to change if not.
Exits 1 when it does not fit. Overrides are section.key=value, as for jobs/train.py.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from dopsd_ray.config import ConfigError  # noqa: E402
from dopsd_ray.recipes import config_from_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: runtime.gpu_memory_gb, if set)")
    args, cfg = config_from_cli(parser, argv)
    from dopsd_ray.plan import count, plan

    try:
        p = plan(cfg, count(cfg), args.gpu_memory or cfg.runtime.gpu_memory_gb)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.config}: {cfg.model.path} ({cfg.model.dtype}), LoRA {'r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'off'}, "
          f"ZeRO-{cfg.runtime.zero_stage} x {cfg.runtime.num_learners} learner(s), {cfg.runtime.mode}")
    print(p.report())
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
