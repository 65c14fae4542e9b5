"""Rebuild the committed toy base (models/toy): evaluator, flow model, 4-step student.

    python jobs/build_toy_base.py --out models/toy --flow-minutes 30 --distill-minutes 12

Runs for about the given minutes plus a few for trajectories and figures, on the CPU
(or `--device cuda`), and writes base_figures.json and base_samples.png next to the weights.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_ray.toy.build import build_base  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/toy", help="where the base is written")
    parser.add_argument("--flow-minutes", type=float, default=30.0)
    parser.add_argument("--distill-minutes", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=1536, help="teacher trajectories for distillation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure-samples", type=int, default=192,
                        help="prompts sampled for base_figures.json and base_samples.png (at least 8; fewer: "
                             "faster, noisier figures)")
    args = parser.parse_args(argv)
    if args.figure_samples < 8:
        parser.error("--figure-samples must be at least 8 (the sample grid has 8 columns)")
    torch.set_num_threads(args.threads)
    figures = build_base(Path(args.out), args.flow_minutes, args.distill_minutes, args.batch_size, args.seed,
                         args.pool_size, log=lambda m: print(m, flush=True), figure_samples=args.figure_samples)
    print(json.dumps({k: v for k, v in figures.items() if k in ("flow", "distilled")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
